"""The `finetune` command: run the API, the worker, migrations, or everything at once (`dev`)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.client.commands import ApiKey, Url, preflight_report
from app.client.commands import register as register_client_commands
from app.client.http import DEFAULT_URL
from app.settings import Settings, get_settings

cli = typer.Typer(help="Self-hosted QLoRA fine-tuning service.", no_args_is_help=True, add_completion=False)
keys_cli = typer.Typer(help="API keys: each belongs to an owner and sees only that owner's jobs.")
cli.add_typer(keys_cli, name="keys", rich_help_panel="Server")
register_client_commands(cli)

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "examples" / "tiny-phi2"


def _configure_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_auth_setting(host: str) -> None:
    """Auth off is for one person on their own machine: refused on any other address."""
    if get_settings().auth:
        return
    if not _is_loopback(host):
        typer.secho(
            f"refusing to start: FINETUNE_AUTH=off would let anyone who reaches {host} run jobs on "
            "this machine's GPUs; bind to 127.0.0.1 or turn auth on (`finetune keys create OWNER`).",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    typer.secho(
        f"WARNING: authentication is OFF (FINETUNE_AUTH=off): every request to {host} acts as owner "
        "'local'. Use this only on your own machine.",
        fg=typer.colors.YELLOW,
        bold=True,
        err=True,
    )


# .env.example's POSTGRES_PASSWORD, which compose puts into FINETUNE_DATABASE_URL: a deployment
# still using it has a database password anyone who read the repository knows.
PLACEHOLDER_PASSWORD = "change-me"


def placeholder_password_problem(database_url: str) -> str | None:
    """Why the service must not start on this database URL, if its password is the shipped one."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(database_url).password
    except Exception:  # not ours to judge here: the database driver names what is wrong
        return None
    if password != PLACEHOLDER_PASSWORD:
        return None
    return (
        f"refusing to start: the database password is .env.example's placeholder {PLACEHOLDER_PASSWORD!r}; "
        "set POSTGRES_PASSWORD in .env to one of your own (letters, digits, '-', '_', '.', '~'). A "
        "database already made with it keeps it until changed: docker compose exec postgres psql -U "
        "finetune -c \"ALTER USER finetune PASSWORD 'new-password'\""
    )


def _refuse_placeholder_password() -> None:
    problem = placeholder_password_problem(get_settings().database_url)
    if problem:
        typer.secho(problem, fg=typer.colors.RED, err=True)
        raise typer.Exit(2)


@cli.command(rich_help_panel="Server")
def serve() -> None:
    """Run the HTTP API (uvicorn). Needs API keys unless FINETUNE_AUTH=off on a loopback address."""
    import uvicorn

    _configure_logging()
    settings = get_settings()
    _refuse_placeholder_password()
    _check_auth_setting(settings.host)
    uvicorn.run("app.api.main:app", **server_options(settings))


# Room the HTTP parser leaves above FINETUNE_MAX_HEADER_BYTES for the request line (a long query
# string) and each header's framing, so that headers just over the cap get the API's 431.
PARSER_SLACK_BYTES = 16 << 10


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for `serve`. The parser is h11, bounded: httptools (uvicorn's choice
    when installed) buffers a header of any size before the app sees it (an 8 MB one was read
    whole); h11 stops at `h11_max_incomplete_event_size` and answers a plain 400 "Invalid HTTP
    request received." Below that bound the app's own cap answers 431 (app/api/limits.py)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "http": "h11",
        "h11_max_incomplete_event_size": settings.max_header_bytes + PARSER_SLACK_BYTES,
    }


# Celery node names (`NAME@<host>`), which `finetune health` pings.
NODE_NAMES = {"worker": "celery", "sampler": "sampler"}


