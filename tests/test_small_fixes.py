"""Issue 27 item 10: a header cap (431) with a bounded parser below it, a quiet stop for a
worker with no job, a /ui redirect that says where it goes, the shipped database password
refused, and "did you mean" for a misspelled spec field."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from types import SimpleNamespace

import pytest

from tests.conftest import sqlite_only

# --- (a) request headers -----------------------------------------------------------------


@sqlite_only
def test_headers_over_the_cap_get_a_431_naming_it(client):
    huge = {"X-Padding": "a" * 100_000}

    with_key = client.get("/jobs", headers=huge)
    without_key = client.get("/jobs", headers={**huge, "Authorization": ""})

    assert with_key.status_code == without_key.status_code == 431
    assert with_key.json() == {
        "error": "headers_too_large",
        "detail": "request headers here are limited to 65536 bytes (names and values together)",
    }
    assert client.get("/jobs", headers={"X-Padding": "a" * 1000}).status_code == 200


class _Transport:
    """What uvicorn's protocol writes to, and whether it hung up."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def test_the_servers_parser_stops_reading_a_huge_header_early():
    """`finetune serve`'s parser refuses an 8 MB header once it has buffered a little more than
    the cap, with the app never called (httptools, uvicorn's default, buffered it all)."""
    import uvicorn
    from uvicorn.server import ServerState

    from app.cli import server_options
    from app.settings import Settings

    settings = Settings()
    called = []

    async def app(scope, receive, send):
        called.append(scope)

    async def feed() -> tuple[_Transport, int]:
        config = uvicorn.Config(app, **server_options(settings))
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(b"GET /jobs HTTP/1.1\r\nHost: x\r\nX-Padding: ")
        sent = 0
        while not transport.closed and sent < 8 << 20:
            protocol.data_received(b"a" * 4096)
            sent += 4096
        return transport, sent

    transport, sent = asyncio.run(feed())

    assert transport.closed and transport.written.startswith(b"HTTP/1.1 400")
    assert settings.max_header_bytes < sent <= settings.max_header_bytes + (32 << 10)
    assert called == []


# --- (b) a worker with no job stops quietly ------------------------------------------------


def test_only_a_process_running_a_job_is_asked_to_checkpoint():
    from worker.shutdown import processes_to_checkpoint

    running = SimpleNamespace(worker_pid=101)
    on_its_way = SimpleNamespace(worker_pid=None)

    assert processes_to_checkpoint([], [101, 102]) == []
    assert processes_to_checkpoint([running], [101, 102]) == [101]
    assert processes_to_checkpoint([running, on_its_way], [101, 102]) == [101, 102]
    assert processes_to_checkpoint([SimpleNamespace(worker_pid=7)], []) == []  # solo: in-process


def test_a_warm_shutdown_with_no_job_signals_no_process(caplog):
    """An idle pool process took the SIGUSR2 as billiard's signal to exit, and the pool logged
    `ERROR … exited with 'exitcode 70'`."""
    from celery.signals import worker_shutting_down

    from worker.shutdown import worker_stopping

    idle_child = subprocess.Popen(["sleep", "30"])  # SIGUSR2 would end it
    try:
        with caplog.at_level(logging.INFO, logger="worker.shutdown"):
            worker_shutting_down.send(sender="celery@test", sig="SIGTERM", how="Warm", exitcode=0)
        time.sleep(0.1)
        assert idle_child.poll() is None
        assert caplog.records == []
    finally:
        worker_stopping.clear()
        idle_child.kill()
        idle_child.wait()


# --- (c) /ui -------------------------------------------------------------------------------


@sqlite_only
@pytest.mark.parametrize("path", ["/ui", "/"])
def test_the_dashboards_redirect_says_where_it_goes(client, path):
    response = client.get(path, follow_redirects=False, headers={"Authorization": ""})

    assert response.status_code == 307
    assert response.headers["location"] == "http://testserver/ui/"
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Redirecting to http://testserver/ui/\n"


# --- (g) did you mean ----------------------------------------------------------------------


def messages_by_field(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {problem["field"]: problem["message"] for problem in response.json()["detail"]}


@sqlite_only
def test_a_misspelled_field_suggests_the_allowed_one(client):
    top = messages_by_field(client.post("/jobs", json={"trainng": {}}))
    nested = messages_by_field(client.post("/jobs", json={"training": {"learning_rat": 1e-4}}))
    deep = messages_by_field(
        client.post("/jobs", json={"method": {"type": "dpo", "dpo": {"hyperparameters": {"bta": 0.1}}}})
    )
    far = messages_by_field(client.post("/jobs", json={"zzz": 1}))

    assert top["trainng"].endswith("did you mean 'training'?")
    assert nested["training.learning_rat"].endswith("did you mean 'learning_rate'?")
    assert deep["method.dpo.hyperparameters.bta"].endswith("did you mean 'beta'?")
    assert "did you mean" not in far["zzz"]


# --- (d) the shipped database password ------------------------------------------------------


def test_the_shipped_database_password_is_refused():
    from dotenv import dotenv_values

    from app.cli import placeholder_password_problem
    from tests.conftest import REPO

    shipped = dotenv_values(REPO / ".env.example")["POSTGRES_PASSWORD"]
    # the rule .env.example states: these characters go into a URL as written
    assert shipped and re.fullmatch(r"[A-Za-z0-9._~-]+", shipped)
    url = "postgresql+psycopg://finetune:{}@postgres:5432/finetune"

    problem = placeholder_password_problem(url.format(shipped))

    assert problem and "POSTGRES_PASSWORD" in problem and shipped in problem
    assert placeholder_password_problem(url.format("s3cret-Pass_word.1~")) is None
    assert placeholder_password_problem("sqlite:////data/finetune.db") is None


def test_server_commands_stop_on_the_shipped_password(monkeypatch):
    from typer.testing import CliRunner

    from app.cli import PLACEHOLDER_PASSWORD, cli
    from tests.conftest import reset_caches

    url = f"postgresql+psycopg://finetune:{PLACEHOLDER_PASSWORD}@127.0.0.1:9/finetune"
    monkeypatch.setenv("FINETUNE_DATABASE_URL", url)
    reset_caches()
    try:
        results = [CliRunner().invoke(cli, [command]) for command in ("serve", "migrate", "worker")]
    finally:
        monkeypatch.undo()
        reset_caches()

    for result in results:
        assert result.exit_code == 2 and "placeholder" in result.output, result.output
