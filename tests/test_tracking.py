"""Experiment tracking (issue 28 item 8): a job's `integrations` (OpenAI's W&B one, and MLflow)
are refused unless the server has that tracker, and shown on the job; a tracker that is down
never fails or holds up a job. A real run into a real `mlflow server` and W&B offline:
tests/test_training.py::test_lora_weights_move_the_4bit_base_does_not_and_trackers_get_the_run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from app.models import LOCAL_OWNER
from app.services import jobs, runs
from app.spec import JobSpec
from tests.conftest import demo_spec, reset_caches, sqlite_only
from tests.helpers import wait_until
from tests.processes import free_port

MLFLOW = {"type": "mlflow", "mlflow": {"experiment": "issue-28", "run_name": "demo"}}
WANDB = {"type": "wandb", "wandb": {"project": "finetune-tests", "tags": ["demo"]}}


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on loopback with a SQLite store and its artifacts under `folder`: its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"),
        *("--artifacts-destination", str(folder / "artifacts")),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    # no background job runner (a pool of huey processes): tracking needs none
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with (folder / "server.log").open("wb") as log:
        server = subprocess.Popen(
            command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:

            def healthy() -> bool:
                try:
                    return httpx.get(f"{url}/health", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(healthy, 120, what="mlflow server to answer /health")
            yield url
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows a W&B offline run file (`run-<id>.wandb`, the LevelDB log format of
    32 KiB blocks, each record a `wandb_internal_pb2.Record`) holds, without W&B's `_` keys."""
    from wandb.proto import wandb_internal_pb2

    data, rows = run_file.read_bytes(), []
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's zero-filled tail
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    return rows


def configure(monkeypatch, **env: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_caches()


def test_a_job_may_ask_only_for_trackers_the_server_has(client, monkeypatch):
    spec = demo_spec(max_steps=2)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reset_caches()

    refused = client.post("/jobs", json={**spec, "integrations": [MLFLOW]})
    assert refused.status_code == 422
    [problem] = refused.json()["detail"]
    assert problem["field"] == "integrations" and "FINETUNE_MLFLOW_TRACKING_URI" in problem["message"]
    openai = {
        "model": spec["base_model"],
        "training_file": spec["dataset"]["source"],
        "integrations": [WANDB],
    }
    refused = client.post("/v1/fine_tuning/jobs", json=openai)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "integrations" and "WANDB_API_KEY" in refused.text
    twice = client.post("/jobs", json={**spec, "integrations": [MLFLOW, MLFLOW]})
    assert twice.status_code == 422 and "one integration of each type" in twice.text

    configure(monkeypatch, FINETUNE_MLFLOW_TRACKING_URI="http://127.0.0.1:1", WANDB_MODE="offline")
    job = client.post("/v1/fine_tuning/jobs", json={**openai, "integrations": [WANDB, MLFLOW]})
    assert job.status_code == 200, job.text
    # as OpenAI shows them (its client's FineTuningJobWandbIntegrationObject), MLflow's beside
    assert job.json()["integrations"] == [
        {
            "type": "wandb",
            "wandb": {"project": "finetune-tests", "name": None, "entity": None, "tags": ["demo"]},
        },
        {"type": "mlflow", "mlflow": {"experiment": "issue-28", "run_name": "demo"}},
    ]
    native = client.get(f"/jobs/{job.json()['id']}").json()["spec"]["integrations"]
    assert [i["type"] for i in native] == ["wandb", "mlflow"]
    # a server that no longer has the tracker still reads the stored job (the worker says it)
    configure(monkeypatch, FINETUNE_MLFLOW_TRACKING_URI="", WANDB_MODE="")
    assert client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").status_code == 200


@sqlite_only
def test_a_tracker_that_is_down_is_dropped_at_once_and_said(service_env, monkeypatch, tmp_path):
    """Tracking on a closed loopback port: the block around training is not held up (mlflow's
    own client would retry for about four minutes), and one event says why."""
    from worker.training.tracking import tracking

    closed = free_port()
    configure(monkeypatch, FINETUNE_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed}")
    spec = JobSpec.model_validate({**demo_spec(max_steps=2), "integrations": [MLFLOW]})
    job = jobs.create_job(spec, LOCAL_OWNER)
    claim = runs.claim_job(job.id)
    assert claim is not None
    from app.settings import get_settings

    started = time.monotonic()
    with tracking(claim, get_settings(), tmp_path) as tracker:
        runs.report_progress(claim, 1, [{"step": 1, "loss": 2.0}])
        tracker.log_adapter(tmp_path / "adapter.zip")
    took = time.monotonic() - started

    assert took < 30, took
    events = [e.message for e in jobs.list_events(job.id, LOCAL_OWNER, None, 100).items]
    failed = [m for m in events if m.startswith("tracking: MLflow failed")]
    assert len(failed) == 1 and failed[0].endswith("the job goes on without it"), events
