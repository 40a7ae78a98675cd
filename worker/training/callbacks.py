"""Trainer callbacks: stream metrics into the database, honour cancellation, zip checkpoints."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.models import utcnow
from app.services import runs
from app.services.runs import Claim
from app.storage import JobFiles
from worker.training.artifacts import zip_directory

log = logging.getLogger(__name__)


class JobProgressCallback(TrainerCallback):
    """Buffers metric rows and writes them at most once per `flush_interval_s`.

    Each write also reads the job's cancel flag, so a cancel is honoured at the next step
    boundary after it is seen, without a database round trip on every step.
    """

    def __init__(self, claim: Claim, files: JobFiles, flush_interval_s: float, stop: threading.Event):
        self.claim = claim
        self.stop = stop
        self.stopped_for_shutdown = False
        self.files = files
        self.flush_interval_s = flush_interval_s
        self.cancelled = False
        self._rows: list[dict[str, Any]] = []
        self._last_flush = 0.0
        self._last_log: tuple[float, int] | None = None  # (time, tokens seen) at the last log
        self._step_ended = time.perf_counter()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_):
        runs.set_total_steps(self.claim, state.max_steps)
        self._last_log = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **_):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:  # e.g. the end-of-training summary
            return
        row = {
            "step": state.global_step,
            "epoch": state.epoch,
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": self._tokens_per_second(state) if "loss" in logs else None,
            "time": utcnow(),
        }
        self._rows.append(row)
        self._maybe_flush(state, control)

    def _tokens_per_second(self, state: TrainerState) -> float | None:
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        previous, self._last_log = self._last_log, (now, tokens)
        if previous is None or not tokens or now <= previous[0]:
            return None
        return (tokens - previous[1]) / (now - previous[0])

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **_):
        self._step_ended = time.perf_counter()  # the trainer's save (if due) starts after this
        self._maybe_flush(state, control)
        if self.stop.is_set() and not self.cancelled:
            # The worker is shutting down: save this step and stop; the job is handed back.
            log.info("job %s: worker stopping; checkpoint at step %d", self.claim.job_id, state.global_step)
            self.stopped_for_shutdown = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_):
        self.flush(state, control)
        name = f"checkpoint-{state.global_step}"
        started = time.perf_counter()
        save_s = started - self._step_ended
        info = zip_directory(self.files.checkpoint_dir(name), self.files.checkpoint_zip(name))
        zip_s = time.perf_counter() - started
        runs.record_checkpoint(
            self.claim,
            name,
            state.global_step,
            str(info.path),
            info.size_bytes,
            info.sha256,
            keep=args.save_total_limit or 1_000_000,
            timings={"save_seconds": round(save_s, 3), "zip_seconds": round(zip_s, 3)},
        )
        log.info(
            "job %s: %s zipped (%d bytes) in %.2f s",
            self.claim.job_id,
            name,
            info.size_bytes,
            time.perf_counter() - started,
        )

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **_):
        self.flush(state, control)

    def _maybe_flush(self, state: TrainerState, control: TrainerControl) -> None:
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush(state, control)

    def flush(self, state: TrainerState, control: TrainerControl) -> None:
        rows, self._rows = self._rows, []
        self._last_flush = time.monotonic()
        try:
            cancel_requested = runs.report_progress(self.claim, state.global_step, rows)
        except SQLAlchemyError as exc:  # database unreachable: keep the rows, retry at the next flush
            log.warning("job %s: could not write progress (%s); retrying", self.claim.job_id, exc)
            self._rows = rows + self._rows
            return
        if cancel_requested and not self.cancelled:
            log.info("job %s: cancel requested; stopping at step %d", self.claim.job_id, state.global_step)
            self.cancelled = True
        if self.cancelled:
            control.should_training_stop = True
