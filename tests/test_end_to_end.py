"""The whole lifecycle over HTTP with real processes: `finetune dev` on the embedded SQLite
broker, and cancel/resume with a Celery worker on Redis, with the demo job on the tiny 4-bit
Phi model. (The compose deployment on PostgreSQL and Redis runs in test_deployment.py.)"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from statistics import mean

import httpx
import pytest

from tests.conftest import REDIS_URL, demo_spec, sqlite_only
from tests.processes import running_service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("demo_model")]

needs_redis = pytest.mark.skipif(not REDIS_URL, reason="FINETUNE_TEST_REDIS_URL not set")


def stream_metrics(client: httpx.Client, job_id: str) -> tuple[list[dict], dict]:
    """Read the live SSE stream until the job ends: (metric rows, end event)."""
    rows, end, event = [], None, None
    with client.stream(
        "GET", f"/jobs/{job_id}/logs", headers={"Accept": "text/event-stream"}, timeout=300
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "end":
                    end = data
                    break
                rows.append(data)
    return rows, end


def submit(client: httpx.Client, spec: dict) -> dict:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()


def check_demo_run(client: httpx.Client, job: dict) -> None:
    rows, end = stream_metrics(client, job["id"])

    assert end["status"] == "succeeded", client.get(f"/jobs/{job['id']}/events").json()
    steps = [row["step"] for row in rows]
    assert steps == list(range(1, job["spec"]["training"]["max_steps"] + 1))
    losses = [row["loss"] for row in rows]
    assert mean(losses[-5:]) < mean(losses[:5]) - 0.2  # the loss visibly falls
    assert all(row["learning_rate"] is not None and row["tokens_per_second"] > 0 for row in rows[1:])

    checkpoints = client.get(f"/jobs/{job['id']}/checkpoints").json()["items"]
    training = job["spec"]["training"]
    last = training["max_steps"]
    assert [c["step"] for c in checkpoints] == [last - training["save_steps"], last]
    for checkpoint in checkpoints:
        download = client.get(f"/jobs/{job['id']}/checkpoints/{checkpoint['name']}/download")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == checkpoint["sha256"]
        assert len(download.content) == checkpoint["size_bytes"]
        with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
            assert archive.testzip() is None
            assert f"{checkpoint['name']}/trainer_state.json" in archive.namelist()

    adapter = client.get(f"/jobs/{job['id']}/adapter")
    done = client.get(f"/jobs/{job['id']}").json()
    assert hashlib.sha256(adapter.content).hexdigest() == done["adapter_sha256"]
    with zipfile.ZipFile(io.BytesIO(adapter.content)) as archive:
        assert {
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "adapter/README.md",
        } <= set(archive.namelist())


@sqlite_only
def test_finetune_dev_runs_the_demo_with_no_redis(service_env, tmp_path):
    """The README's laptop path: one `finetune dev` process, SQLite database and broker."""
    env = {k: v for k, v in service_env.items() if k != "FINETUNE_BROKER_URL"}
    with running_service(env, tmp_path, dev=True) as client:
        started = time.monotonic()
        spec = demo_spec(max_steps=30, save_steps=10)
        spec["dataset"]["max_eval_samples"] = 16
        job = submit(client, spec)
        check_demo_run(client, job)
        print(f"demo job took {time.monotonic() - started:.1f} s through finetune dev")


@needs_redis
@sqlite_only
def test_cancel_a_running_job_and_resume_it_from_its_checkpoint(redis_env, tmp_path):
    with running_service(redis_env, tmp_path) as client:
        job = submit(client, demo_spec(max_steps=30, save_steps=10, save_total_limit=5))
        deadline = time.monotonic() + 300
        while not client.get(f"/jobs/{job['id']}/checkpoints").json()["items"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        asked = time.monotonic()
        assert client.post(f"/jobs/{job['id']}/cancel").status_code == 202
        cancelled = wait_for(client, job["id"], {"cancelled", "succeeded", "failed"})
        cancel_seconds = time.monotonic() - asked
        assert cancelled["status"] == "cancelled" and cancelled["current_step"] < 30
        rows_at_cancel = client.get(f"/jobs/{job['id']}/logs").json()["items"]
        assert rows_at_cancel[-1]["step"] == cancelled["current_step"]  # no row after the stop
        print(
            f"FIGURE cancel: training stopped {cancel_seconds:.1f} s after the request, at step "
            f"{cancelled['current_step']}; no metric row after it"
        )
        latest = client.get(f"/jobs/{job['id']}/checkpoints").json()["items"][-1]

        resumed = client.post(f"/jobs/{job['id']}/resume")
        assert resumed.status_code == 202 and resumed.json()["resume_from"] == latest["name"]
        rows_at_resume = client.get(f"/jobs/{job['id']}/logs").json()["items"]
        assert rows_at_resume[-1]["step"] == latest["step"]  # what came after the checkpoint is replayed

        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})
        assert (done["status"], done["attempts"], done["current_step"]) == ("succeeded", 2, 30)
        rows = client.get(f"/jobs/{job['id']}/logs").json()["items"]
        assert [row["step"] for row in rows] == list(range(1, 31))
        resumed_rows = [r for r in rows if r["step"] > latest["step"]]
        assert min(r["time"] for r in resumed_rows) > max(r["time"] for r in rows_at_resume)
        messages = [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["items"]]
        assert f"resume: resuming from {latest['name']}" in messages and "started (attempt 2)" in messages
