"""The tasks: run a job, analyze an upload, answer a sample, make an export, each given only an
id; the database rows record how they ended."""

from __future__ import annotations

import logging
import os

from celery.worker.request import Request
from celery.worker.state import task_ready

from app.db import UNREACHABLE, retry_while_unreachable
from app.ids import checkpoint_name
from app.lifecycle import AT_NEXT_STEP_ENDS_IN
from app.models import JobStatus
from app.queue import TASK_ANALYZE_DATASET, TASK_EXPORT, TASK_GENERATE_SAMPLE, TASK_RUN_JOB
from app.routing import signature_of_queue
from app.services import runs, scheduler
from app.services.runs import CANCEL, PAUSE, SHUTDOWN, LeaseLost
from app.settings import Settings, get_settings
from app.storage import job_files
from worker.celery_app import celery
from worker.lease import LeaseKeeper
from worker.shutdown import stop_on_signal, worker_stopping
from worker.warmup import wait_for_warm_up

log = logging.getLogger(__name__)


class JobDelivery(Request):
    """A delivered job id, looked at in the worker's main process before a child process is
    made for it: one that is no longer queued (cancelled while it waited, a second delivery) is
    acknowledged and dropped in milliseconds, as a revoked task is, instead of costing a fresh
    training process. The claim in `execute_job` still decides for the ids that pass."""

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if worker_stopping.is_set():  # not this worker's to start: back to the broker
            log.info("shutting down; the delivery of %s goes back to the queue", self.args[:1])
            self.reject(requeue=True)
            task_ready(self)
            return True
        job_id = self.args[0] if self.args else None
        try:
            status = runs.skip_stale_delivery(job_id) if isinstance(job_id, str) else None
        except UNREACHABLE:  # the child's claim retries until the database answers
            return False
        if status is None:
            return False
        log.info("job %s is %s, not queued; delivery skipped", job_id, status)
        self._announce_revoked(f"job is {status}", terminated=False, signum=None, expired=False)
        return True


@celery.task(name=TASK_RUN_JOB, Request=JobDelivery, bind=True)
def run_job(self, job_id: str) -> None:
    queue = (self.request.delivery_info or {}).get("routing_key") or ""
    try:
        execute_job(job_id, signature_of_queue(queue))
    finally:
        # this worker is free now: the next job in line comes to it (or to another)
        dispatch_next()


def dispatch_next() -> None:
    try:
        scheduler.dispatch()
    except Exception as exc:  # the database or broker is down: the API's sweep dispatches later
        log.warning("dispatch after a job failed: %s", str(exc).splitlines()[0] if str(exc) else exc)


@celery.task(name=TASK_ANALYZE_DATASET)
def analyze_dataset(dataset_id: str, tokenizer: str, max_seq_length: int) -> None:
    from worker.analysis import analyze_dataset as analyze

    analyze(dataset_id, tokenizer, max_seq_length)


@celery.task(name=TASK_GENERATE_SAMPLE)
def generate_sample(sample_id: str) -> None:
    from worker.sampling import answer

    answer(sample_id)


@celery.task(name=TASK_EXPORT)
def make_export(export_id: str) -> None:
    from worker.exports import export

    export(export_id)


def finished_message(summary: dict) -> str:
    """The "finished" event as a sentence: 'finished after 60 steps: train loss 9.52, eval loss
    9.61'."""
    losses = [
        f"{label} {summary[key]:.4g}"
        for label, key in (("train loss", "final_train_loss"), ("eval loss", "final_eval_loss"))
        if summary.get(key) is not None
    ]
    return f"finished after {summary['steps']} steps" + (f": {', '.join(losses)}" if losses else "")


def execute_job(job_id: str, worker_class: str | None = None) -> None:
    """Claim the job, train it under a lease, record how it ended. A worker that loses its
    lease (the sweeper gave the job to another) stops and writes nothing more."""
    claim = runs.claim_job(job_id, routed_to=worker_class)
    if claim is None:
        # Taken or stopped since JobDelivery looked: a second delivery of its id (a broker
        # redelivery, an id sent again by the sweeper) claimed elsewhere first, or a cancel.
        status = retry_while_unreachable(runs.skip_stale_delivery)(job_id)
        log.info("job %s is %s, not queued; delivery skipped", job_id, status)
        return
    log.info("job %s: attempt %d, resume from %s", job_id, claim.attempt, claim.resume_from or "start")
    settings = get_settings()
    try:
        _run_and_record(claim, settings)
    except LeaseLost as exc:
        log.warning("%s; stopped without writing more", exc)
        return  # the job may run on in this data dir under another worker: its files stay
    job_files(job_id, settings).clear_scratch()  # what a later run needs is in the store


def _run_and_record(claim: runs.Claim, settings: Settings) -> None:
    """Train the claimed job under its lease and record how it ended (LeaseLost: it was not
    this worker's to record)."""
    job_id = claim.job_id
    with LeaseKeeper(claim, settings.lease_s / 3), stop_on_signal() as stop:
        try:
            # Imported here, in the task's own child process (the worker's parent never loads
            # torch or CUDA), and under the lease: the import alone takes seconds, less what the
            # child's warm-up (worker.warmup) imported while it waited for this job.
            wait_for_warm_up()
            if claim.spec.resources.gpus > 1:
                from worker.training.distributed import launch

                outcome = launch(claim, settings, stop)
            else:
                # One process, one GPU: with more visible, the Trainer would spread the job
                # over all of them (DataParallel). A deployment that gives this worker
                # another GPU sets CUDA_VISIBLE_DEVICES itself (compose: FINETUNE_GPU).
                os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
                from worker.training.recipe import run_training

                outcome = run_training(claim, settings, stop)
        except LeaseLost:
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if runs.requested_stop(claim) == CANCEL:
                # the owner's cancel stands, whatever the run failed on meanwhile (a model
                # still being looked up on an unreachable hub, say)
                log.info("job %s: cancelled; it had failed meanwhile (%s)", job_id, error)
                message = f"cancelled (it had failed meanwhile: {error})"
                runs.finish_job(claim, JobStatus.CANCELLED, message)
                return
            log.exception("job %s failed", job_id)
            runs.finish_job(claim, JobStatus.FAILED, "training failed", error=error)
            return
        steps = outcome.summary["steps"]
        if outcome.stopped == SHUTDOWN:
            runs.hand_back(claim, "worker shutting down")
            return
        if outcome.stopped == PAUSE and (high := runs.preempted_for(claim)):
            # paused for a high-priority job: back in line from the checkpoint just saved
            runs.hand_back(claim, f"paused for the high-priority job {high}")
            return
        if outcome.stopped in (CANCEL, PAUSE):
            ended = AT_NEXT_STEP_ENDS_IN[outcome.stopped]
            if not outcome.summary.get("trained", True):
                runs.finish_job(claim, ended, f"{ended} while loading, before training")
                return
            saved = f"; {checkpoint_name(steps)} saved" if ended == JobStatus.PAUSED else ""
            runs.finish_job(claim, ended, f"{ended} at step {steps}{saved}")
            return
        adapter = outcome.adapter
        assert adapter is not None
        runs.finish_job(
            claim,
            JobStatus.SUCCEEDED,
            finished_message(outcome.summary),
            adapter={
                "path": job_files(job_id, settings).store.location(adapter.path),
                "size_bytes": adapter.size_bytes,
                "sha256": adapter.sha256,
            },
        )