def _run_celery_worker(queue: str, node: str, *pool: str) -> None:
    """A Celery worker on `queue`, named `node@<host>`."""
    _refuse_placeholder_password()
    from worker import offline  # noqa: F401  (before bitsandbytes: no hub kernels unless allowed)
    from worker.celery_app import celery

    _configure_logging()
    cwd = get_settings().worker_cwd  # settings (and their relative paths) are read before the move
    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    # No mingle or gossip: the database owns job state, so a worker has nothing to sync with its
    # peers at start (mingle alone waits a second for them) or to hear from them while it runs.
    options = ["--without-mingle", "--without-gossip", "-Q", queue, "-n", f"{node}@%h"]
    celery.worker_main(["worker", f"--loglevel={get_settings().log_level}", *pool, *options])


@cli.command(rich_help_panel="Server")
def worker(
    name: Annotated[
        str,
        typer.Option(
            "--name",
            help="Its node name before @host: one per worker where a host runs several (one per GPU); "
            "`finetune health worker` checks the default.",
        ),
    ] = NODE_NAMES["worker"],
) -> None:
    """Run a Celery worker: one training job at a time, each in a fresh child process."""
    from app.routing import GpuClass, class_queue
    from worker.gpus import visible_gpus

    # its class's queue: the dispatcher sends there only jobs these GPUs hold (app/routing.py)
    queue = class_queue(GpuClass.of(visible_gpus()).signature)
    _run_celery_worker(queue, name, "--pool=prefork", "--concurrency=1")


@cli.command(rich_help_panel="Server")
def sampler() -> None:
    """Answer samples (POST /jobs/{id}/generate) and compute uploads' token statistics, one at a
    time: on the GPU when the model fits beside a training there, else on the CPU
    (FINETUNE_SAMPLER_DEVICE); on a GPU the model is freed after each answer."""
    from app.queue import samples_queue

    _run_celery_worker(samples_queue(), NODE_NAMES["sampler"], "--pool=solo")


