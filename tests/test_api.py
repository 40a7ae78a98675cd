"""The REST API over a real database and a real broker (no worker: rows move through the
same services a worker calls)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest

from app.models import JobStatus, utcnow
from app.services import runs
from tests.conftest import TEST_OWNER
from tests.helpers import metric_stream, register_worker
from worker.training.artifacts import zip_directory


def job_count(client) -> int:
    return len(client.get("/jobs", params={"limit": 1000}).json()["items"])


def submit(client, body=None) -> dict:
    response = client.post("/jobs", json=body if body is not None else {})
    assert response.status_code == 201, response.text
    return response.json()


def test_health_and_openapi_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    assert "/jobs/{job_id}/resume" in client.get("/openapi.json").json()["paths"]


def test_empty_spec_creates_a_queued_seed_recipe_job_and_enqueues_its_id(client, service_env):
    register_worker("celery@laptop")  # the id is sent once a worker is free for it
    job = submit(client)

    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert job["spec"]["base_model"] == "microsoft/phi-2"
    assert job["spec"]["training"]["gradient_accumulation_steps"] == 4
    assert (job["current_step"], job["total_steps"], job["attempts"]) == (0, None, 0)
    broker = service_env["FINETUNE_BROKER_URL"].removeprefix("sqla+sqlite:///")
    with sqlite3.connect(broker) as conn:
        payloads = [row[0] for row in conn.execute("select payload from kombu_message")]
    assert len(payloads) == 1 and job["id"] in payloads[0]


def test_job_ids_are_random_and_unguessable(client):
    ids = {submit(client)["id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) >= 24 for i in ids)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"training": {"epochz": 3}}, "training.epochz"),
        ({"base_model": "http://example.com/x"}, "base_model"),
    ],
)
def test_bad_spec_is_a_422_naming_the_field_and_writes_nothing(client, body, field):
    before = job_count(client)

    response = client.post("/jobs", json=body)

    assert response.status_code == 422
    error = response.json()
    assert error["error"] == "validation_error"
    assert [d["field"] for d in error["detail"]] == [field]
    assert job_count(client) == before


def test_malformed_json_is_a_422_naming_where_it_breaks(client):
    """Issue 18: the error named a field "1" (the parser's position)."""
    response = client.post(
        "/jobs", content=b'{"training": {"max_steps": 5,}}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {
            "field": "body",
            "message": "not valid JSON at character 29: Expecting property name enclosed in double quotes",
            "type": "json_invalid",
        }
    ]


def test_an_empty_body_is_a_422_that_says_what_asks_for_the_default_recipe(client):
    """Issue 18: a POST with no body (or `null`) queued the full default Phi-2 run."""
    for sent in ({}, {"content": b"", "headers": {"content-type": "application/json"}}):
        response = client.post("/jobs", **sent)

        assert response.status_code == 422
        [problem] = response.json()["detail"]
        assert problem["field"] == "body" and "`{}` asks for the default recipe" in problem["message"]
    null = client.post("/jobs", content=b"null", headers={"content-type": "application/json"})
    assert null.status_code == 422 and null.json()["detail"][0]["field"] == "body"
    assert job_count(client) == 0


