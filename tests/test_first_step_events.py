"""A job says when its first step was done and when its first row was logged (issue 30): the
worker's real progress callback on a real claim in SQLite, driven as the Trainer drives it."""

from __future__ import annotations

import threading

from transformers import TrainerControl, TrainerState, TrainingArguments

from app.models import LOCAL_OWNER
from app.services import jobs
from app.services.runs import claim_job
from app.spec import JobSpec
from app.storage import job_files
from tests.conftest import demo_spec, sqlite_only
from worker.training.callbacks import JobProgressCallback


@sqlite_only
def test_the_first_step_and_the_first_row_are_events_once(service_env, tmp_path):
    job = jobs.create_job(JobSpec.model_validate(demo_spec()), LOCAL_OWNER)
    claim = claim_job(job.id)
    assert claim is not None
    callback = JobProgressCallback(claim, job_files(job.id), 0.0, threading.Event())
    args, control = TrainingArguments(output_dir=str(tmp_path)), TrainerControl()
    state = TrainerState(max_steps=3)
    callback.on_train_begin(args, state, control)
    try:
        for step in (1, 2, 3):  # logging_steps 2: rows at steps 2 and 3 (the last)
            state.global_step = step
            callback.on_step_end(args, state, control)
            if step >= 2:
                callback.on_log(args, state, control, logs={"loss": 1.0, "learning_rate": 1e-4})
    finally:
        callback.on_train_end(args, state, control)

    events = [e for e in jobs.list_events(job.id, LOCAL_OWNER, None, 100).items]
    firsts = [e for e in events if e.message.startswith("first ")]
    assert [e.message.split(" s after")[0].rsplit(" ", 1)[0] for e in firsts] == [
        "first step (step 1) done",
        "first row logged (step 2)",
    ]
    step_event, row_event = firsts
    assert step_event.data is not None and row_event.data is not None
    assert step_event.data["step"] == 1 and row_event.data["step"] == 2
    assert 0 <= step_event.data["first_step_seconds"] <= row_event.data["first_row_seconds"]