@cli.command(rich_help_panel="Server")
def health(
    service: str = typer.Argument(..., help="api, worker or sampler: which process on this host to check."),
) -> None:
    """Exit 0 if this host's API answers /healthz, or its worker / sampler consumes (its
    heartbeat is fresh): the containers' healthchecks."""
    import socket

    import httpx

    settings = get_settings()
    if service == "api":
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        try:
            ok = httpx.get(f"http://{host}:{settings.port}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
    elif service in ("worker", "sampler"):
        from worker.heartbeat import is_alive

        ok = is_alive(f"{NODE_NAMES[service]}@{socket.gethostname()}")
    else:
        raise typer.BadParameter("must be api, worker or sampler", param_hint="SERVICE")
    typer.echo(f"{service}: {'ok' if ok else 'not answering'}")
    raise typer.Exit(0 if ok else 1)


@cli.command(rich_help_panel="Server")
def doctor(
    spec_file: Annotated[
        Path | None,
        typer.Argument(help="A job spec (YAML or JSON): its memory estimate against the service's GPUs."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override one field, e.g. training.batch_size=8.")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """What this machine can train on: torch's CUDA architectures against the GPUs it sees, and
    bitsandbytes. Exit code 1 if a GPU is not supported. With a SPEC (or --set): the running
    service's memory estimate for that job against its workers' GPUs instead; exit code 1 if
    POST /jobs would refuse it."""
    if spec_file is not None or set_:
        raise typer.Exit(0 if preflight_report(spec_file, set_ or [], url, api_key) else 1)
    from worker import offline  # noqa: F401  (before bitsandbytes: no hub kernels unless allowed)
    from worker.doctor import report

    lines, ok = report()
    for line in lines:
        typer.echo(line)
    raise typer.Exit(0 if ok else 1)


@cli.command(rich_help_panel="Server")
def migrate() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    from app import migrate as migrations

    _configure_logging()
    _refuse_placeholder_password()
    migrations.upgrade()
    typer.echo(f"database at head: {_redacted(get_settings().database_url)}")


@cli.command("demo-model", rich_help_panel="Server")
def demo_model(
    directory: Path = typer.Argument(DEMO_MODEL_DIR, help="Folder with a Phi config and tokenizer."),
) -> None:
    """Write the offline demo model's weights (seeded, so identical everywhere)."""
    from worker.demo_model import ensure_demo_model

    typer.echo(f"demo model ready: {ensure_demo_model(directory)}")


@cli.command(rich_help_panel="Server")
def dev() -> None:
    """API, one worker and the sampler on this machine, no Redis needed (SQLite database and
    broker)."""
    settings = get_settings()
    if "FINETUNE_BROKER_URL" not in os.environ:
        # kombu's SQLAlchemy transport: a broker in a SQLite file, shared by API and worker.
        os.environ["FINETUNE_BROKER_URL"] = f"sqla+sqlite:///{settings.data_dir / 'broker.sqlite'}"
    if "FINETUNE_AUTH" not in os.environ and _is_loopback(settings.host):
        os.environ["FINETUNE_AUTH"] = "off"  # one person on their own machine; serve() says so
    get_settings.cache_clear()
    settings = get_settings()
    _configure_logging()
    from app import migrate as migrations
    from app.queue import declare_queue

    migrations.upgrade()
    declare_queue()
    typer.secho(
        f"finetune dev: API on http://{settings.host}:{settings.port}  (docs at /docs)\n"
        f"  data dir  {settings.data_dir}\n"
        f"  database  {_redacted(settings.database_url)}\n"
        f"  broker    {_redacted(settings.broker_url)}",
        fg=typer.colors.GREEN,
    )
    # uvicorn re-raises the SIGTERM that stopped it once it has shut down; with this handler
    # in place that ends serve() with SystemExit, so the workers below are stopped too.
    signal.signal(signal.SIGTERM, _exit_quietly)
    # Their own sessions: a Ctrl-C in this terminal reaches only this process, which then
    # stops them the way `docker compose stop` does (one SIGTERM: a running job saves a
    # checkpoint and goes back to the queue, its attempt not spent).
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", command],
            env=os.environ.copy(),
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        for command in ("worker", "sampler")
    ]
    try:
        serve()
    finally:
        _stop_workers(workers)


def _stop_with_parent() -> None:
    """In a child of `finetune dev`, before it runs: get SIGTERM when `finetune dev` dies, even
    by SIGKILL (Linux), since its own session no longer ties it to the terminal."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_workers(workers: list[subprocess.Popen], grace_s: float = 300) -> None:
    """SIGTERM each, then wait for a running job's checkpoint; a second Ctrl-C stops at once."""
    for process in workers:
        process.send_signal(signal.SIGTERM)
    typer.secho(
        "stopping the worker and the sampler; a running job saves a checkpoint and goes back to the "
        "queue (Ctrl-C again to stop at once)",
        fg=typer.colors.YELLOW,
        err=True,
    )
    try:
        for process in workers:
            process.wait(timeout=grace_s)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        for process in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@keys_cli.command("create")
def keys_create(
    owner: str = typer.Argument(..., help="Who the key acts for, e.g. a user or team name."),
) -> None:
    """Make a key for OWNER and print it. It is shown only this once; only its hash is stored."""
    from app import migrate as migrations
    from app.services.keys import create_key

    migrations.upgrade()
    try:
        key = create_key(owner)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="OWNER") from exc
    typer.echo(key)
    typer.secho(
        f"key for {owner!r}: send it as `Authorization: Bearer <key>`; it is not shown again.", err=True
    )


@keys_cli.command("list")
def keys_list() -> None:
    """Every key's id, owner and state (never the secret)."""
    from app.services.keys import list_keys

    for key in list_keys():
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        typer.echo(f"{key.id}  {key.owner:<24} created {key.created_at:%Y-%m-%d %H:%M}  {state}")


@keys_cli.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The part of the key before the dot.")) -> None:
    """Revoke a key at once; its owner's jobs and files stay."""
    from app.services.keys import revoke_key

    if not revoke_key(key_id):
        typer.secho(f"no active key {key_id!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
