"""Trainer callbacks: stream metrics into the database, honour cancellation, zip checkpoints.

Metric rows go to the database from a background thread (ProgressWriter), so a slow or
unreachable database never stalls training: rows wait in memory and are written once it
answers. Only a checkpoint waits for the database, since the rows up to it and its record
must be stored before the run may continue past it."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.db import retry_while_unreachable
from app.ids import checkpoint_name
from app.models import utcnow
from app.services import runs
from app.services.runs import Claim, LeaseLost
from app.storage import JobFiles
from worker.training.artifacts import zip_directory

log = logging.getLogger(__name__)


class ProgressWriter:
    """Writes buffered metric rows and the current step at most once per `interval_s`, from
    its own thread; each write also reads whether a cancel or a pause was asked for. A failed
    write keeps its rows for the next one. A lost lease is kept and raised in the training
    thread (`check`)."""

    def __init__(self, claim: Claim, interval_s: float):
        self.claim = claim
        self.interval_s = interval_s
        self.requested: str | None = None  # CANCEL or PAUSE, once the database asks for it
        self._rows: list[dict[str, Any]] = []
        self._step = 0
        self._tokens: int | None = None
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one write at a time, in order
        self._wake = threading.Event()
        self._closed = False
        self._lease_lost: LeaseLost | None = None
        self._thread = threading.Thread(target=self._run, name=f"progress-{claim.job_id}", daemon=True)
        self._thread.start()

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)
        self._wake.set()

    def step(self, step: int, tokens: int | None = None) -> None:
        with self._lock:
            self._step = step
            self._tokens = tokens or self._tokens
        self._wake.set()

    def check(self) -> None:
        """Raise LeaseLost in the caller if a write found the lease gone."""
        if self._lease_lost is not None:
            raise self._lease_lost

    def _run(self) -> None:
        last = 0.0
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            time.sleep(max(0.0, last + self.interval_s - time.monotonic()))
            last = time.monotonic()
            try:
                self.write()
            except SQLAlchemyError as exc:  # unreachable or locked: the rows wait for the next write
                log.warning("job %s: could not write progress (%s); retrying", self.claim.job_id, exc)
                time.sleep(min(self.interval_s * 4, 5.0) or 0.5)
                self._wake.set()
            except LeaseLost as exc:
                self._lease_lost = exc
                return

    def write(self) -> None:
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                step, tokens = self._step, self._tokens
            try:
                requested = runs.report_progress(self.claim, step, rows, tokens)
                if self.requested != CANCEL:  # a cancel overrides an earlier pause
                    self.requested = requested or self.requested
            except BaseException:
                with self._lock:
                    self._rows = rows + self._rows
                raise

    @retry_while_unreachable
    def write_now(self) -> None:
        """Write everything buffered before returning, waiting out a database outage."""
        self.write()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)


# Why a run stops before its last step: a user's cancel or pause, or the worker shutting down.
CANCEL, PAUSE, SHUTDOWN = runs.CANCEL, runs.PAUSE, runs.SHUTDOWN


def shared_decision(decision: str | None) -> str | None:
    """Rank 0's decision to stop, on every rank of a data-parallel run (one small collective a
    step), so all ranks stop, and save, at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def apply_decision(decision: str | None, control: TrainerControl) -> str | None:
    """Stop on a cancel; save this step and stop on a pause or a shutdown."""
    if decision is not None:
        control.should_training_stop = True
    if decision in (PAUSE, SHUTDOWN):
        control.should_save = True
    return decision


class FollowerCallback(TrainerCallback):
    """On ranks other than 0 of a data-parallel run: no database, only rank 0's decisions."""

    stopped: str | None = None

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **_):
        self.stopped = apply_decision(shared_decision(None), control)

    def close(self) -> None:
        pass


def method_figures(logs: dict[str, Any]) -> dict[str, float] | None:
    """A method's own figures in a Trainer log: the names with a `/` (`rewards/chosen`,
    `eval_rewards/accuracies`, … as DPO logs them, TRL's way); None when there are none."""
    figures = {name: float(value) for name, value in logs.items() if "/" in name and value is not None}
    return figures or None