def test_a_step_count_whose_warmup_would_never_end_is_refused(client):
    """Issue 18: `max_steps: 1000000000` ran with the learning rate stuck near 0 (30 M warmup
    steps)."""
    response = client.post("/jobs", json={"training": {"max_steps": 1_000_000_000}})

    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["field"] == "training.max_steps" and "1000000" in problem["message"]
    assert client.post("/jobs", json={"training": {"max_steps": 1_000_000}}).status_code == 201


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/jobs/job_nope"),
        ("post", "/jobs/job_nope/cancel"),
        ("post", "/jobs/job_nope/resume"),
        ("get", "/jobs/job_nope/logs"),
        ("get", "/jobs/job_nope/events"),
        ("get", "/jobs/job_nope/checkpoints"),
        ("get", "/jobs/job_nope/checkpoints/checkpoint-1/download"),
        ("get", "/jobs/job_nope/adapter"),
    ],
)
def test_unknown_job_is_a_404(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 404
    assert response.json()["error"] == "job_not_found"


def test_cancel_a_queued_job_at_once_and_a_second_cancel_is_a_409(client):
    job = submit(client)

    response = client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    again = client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"] == "invalid_job_state"
    assert runs.claim_job(job["id"]) is None  # a late delivery of its id does not run it


def test_cancel_a_running_job_asks_the_worker_to_stop(client):
    job = submit(client)
    claim = runs.claim_job(job["id"])
    assert claim is not None

    response = client.post(f"/jobs/{job['id']}/cancel")

    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"]
    assert runs.report_progress(claim, 3, []) == runs.CANCEL


def test_pause_stops_a_queued_job_at_once_and_asks_a_running_one(client):
    queued = submit(client)
    paused = client.post(f"/jobs/{queued['id']}/pause")
    assert paused.status_code == 202 and paused.json()["status"] == "paused"
    assert runs.claim_job(queued["id"]) is None  # a late delivery of its id does not run it
    assert client.post(f"/jobs/{queued['id']}/pause").status_code == 409
    resumed = client.post(f"/jobs/{queued['id']}/resume")
    assert resumed.status_code == 202 and resumed.json()["status"] == "queued"

    running = submit(client)
    claim = runs.claim_job(running["id"])
    assert claim is not None
    asked = client.post(f"/jobs/{running['id']}/pause").json()
    assert asked["status"] == "running" and asked["pause_requested"]
    assert runs.report_progress(claim, 3, [], trained_tokens=1234) == runs.PAUSE
    client.post(f"/jobs/{running['id']}/cancel")  # a cancel overrides the pause
    assert runs.report_progress(claim, 4, []) == runs.CANCEL
    runs.finish_job(claim, "paused", "paused at step 4")
    job = client.get(f"/jobs/{running['id']}").json()
    assert (job["status"], job["finished_at"], job["trained_tokens"]) == ("paused", None, 1234)
    cancelled = client.post(f"/jobs/{running['id']}/cancel").json()  # a paused job: at once
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None


def test_an_idempotency_key_returns_the_first_job(client):
    headers = {"Idempotency-Key": "nightly-2026-11-28"}
    first = client.post("/jobs", json={"training": {"max_steps": 5}}, headers=headers)
    again = client.post("/jobs", json={"training": {"max_steps": 5}}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/jobs", json={"training": {"max_steps": 6}}, headers=headers)
    assert other.status_code == 422 and other.json()["error"] == "idempotency_key_reused"
    # without a key, the same spec twice is two jobs
    assert client.post("/jobs", json={}).json()["id"] != client.post("/jobs", json={}).json()["id"]
    assert len(client.get("/jobs").json()["items"]) == 3


@pytest.mark.parametrize("state", ["queued", "running", "succeeded"])
def test_resume_is_a_409_unless_failed_or_cancelled(client, state):
    job = submit(client)
    if state != "queued":
        claim = runs.claim_job(job["id"])
    if state == "succeeded":
        runs.finish_job(claim, "succeeded", "done")
    before = client.get(f"/jobs/{job['id']}").json()

    response = client.post(f"/jobs/{job['id']}/resume")

    assert response.status_code == 409
    after = client.get(f"/jobs/{job['id']}").json()
    assert (after["status"], after["updated_at"]) == (before["status"], before["updated_at"])


def test_resume_body_is_validated(client):
    job = submit(client)
    client.post(f"/jobs/{job['id']}/cancel")

    bad = client.post(f"/jobs/{job['id']}/resume", json={"checkpoint": "../../etc/passwd"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "checkpoint"
    missing = client.post(f"/jobs/{job['id']}/resume", json={"checkpoint": "checkpoint-7"})
    assert missing.status_code == 404 and missing.json()["error"] == "checkpoint_not_found"
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"


def test_list_jobs_pages_with_a_cursor_and_filters_by_status(client):
    ids = [submit(client)["id"] for _ in range(5)]
    client.post(f"/jobs/{ids[0]}/cancel")

    seen, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each once
    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()["items"]
    assert [job["id"] for job in cancelled] == [ids[0]]
    assert client.get("/jobs", params={"status": "sleeping"}).status_code == 422
    assert client.get("/jobs", params={"cursor": "garbage"}).status_code == 422


def _running_job_with_metrics(client, steps: int) -> runs.Claim:
    claim = runs.claim_job(submit(client)["id"])
    rows = [
        {
            "step": s,
            "epoch": s / 10,
            "loss": 3.0 - s / 10,
            "learning_rate": 1e-4,
            "grad_norm": 0.5,
            "tokens_per_second": 1000.0,
            "time": utcnow(),
        }
        for s in range(1, steps + 1)
    ]
    runs.report_progress(claim, steps, rows)
    return claim


def test_logs_as_pages_as_text_and_as_csv(client):
    job_id = _running_job_with_metrics(client, 5).job_id

    page = client.get(f"/jobs/{job_id}/logs", params={"after_step": 1, "limit": 2}).json()
    assert [row["step"] for row in page["items"]] == [2, 3] and page["next"] == "3"
    assert set(page["items"][0]) >= {
        "step",
        "epoch",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "time",
    }
    text = client.get(f"/jobs/{job_id}/logs", params={"format": "text"}).text.splitlines()
    assert len(text) == 5 and "step=5" in text[-1] and "loss=2.5000" in text[-1]
    table = list(
        csv.DictReader(io.StringIO(client.get(f"/jobs/{job_id}/logs", params={"format": "csv"}).text))
    )
    assert [row["step"] for row in table] == ["1", "2", "3", "4", "5"] and float(table[-1]["loss"]) == 2.5


def test_log_stream_sends_rows_from_last_event_id_and_ends_with_the_job(client):
    claim = _running_job_with_metrics(client, 4)
    runs.finish_job(claim, "failed", "boom", error="boom")
    job_id = claim.job_id

    *rows, end = metric_stream(client, job_id, last_event_id="2")
    assert [(e.event, e.id, e.json()["step"]) for e in rows] == [("metric", "3", 3), ("metric", "4", 4)]
    assert end.event == "end" and end.json()["status"] == "failed"


def test_an_evaluation_that_arrives_after_its_steps_row_reaches_live_streams(client):
    """Finding 4: eval_loss was merged into a row the stream had already sent, so live charts
    and `logs --follow` never showed it."""
    import asyncio

    from app.api.logs import metric_events

    claim = _running_job_with_metrics(client, 2)

    async def watch() -> list[tuple[str, int | None, float | None]]:
        seen = []
        stream = metric_events(claim.job_id, TEST_OWNER, -1)
        async for event in stream:
            if event["event"] == "end":
                seen.append(("end", None, None))
                break
            row = json.loads(event["data"])
            seen.append((event["event"], row["step"], row["eval_loss"]))
            if len(seen) == 2:  # both rows sent; now the evaluation of step 2, then step 3
                runs.report_progress(claim, 2, [{"step": 2, "eval_loss": 1.5, "time": utcnow()}])
                runs.report_progress(claim, 3, [{"step": 3, "loss": 2.0, "time": utcnow()}])
                runs.finish_job(claim, "succeeded", "finished")
        return seen

    assert asyncio.run(watch()) == [
        ("metric", 1, None),
        ("metric", 2, None),
        ("eval", 2, 1.5),
        ("metric", 3, None),
        ("end", None, None),
    ]
    # a client resuming after step 2 gets step 2's evaluation again, then what follows
    # (the eval event comes first with no `id:` line: its id is "", no earlier id to keep)
    events = metric_stream(client, claim.job_id, last_event_id="2")
    assert [(e.event, e.id) for e in events] == [("eval", ""), ("metric", "3"), ("end", "3")]
    assert (events[0].json()["step"], events[0].json()["eval_loss"]) == (2, 1.5)
    assert events[1].json()["step"] == 3


def test_logs_follow_shows_an_evaluation_merged_before_the_stream_read_its_row(client, capsys):
    """CI once: a job so fast that its last step's row and that step's evaluation reached the
    database in one write (the worker's final flush) made `logs --follow` print `eval 8` and
    `eval 16` but no `eval 24`: the stream sent an `eval` event only for an evaluation that
    arrived after it had sent the step's row."""
    import asyncio

    from app.api.logs import metric_events
    from app.client import commands
    from app.client.http import ServiceClient

    claim = _running_job_with_metrics(client, 1)
    step_2 = {"step": 2, "loss": 2.0, "time": utcnow()}

    async def watch() -> list[tuple[str, int, float | None]]:
        seen = []
        async for event in metric_events(claim.job_id, TEST_OWNER, -1):
            if event["event"] == "end":
                return seen
            row = json.loads(event["data"])
            seen.append((event["event"], row["step"], row["eval_loss"]))
            if len(seen) == 1:  # step 1 sent; the last step's row and evaluation in one write
                runs.report_progress(claim, 2, [step_2, {"step": 2, "eval_loss": 1.5, "time": utcnow()}])
                runs.finish_job(claim, "succeeded", "finished")
        raise AssertionError("the stream ended without an end event")

    assert asyncio.run(watch()) == [("metric", 1, None), ("metric", 2, 1.5), ("eval", 2, 1.5)]

    # the same from the command line, following the finished job from its start
    service = ServiceClient("http://testserver")
    service.http.close()
    service.http = client  # the app in-process (closed by its fixture)
    commands._follow(service, claim.job_id)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["step", "1"],
        ["step", "2"],
        ["eval", "2"],
        [claim.job_id, "succeeded"],
    ]
    assert "eval 1.5000" in lines[2]
    # a client resuming after step 2 gets its evaluation again (it may have missed it)
    events = metric_stream(client, claim.job_id, last_event_id="2")
    assert [(e.event, e.json().get("step")) for e in events] == [("eval", 2), ("end", None)]


def test_metric_rows_are_unique_per_step_and_merge(client):
    claim = _running_job_with_metrics(client, 2)
    job_id = claim.job_id

    runs.report_progress(claim, 2, [{"step": 2, "loss": 9.0, "time": utcnow()}])
    runs.report_progress(claim, 2, [{"step": 2, "eval_loss": 1.5, "time": utcnow()}])

    rows = client.get(f"/jobs/{job_id}/logs").json()["items"]
    assert [(r["step"], r["loss"], r["eval_loss"], r["learning_rate"]) for r in rows] == [
        (1, 2.9, None, 1e-4),
        (2, 9.0, 1.5, 1e-4),
    ]


def _fake_checkpoint(data_dir: Path, claim: runs.Claim, step: int) -> None:
    """A checkpoint folder and zip as the trainer callback writes them."""
    job_id = claim.job_id
    name = f"checkpoint-{step}"
    folder = data_dir / "jobs" / job_id / "output" / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes([step]) * 100)
    info = zip_directory(folder, data_dir / "jobs" / job_id / "checkpoints" / f"{name}.zip")
    runs.record_checkpoint(claim, name, step, str(info.path), info.size_bytes, info.sha256, keep=2)


def test_checkpoints_are_listed_pruned_downloaded_and_resumed_from(client, service_env):
    data_dir = Path(service_env["FINETUNE_DATA_DIR"])
    claim = _running_job_with_metrics(client, 30)
    job_id = claim.job_id
    for step in (10, 20, 30):
        _fake_checkpoint(data_dir, claim, step)
    runs.finish_job(claim, "failed", "worker died", error="worker died")

    listed = client.get(f"/jobs/{job_id}/checkpoints").json()["items"]
    assert [c["name"] for c in listed] == ["checkpoint-20", "checkpoint-30"]  # save_total_limit 2
    assert not (data_dir / "jobs" / job_id / "checkpoints" / "checkpoint-10.zip").exists()
    download = client.get(f"/jobs/{job_id}/checkpoints/checkpoint-20/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert hashlib.sha256(download.content).hexdigest() == listed[0]["sha256"]
    assert client.get(f"/jobs/{job_id}/checkpoints/..%2F..%2Fsecrets/download").status_code == 404
    assert client.get(f"/jobs/{job_id}/adapter").status_code == 404

    resumed = client.post(f"/jobs/{job_id}/resume", json={"checkpoint": "checkpoint-20"})

    assert resumed.status_code == 202
    job = resumed.json()
    assert (job["status"], job["resume_from"], job["current_step"], job["error"]) == (
        "queued",
        "checkpoint-20",
        20,
        None,
    )
    assert [c["name"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()["items"]] == ["checkpoint-20"]
    assert not (data_dir / "jobs" / job_id / "output" / "checkpoint-30").exists()
    assert client.get(f"/jobs/{job_id}/logs", params={"limit": 1000}).json()["items"][-1]["step"] == 20
    events = [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["items"]]
    assert events[-1] == "resume: resuming from checkpoint-20"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/jobs", "GET, POST"),
        ("PUT", "/jobs/job_000000000000000000000000", "GET"),
        ("GET", "/jobs/job_000000000000000000000000/cancel", "POST"),
        ("PATCH", "/datasets/ds_000000000000000000000000", "DELETE, GET"),
        ("DELETE", "/v1/fine_tuning/jobs", "GET, POST"),
    ],
)
def test_a_method_not_allowed_is_a_405_naming_the_allowed_ones(client, method, path, allowed):
    """Finding 11: 405 answers lacked the Allow header."""
    response = client.request(method, path)

    assert response.status_code == 405
    assert response.headers["allow"] == allowed


def _job_in(client, state: str) -> dict:
    """A job of TEST_OWNER's in `state` (running: claimed by a worker; paused, succeeded,
    failed, cancelled: finished by that worker so)."""
    job = submit(client)
    if state != "queued":
        claim = runs.claim_job(job["id"])
        if state != "running":
            runs.finish_job(claim, state, state)
    return client.get(f"/jobs/{job['id']}").json()


@pytest.mark.parametrize("state", list(JobStatus))
def test_a_job_lists_exactly_the_actions_the_api_takes_in_its_status(client, state):
    """Issue 17: the dashboard and the CLI read `actions` instead of copying the rules, so it
    must say what the API does: every listed action is taken (2xx), every other one is a 409
    that changes nothing."""
    for action in ("pause", "cancel", "resume"):
        job = _job_in(client, state)
        assert job["status"] == state

        response = client.post(f"/jobs/{job['id']}/{action}")

        if action in job["actions"]:
            assert response.status_code == 202, (state, action, response.json())
        else:
            assert response.status_code == 409, (state, action)
            assert response.json()["error"] == "invalid_job_state"
            assert client.get(f"/jobs/{job['id']}").json()["updated_at"] == job["updated_at"]


def test_a_stop_already_asked_for_is_not_offered_again(client):
    job = _job_in(client, "running")
    assert job["actions"] == ["pause", "cancel"]
    assert client.post(f"/jobs/{job['id']}/pause").json()["actions"] == ["cancel"]
    assert client.post(f"/jobs/{job['id']}/cancel").json()["actions"] == []
