"""The README's laptop path over HTTP with real processes: `finetune dev` on the embedded
SQLite broker and database, with the demo job on the tiny 4-bit Phi model. (The compose
deployment on PostgreSQL and Redis, with cancel and resume, runs in test_deployment.py.)"""

from __future__ import annotations

import hashlib
import io
import re
import time
import zipfile
from statistics import mean

import httpx
import pytest

from app.queue import job_queue
from app.services.workers import live_workers
from tests.conftest import demo_spec, sqlite_only
from tests.helpers import metric_stream
from tests.processes import running_service
from worker.gpus import visible_gpus

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("demo_model")]


def stream_metrics(client: httpx.Client, job_id: str) -> tuple[list[dict], dict]:
    """Read the live SSE stream until the job ends: (metric rows, with the evaluation results
    that arrived after their step's row merged in, end event)."""
    rows: list[dict] = []
    *sent, end = metric_stream(client, job_id)
    assert end.event == "end", end
    for event in sent:
        data = event.json()
        if event.event == "eval":  # a row already sent, now with its eval_loss
            rows = [data if row["step"] == data["step"] else row for row in rows]
        else:
            rows.append(data)
    return rows, end.json()


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
    evaluated = [row["step"] for row in rows if row["eval_loss"] is not None]
    eval_steps = job["spec"]["training"]["eval_steps"] or job["spec"]["training"]["save_steps"]
    assert evaluated == list(range(eval_steps, steps[-1] + 1, eval_steps))  # live, as they arrived

    events = client.get(f"/jobs/{job['id']}/events").json()["items"]
    [finished] = [e["message"] for e in events if (e["data"] or {}).get("status") == "succeeded"]
    # a sentence, not a dict
    assert re.fullmatch(rf"finished after {steps[-1]} steps: train loss [0-9.]+, eval loss [0-9.]+", finished)

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
        # samples of up to 128 tokens and 8 to validate on: the same path as the demo's 256 and
        # 64, at a third of the cost (the loss still visibly falls in 30 steps)
        spec = demo_spec(max_steps=30, save_steps=10, eval_samples=8, max_seq_length=128)
        job = submit(client, spec)
        check_demo_run(client, job)
        print(f"demo job took {time.monotonic() - started:.1f} s through finetune dev")
        # the worker registered itself with the GPUs it sees, for the API's pre-flight check
        [worker] = live_workers(job_queue())
        assert worker.name.startswith("celery@") and worker.gpus == visible_gpus()

        # preference tuning on the real oasst1 trees: their replies' ranks make the pairs
        dpo = demo_spec(
            max_steps=2, save_steps=2, max_seq_length=128, batch_size=2, gradient_accumulation_steps=2
        )
        dpo["method"] = {"type": "dpo"}
        dpo["dataset"] = {"source": dpo["dataset"]["validation_source"], "max_samples": 8}
        job = submit(client, dpo)
        rows, end = stream_metrics(client, job["id"])
        assert end["status"] == "succeeded", client.get(f"/jobs/{job['id']}/events").json()
        assert [row["step"] for row in rows] == [1, 2] and all(
            "rewards/margins" in r["figures"] for r in rows
        )
        events = [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["items"]]
        assert "data ready: 8 preference pairs, 0 validation pairs" in events
