"""The `finetune` command: run the API, the worker, migrations, or everything at once (`dev`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

from app.settings import get_settings

cli = typer.Typer(help="Self-hosted QLoRA fine-tuning service.", no_args_is_help=True, add_completion=False)

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "examples" / "tiny-phi2"


def _configure_logging() -> None:
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.command()
def serve() -> None:
    """Run the HTTP API (uvicorn)."""
    import uvicorn

    _configure_logging()
    settings = get_settings()
    uvicorn.run(
        "app.api.main:app", host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )


@cli.command()
def worker() -> None:
    """Run a Celery worker: one training job at a time, each in a fresh child process."""
    from app.queue import QUEUE
    from worker.celery_app import celery

    _configure_logging()
    celery.worker_main(
        ["worker", f"--loglevel={get_settings().log_level}", "--pool=prefork", "--concurrency=1", "-Q", QUEUE]
    )


@cli.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    from app import migrate as migrations

    _configure_logging()
    migrations.upgrade()
    typer.echo(f"database at head: {_redacted(get_settings().database_url)}")


@cli.command("demo-model")
def demo_model(
    directory: Path = typer.Argument(DEMO_MODEL_DIR, help="Folder with a Phi config and tokenizer."),
) -> None:
    """Write the offline demo model's weights (seeded, so identical everywhere)."""
    from worker.demo_model import ensure_demo_model

    typer.echo(f"demo model ready: {ensure_demo_model(directory)}")


@cli.command()
def dev() -> None:
    """API and one worker on this machine, no Redis needed (SQLite database and broker)."""
    settings = get_settings()
    if "FINETUNE_BROKER_URL" not in os.environ:
        # kombu's SQLAlchemy transport: a broker in a SQLite file, shared by API and worker.
        os.environ["FINETUNE_BROKER_URL"] = f"sqla+sqlite:///{settings.data_dir / 'broker.sqlite'}"
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
    worker_process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=os.environ.copy())
    try:
        serve()
    finally:
        worker_process.send_signal(signal.SIGTERM)
        try:
            worker_process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker_process.kill()


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
