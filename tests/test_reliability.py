"""Fault injection with real processes. Each test prints a FIGURE line; docs/reliability.md
collects them (rerun: `pytest -s tests/test_reliability.py`)."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import pytest

from tests.conftest import demo_spec
from tests.processes import finetune_process, running_service, wait_for
from tests.test_end_to_end import needs_redis, submit

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("demo_model")]


@pytest.fixture
def fast_leases(redis_env) -> dict[str, str]:
    return {**redis_env, "FINETUNE_LEASE_S": "3", "FINETUNE_SWEEP_INTERVAL_S": "1"}


def wait_until(predicate, timeout: float = 300, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met")


@needs_redis
def test_kill_9_the_worker_mid_training_and_another_worker_finishes_the_job(fast_leases, tmp_path):
    with running_service(fast_leases, tmp_path, worker=False) as client:
        with finetune_process("worker", fast_leases, tmp_path, name="worker-1") as first:
            job = submit(client, demo_spec(max_steps=40, save_steps=10, save_total_limit=5))
            wait_until(lambda: client.get(f"/jobs/{job['id']}").json()["current_step"] >= 13)
            os.killpg(first.pid, signal.SIGKILL)  # the worker and the child training the job
            killed_at = time.time()
        step_at_kill = client.get(f"/jobs/{job['id']}").json()["current_step"]

        with finetune_process("worker", fast_leases, tmp_path, name="worker-2"):
            done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})

        assert (done["status"], done["current_step"], done["attempts"]) == ("succeeded", 40, 2)
        rows = client.get(f"/jobs/{job['id']}/logs").json()["items"]
        assert [row["step"] for row in rows] == list(range(1, 41))  # no duplicate, no gap
        events = client.get(f"/jobs/{job['id']}/events").json()["items"]
        requeue = next(e for e in events if "stopped renewing its lease" in e["message"])
        resumed_from = requeue["data"]["checkpoint"]
        redone = step_at_kill - int(resumed_from.removeprefix("checkpoint-"))
        assert 0 <= redone <= 10  # at most save_steps
        first_new_row = min(
            datetime.fromisoformat(r["time"]).timestamp() for r in rows if r["step"] > step_at_kill
        )
        print(
            f"FIGURE kill-9 worker: killed at step {step_at_kill}, resumed from {resumed_from}, "
            f"{redone} steps redone, 0 duplicate rows, recovery (kill to first new step) "
            f"{first_new_row - killed_at:.1f} s with lease 3 s and sweep 1 s"
        )


@needs_redis
def test_sigterm_saves_a_checkpoint_and_hands_the_job_back(redis_env, tmp_path):
    with running_service(redis_env, tmp_path, worker=False) as client:
        with finetune_process("worker", redis_env, tmp_path, name="worker-1") as first:
            # no regular checkpoint before the end: the one found later is the shutdown's
            job = submit(client, demo_spec(max_steps=40, save_steps=100))
            wait_until(lambda: client.get(f"/jobs/{job['id']}").json()["current_step"] >= 5)
            first.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
            stopping = time.monotonic()
            first.wait(timeout=120)
            stop_seconds = time.monotonic() - stopping

        handed_back = client.get(f"/jobs/{job['id']}").json()
        checkpoints = client.get(f"/jobs/{job['id']}/checkpoints").json()["items"]
        assert handed_back["status"] == "queued" and len(checkpoints) == 1
        assert handed_back["resume_from"] == checkpoints[0]["name"] and checkpoints[0]["step"] >= 5
        messages = [e["message"] for e in client.get(f"/jobs/{job['id']}/events").json()["items"]]
        assert f"worker shutting down: resuming from {checkpoints[0]['name']}" in messages

        with finetune_process("worker", redis_env, tmp_path, name="worker-2"):
            done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})
        assert (done["status"], done["attempts"]) == ("succeeded", 2)
        steps = [row["step"] for row in client.get(f"/jobs/{job['id']}/logs").json()["items"]]
        assert steps == list(range(1, 41))
        print(
            f"FIGURE SIGTERM: worker exited {stop_seconds:.1f} s after SIGTERM, having saved "
            f"{checkpoints[0]['name']} and re-queued the job; a new worker finished it with 0 steps redone"
        )
