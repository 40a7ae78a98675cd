"""`resources.gpus` > 1: the job trains data-parallel under torchrun. Here the ranks are CPU
processes on gloo (no GPU on CI); the launch, rank 0's database writes, the shared stop
decision and the outcome are the same code a multi-GPU host runs."""

from __future__ import annotations

import threading
import time
import zipfile

import pytest

from app.models import LOCAL_OWNER
from app.services import jobs
from tests.conftest import sqlite_only
from tests.test_training import quick_spec
from worker.tasks import execute_job

# e2e: torchrun starts a process per rank
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("demo_model"), sqlite_only]


def two_process_spec(**training):
    # 32 samples, 8 a step: 4 optimizer steps an epoch, whether on one process or two
    return quick_spec(
        dataset={"max_samples": 32},
        resources={"gpus": 2},
        **{"max_steps": None, "epochs": 1, "batch_size": 4, "gradient_accumulation_steps": 2, **training},
    )


def test_two_processes_train_a_job_and_stop_together_on_a_cancel_and_resume(service_env):
    # a checkpoint every step, so the cancel always finds one to resume from; validation (which
    # defaults to every save) every 4th step: 3 evaluations, not 12
    job = jobs.create_job(two_process_spec(epochs=3, save_steps=1, eval_steps=4), LOCAL_OWNER)
    worker = threading.Thread(target=execute_job, args=(job.id,))
    worker.start()
    deadline = time.monotonic() + 300
    while not jobs.list_metrics(job.id, LOCAL_OWNER, None, 10).items:
        assert time.monotonic() < deadline and worker.is_alive()
        time.sleep(0.2)
    jobs.cancel_job(job.id, LOCAL_OWNER)
    worker.join(timeout=120)  # a rank that missed rank 0's decision would wait for the others forever
    assert not worker.is_alive()
    cancelled = jobs.get_job(job.id, LOCAL_OWNER)
    assert cancelled.status == "cancelled", cancelled.error
    assert cancelled.total_steps == 12  # 32 samples, 8 a step, 3 epochs: as on one process
    assert cancelled.current_step < 12

    jobs.resume_job(job.id, LOCAL_OWNER, None)
    execute_job(job.id)

    done = jobs.get_job(job.id, LOCAL_OWNER)
    assert (done.status, done.current_step, done.attempts) == ("succeeded", 12, 2), done.error
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 100).items
    assert [r.step for r in rows] == list(range(1, 13))  # written once each, by rank 0
    assert all(r.loss and r.tokens_per_second for r in rows)
    assert [c.name for c in jobs.list_checkpoints(job.id, LOCAL_OWNER)] == ["checkpoint-11", "checkpoint-12"]
    with zipfile.ZipFile(jobs.adapter_zip(job.id, LOCAL_OWNER).path) as archive:
        assert "adapter/adapter_model.safetensors" in archive.namelist()
    messages = [e.message for e in jobs.list_events(job.id, LOCAL_OWNER, None, 100).items]
    assert any("items of 4 samples for 2 process(es)" in m for m in messages), messages
