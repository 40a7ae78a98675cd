"""A database or broker that doesn't answer: every route answers 503 with Retry-After (never a
500), with authentication on or off, and a submission during a broker outage keeps its job
queued until the broker answers again."""

from __future__ import annotations

import os

import pytest

from app.models import JobStatus
from tests.conftest import REDIS_URL, bearer, drop_queues, needs_redis, reset_caches, unique_queue
from tests.helpers import register_worker
from tests.test_auth import call, operations
from tests.test_datasets import CHAT, jsonl, queued_messages

pytestmark = pytest.mark.faults

# Nothing listens on port 9 (discard) of the loopback address: connections are refused at once.
DEAD_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:9/none?connect_timeout=2"
DEAD_REDIS = "redis://127.0.0.1:9/0"
IDS = {
    "job_id": "job_" + "0" * 24,
    "name": "checkpoint-1",
    "dataset_id": "ds_" + "0" * 24,
    "file_id": "ds_" + "0" * 24,
    "sample_id": "smp_" + "0" * 24,
    "export_id": "exp_" + "0" * 24,
    "fine_tuning_job_id": "job_" + "0" * 24,
    "model": "ft:microsoft/phi-2:alice::job_" + "0" * 24,
}


@pytest.mark.parametrize("auth", ["on", "off"])
def test_every_route_answers_503_with_retry_after_while_the_database_is_down(
    client, service_env, monkeypatch, auth
):
    """Finding 3: with auth on, the key check ran outside the error handlers: a 500."""
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    checked = operations(client)
    key = bearer("alice")
    monkeypatch.setenv("FINETUNE_DATABASE_URL", DEAD_POSTGRES)
    monkeypatch.setenv("FINETUNE_AUTH", auth)
    monkeypatch.setenv("FINETUNE_SWEEP_INTERVAL_S", "3600")
    reset_caches()
    answers = {}
    with TestClient(create_app(), headers=key, raise_server_exceptions=False) as down:
        for operation in checked:
            if operation == ("POST", "/datasets") or operation == ("POST", "/v1/files"):
                files = {"file": ("chat.jsonl", jsonl(CHAT))}
                data = {"purpose": "fine-tune"} if operation[1] == "/v1/files" else None
                answers[operation] = down.post(operation[1], files=files, data=data)
            elif operation == ("POST", "/v1/fine_tuning/jobs"):
                body = {"model": "microsoft/phi-2", "training_file": IDS["file_id"]}
                answers[operation] = down.post(operation[1], json=body)
            else:
                answers[operation] = call(down, operation, IDS, {})
        stream = down.get(f"/jobs/{IDS['job_id']}/logs", headers={"Accept": "text/event-stream"})

    for operation, response in [*answers.items(), (("GET", "logs stream"), stream)]:
        assert response.status_code == 503, (operation, response.status_code, response.text)
        assert response.headers["retry-after"] == "2", operation
        assert "database" in response.text, operation
    assert len(answers) >= 28


def test_a_submission_during_a_broker_outage_waits_queued_and_is_sent_when_it_answers(
    client, service_env, monkeypatch
):
    """Finding 11: the job was stored as `failed` and the client got a 503."""
    from app.services.sweeper import redispatch_lost

    working_broker = service_env["FINETUNE_BROKER_URL"]
    register_worker("celery@box")  # a free worker: the job's id is sent at once, if it can be
    monkeypatch.setenv("FINETUNE_BROKER_URL", DEAD_REDIS)
    reset_caches()

    response = client.post("/jobs", json={})

    assert response.status_code == 201, response.text
    job = client.get(f"/jobs/{response.json()['id']}").json()
    assert job["status"] == JobStatus.QUEUED and job["error"] is None
    events = [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["items"]]
    assert "the broker did not answer" in events[-1]
    assert redispatch_lost() == []  # still down: the sweeper tries, and tries again later
    assert [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["items"]] == events
    monkeypatch.setenv("FINETUNE_BROKER_URL", working_broker)
    reset_caches()
    assert queued_messages(service_env) == 0

    assert redispatch_lost() == [job["id"]]  # the broker is back: sent once

    assert queued_messages(service_env) == 1
    assert redispatch_lost() == []  # and not again


def test_a_broker_outage_answers_503_with_retry_after_where_work_must_be_sent_now(client, monkeypatch):
    from app.db import session_scope
    from app.models import Job

    with session_scope() as session:
        job = Job(owner="alice", status=JobStatus.SUCCEEDED, spec={}, adapter_path="x")
        session.add(job)
        session.flush()
        job_id = job.id
    monkeypatch.setenv("FINETUNE_BROKER_URL", DEAD_REDIS)
    reset_caches()

    response = client.post(f"/jobs/{job_id}/generate", json={"prompt": "Hi", "wait_s": 0})

    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert response.json()["error"] == "broker_unavailable"


@needs_redis
def test_runs_sharing_one_redis_never_see_each_others_job_ids(redis_env, monkeypatch):
    """Every test run used Redis database 15 and one queue name and wiped it with flushdb():
    two runs on one machine took each other's job ids. Now each test has its own queue."""
    from app.queue import TASK_RUN_JOB, send, waiting_messages
    from app.routing import CPU, class_queue

    monkeypatch.setenv("FINETUNE_BROKER_URL", redis_env["FINETUNE_BROKER_URL"])
    reset_caches()
    send(TASK_RUN_JOB, "job_" + "1" * 24, queue=class_queue(CPU))
    assert waiting_messages(class_queue(CPU)) == 1

    monkeypatch.setenv("FINETUNE_QUEUE", unique_queue())  # another run's
    reset_caches()
    assert waiting_messages(class_queue(CPU)) == 0
    drop_queues(REDIS_URL, os.environ["FINETUNE_QUEUE"])