class JobProgressCallback(TrainerCallback):
    """Streams metric rows to the database (through a ProgressWriter), stops the training on a
    cancel or pause request or a worker shutdown, and zips and records each checkpoint."""

    def __init__(self, claim: Claim, files: JobFiles, flush_interval_s: float, stop: threading.Event):
        self.claim = claim
        self.stop = stop
        self.files = files
        self.stopped: str | None = None  # CANCEL, PAUSE or SHUTDOWN once decided
        self.writer = ProgressWriter(claim, flush_interval_s)
        self._last_log: tuple[float, int] | None = None  # (time, tokens seen) at the last log
        self._step_ended = time.perf_counter()
        # made once the model is ready (on a GPU: its "training step" event); times the first step and row
        self._began = time.perf_counter()
        self._first_step_s: float | None = None
        self._first_row_said = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_):
        runs.set_total_steps(self.claim, state.max_steps)
        self._last_log = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state: TrainerState, control: TrainerControl, logs=None, **_):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:  # e.g. the end-of-training summary
            return
        if not self._first_row_said:
            self._first_row_said = True
            seconds = round(time.perf_counter() - self._began, 1)
            self._say(
                f"first row logged (step {state.global_step}) {seconds} s after the model was ready",
                first_row_seconds=seconds,
                step=state.global_step,
            )
        self.writer.add(
            {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": logs.get("loss"),
                "eval_loss": logs.get("eval_loss"),
                "learning_rate": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_second": self._tokens_per_second(state) if "loss" in logs else None,
                "figures": method_figures(logs),
                "time": utcnow(),
            }
        )

    def _tokens_per_second(self, state: TrainerState) -> float | None:
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        previous, self._last_log = self._last_log, (now, tokens)
        if previous is None or not tokens or now <= previous[0]:
            return None
        return (tokens - previous[1]) / (now - previous[0])

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, **_):
        if self._first_step_s is None:
            self._say_first_step(state.global_step)
        self._step_ended = time.perf_counter()  # the trainer's save (if due) starts after this
        self.writer.step(state.global_step, state.num_input_tokens_seen)
        self.writer.check()
        decision = self.stopped or self.writer.requested
        if decision is None and self.stop.is_set():
            decision = SHUTDOWN
        decision = shared_decision(decision)
        if decision is not None and self.stopped is None:
            # A pause or a shutdown saves this step first (a shut-down job is handed back).
            log.info("job %s: %s; stopping at step %d", self.claim.job_id, decision, state.global_step)
        self.stopped = apply_decision(decision, control)

    def _say_first_step(self, step: int) -> None:
        """The job's first step (of this run: a resumed job's first after its checkpoint), timed
        to when the GPU finished it: what compiling and capturing cost before training runs."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # once: a step's host work ends before its kernels do
        self._first_step_s = round(time.perf_counter() - self._began, 1)
        self._say(
            f"first step (step {step}) done {self._first_step_s} s after the model was ready",
            first_step_seconds=self._first_step_s,
            step=step,
        )

    def _say(self, message: str, **data: Any) -> None:
        """An event; a database that doesn't answer loses it rather than holding training up."""
        try:
            runs.log_message(self.claim.job_id, message, **data)
        except SQLAlchemyError as exc:
            log.warning("job %s: event not written (%s): %s", self.claim.job_id, exc, message)

    def close(self) -> None:
        self.writer.close()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_):
        self.writer.write_now()  # the rows up to this checkpoint are stored before it is recorded
        name = checkpoint_name(state.global_step)  # the Trainer's folder name too
        started = time.perf_counter()
        save_s = started - self._step_ended
        info = zip_directory(self.files.checkpoint_dir(name), self.files.checkpoint_zip(name))
        zip_s = time.perf_counter() - started
        # Whole in the store before the database records it: a kill before this line leaves an
        # unrecorded zip at most, which the next run removes (JobFiles.remove_unrecorded).
        location = self.files.store.put(info.path)
        store_s = time.perf_counter() - started - zip_s
        runs.record_checkpoint(
            self.claim,
            name,
            state.global_step,
            location,
            info.size_bytes,
            info.sha256,
            keep=args.save_total_limit or 1_000_000,
            timings={
                "save_seconds": round(save_s, 3),
                "zip_seconds": round(zip_s, 3),
                "store_seconds": round(store_s, 3),
            },
        )
        self.files.store.evict(info.path)  # an object store holds it now; the folder stays for the Trainer
        log.info(
            "job %s: %s zipped and stored (%d bytes) in %.2f s",
            self.claim.job_id,
            name,
            info.size_bytes,
            time.perf_counter() - started,
        )

    def on_train_end(self, args, state: TrainerState, control: TrainerControl, **_):
        self.writer.close()
        self.writer.step(state.global_step, state.num_input_tokens_seen)
        self.writer.write_now()
        self.writer.check()
