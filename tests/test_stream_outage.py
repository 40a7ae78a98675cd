"""Open streams across a database outage (issue 27, item 5): a private Postgres server stops
while live metric streams and an OpenAI-style completion stream are open. Each keeps its
connection and goes on where it was once the server is back, or, when the outage outlasts
FINETUNE_STREAM_OUTAGE_S, ends cleanly saying where to resume: never a broken chunked body.
Each test prints a FIGURE line for docs/reliability.md."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from sqlalchemy import select, update

from app.models import JobStatus, Sample, SampleStatus, utcnow
from app.services import runs
from tests.conftest import POSTGRES_URL, reset_caches, sqlite_only
from tests.helpers import wait_until
from tests.processes import running_service
from tests.servers import PostgresServer, postgres_server

# The service's own database is a private Postgres server (service_env's SQLite is replaced).
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.faults,
    sqlite_only,
    pytest.mark.skipif(not POSTGRES_URL, reason="FINETUNE_TEST_POSTGRES_URL not set"),
]

DOWN_S = 2  # the short outage; each stream notices it within a poll


class Stream(threading.Thread):
    """A request whose streamed answer is read line by line in a thread, to its end: `error`
    is whatever cut it (httpx raises on a chunked body that ends early)."""

    def __init__(self, client: httpx.Client, method: str, path: str, **kwargs) -> None:
        super().__init__(daemon=True)
        self.request = (method, path, kwargs)
        self.http = httpx.Client(base_url=client.base_url, headers=client.headers, timeout=60)
        self.lines: list[str] = []
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        method, path, kwargs = self.request
        try:
            with self.http.stream(method, path, **kwargs) as response:
                assert response.status_code == 200, response.read()
                self.lines.extend(response.iter_lines())
        except Exception as exc:
            self.error = exc
        finally:
            self.http.close()

    def finish(self) -> None:
        self.join(30)
        assert not self.is_alive(), self.lines[-5:]
        assert self.error is None, f"{self.error!r} after {self.lines[-5:]}"

    def comments(self) -> list[str]:
        return [line[1:].strip() for line in self.lines if line.startswith(":") and line != ": ping"]

    def field(self, name: str) -> list[str]:
        return [line.split(":", 1)[1].strip() for line in self.lines if line.startswith(f"{name}:")]

    def steps(self) -> list[int]:
        """The steps of the `metric` events (an `id:` line is sent with each, and only then)."""
        return [int(value) for value in self.field("id")]


def metric_stream(client: httpx.Client, job_id: str, **headers: str) -> Stream:
    headers = {"Accept": "text/event-stream", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return Stream(client, "GET", f"/jobs/{job_id}/logs", headers=headers)


def completion_stream(client: httpx.Client, model: str) -> Stream:
    return Stream(client, "POST", "/v1/completions", json={"model": model, "prompt": "Hi", "stream": True})


def write_rows(claim: runs.Claim, steps: range) -> None:
    rows = [{"step": s, "loss": 3.0 - s / 10, "time": utcnow()} for s in steps]
    runs.report_progress(claim, steps[-1], rows)


def write_answer(completion: str, **values: object) -> None:
    """What the sampler writes, as it writes it: the text so far (then its final state)."""
    from app.db import session_scope

    with session_scope() as session:
        session.execute(update(Sample).values(completion=completion, **values))


def answered_so_far(stream: Stream) -> str:
    chunks = [json.loads(data) for data in stream.field("data") if data != "[DONE]"]
    return "".join(choice["text"] for chunk in chunks for choice in chunk.get("choices", []))


@contextmanager
def service_on_private_postgres(
    service_env: dict[str, str], tmp_path, monkeypatch, **settings: str
) -> Iterator[tuple[PostgresServer, httpx.Client, runs.Claim, str]]:
    """The API (no worker) on a Postgres server of the test's own; a running job with rows 1-4,
    and the model of a finished job with an adapter, for a completion that the test answers."""
    from app import migrate

    with postgres_server() as postgres:
        monkeypatch.setenv("FINETUNE_DATABASE_URL", postgres.url)
        reset_caches()
        migrate.upgrade()
        env = {**service_env, "FINETUNE_DATABASE_URL": postgres.url, "FINETUNE_SWEEP_INTERVAL_S": "3600"}
        with running_service({**env, **settings}, tmp_path, worker=False) as client:
            claim = runs.claim_job(client.post("/jobs", json={}).json()["id"])
            finished = runs.claim_job(client.post("/jobs", json={}).json()["id"])
            assert claim and finished
            adapter = {"path": "adapter", "size_bytes": 1, "sha256": "0" * 64}
            runs.finish_job(finished, JobStatus.SUCCEEDED, "done", adapter=adapter)
            write_rows(claim, range(1, 5))
            yield postgres, client, claim, client.get("/v1/models").json()["data"][0]["id"]


def open_streams(client: httpx.Client, claim: runs.Claim, model: str) -> tuple[list[Stream], Stream]:
    """Three metric streams (one resumed after step 2) and a completion stream that has sent
    "Hello", each having read all there is."""
    from app.db import session_scope

    metrics = [metric_stream(client, claim.job_id) for _ in range(2)]
    metrics.append(metric_stream(client, claim.job_id, last_event_id="2"))
    completion = completion_stream(client, model)
    with session_scope() as session:
        wait_until(lambda: session.scalar(select(Sample.id)), 10, what="the completion's sample")
    write_answer("Hello")
    wait_until(
        lambda: all(s.steps()[-1:] == [4] for s in metrics) and answered_so_far(completion) == "Hello",
        10,
        what="every stream to have read all there is",
    )
    return metrics, completion


def test_open_streams_wait_through_a_postgres_restart_and_go_on_where_they_were(
    service_env, tmp_path, monkeypatch
):
    """9 open SSE streams ended with an incomplete chunked body when Postgres stopped."""
    with service_on_private_postgres(service_env, tmp_path, monkeypatch) as (postgres, client, claim, model):
        metrics, completion = open_streams(client, claim, model)

        postgres.stop()
        waiting = lambda: all(s.comments() or not s.is_alive() for s in metrics)  # noqa: E731
        wait_until(waiting, 10, what="each metric stream to say it waits (or to end)")
        time.sleep(DOWN_S)
        postgres.start()
        write_rows(claim, range(5, 9))
        runs.finish_job(claim, JobStatus.SUCCEEDED, "done")
        write_answer("Hello world", status=SampleStatus.SUCCEEDED, finish_reason="stop")
        for stream in [*metrics, completion]:
            stream.finish()

    for stream, first in zip(metrics, (1, 1, 3), strict=True):
        assert stream.steps() == list(range(first, 9))  # each row once, in order
        assert stream.comments() == ["database unavailable; waiting up to 60 s", "database available again"]
        assert stream.field("event")[-1] == "end"
        assert json.loads(stream.field("data")[-1]) == {"status": "succeeded", "error": None}
    assert answered_so_far(completion) == "Hello world"
    assert completion.field("data")[-1] == "[DONE]"
    print(
        f"FIGURE Postgres stopped for {DOWN_S} s under 3 open metric streams and 1 completion "
        "stream: all 4 kept their connections; each metric stream said `database unavailable` "
        "and `database available again` (SSE comments), then sent the rows written meanwhile "
        "(8 of 8, each once) and `end`; the completion went on to `[DONE]`"
    )


def test_an_outage_longer_than_the_bound_ends_streams_cleanly_with_where_to_resume(
    service_env, tmp_path, monkeypatch
):
    settings = {"FINETUNE_STREAM_OUTAGE_S": "1", "FINETUNE_COMPLETION_TIMEOUT_S": "4"}
    with service_on_private_postgres(service_env, tmp_path, monkeypatch, **settings) as (
        postgres,
        client,
        claim,
        model,
    ):
        metrics, completion = open_streams(client, claim, model)

        postgres.stop()
        stopped = time.monotonic()
        for stream in [*metrics, completion]:
            stream.finish()
        ended = time.monotonic() - stopped
        postgres.start()
        write_rows(claim, range(5, 7))
        runs.finish_job(claim, JobStatus.SUCCEEDED, "done")
        resumed = metric_stream(client, claim.job_id, last_event_id="4")
        resumed.finish()

    for stream in metrics:
        assert stream.steps()[-1] == 4
        assert stream.comments()[-1] == "database still unavailable; reconnect with Last-Event-ID: 4"
        assert stream.field("retry") == ["2000"]
        assert "end" not in stream.field("event")
    error = json.loads(completion.field("data")[-1])["error"]
    assert error["code"] == "database_unavailable", error
    assert resumed.steps() == [5, 6] and resumed.field("event")[-1] == "end"
    print(
        f"FIGURE Postgres stopped for longer than FINETUNE_STREAM_OUTAGE_S (1 s here, 60 s by "
        f"default) under 3 metric streams and 1 completion stream: all ended cleanly within "
        f"{ended:.1f} s, the metric streams with `reconnect with Last-Event-ID: 4` (no `end`), "
        "the completion with an `error` event `database_unavailable`; reconnecting from step 4 "
        "once it was back gave the 2 rows written since, each once"
    )
