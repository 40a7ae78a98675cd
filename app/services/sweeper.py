"""Finds work whose worker stopped renewing its lease (jobs, samples, exports) and gives it to
another worker, and queued work whose id the broker lost or no worker takes."""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.db import session_scope
from app.lifecycle import AT_NEXT_STEP_ENDS_IN, JobAction
from app.models import Export, Job, JobStatus, Sample, utcnow
from app.queue import enqueue_export, enqueue_sample
from app.services import queued_work, samples, scheduler
from app.services.runs import requeue_from_checkpoint
from app.services.transitions import move_job
from app.settings import get_settings
from app.storage import job_files

log = logging.getLogger(__name__)

RUNNING = JobStatus.RUNNING


def sweep() -> list[str]:
    """Give expired leases' work to another worker: jobs (`sweep_jobs`), then samples and
    exports (`queued_work.sweep`); then samples and exports no worker took
    (`queued_work.sweep_untaken`): a sample past its caller's deadline fails with the reason
    (sent again it would be answered for no one), an export is sent again every
    `redispatch_after_s`, up to `max_attempts` times, then fails with the reason. Returns the
    re-queued and re-sent ids."""
    settings = get_settings()
    requeued = sweep_jobs()
    requeued += queued_work.sweep(Sample, enqueue_sample)
    requeued += queued_work.sweep(Export, enqueue_export)
    requeued += queued_work.sweep_untaken(Sample, enqueue_sample, samples.untaken_after_s(), 0)
    requeued += queued_work.sweep_untaken(
        Export, enqueue_export, settings.redispatch_after_s, settings.max_attempts
    )
    return requeued


def sweep_jobs() -> list[str]:
    """Re-queue running jobs with an expired lease from their last complete checkpoint, or fail
    them once they have used `max_attempts`; one a user asked to cancel or pause is cancelled or
    paused instead (resume continues from its last complete checkpoint). Returns the re-queued ids.

    Every change is conditional on the lease seen expired, so concurrent sweepers (several API
    processes) and a worker that renews at the last moment are safe.
    """
    max_attempts = get_settings().max_attempts
    now = utcnow()
    with session_scope() as session:
        expired = session.execute(
            select(
                Job.id,
                Job.lease_owner,
                Job.attempts,
                Job.cancel_requested,
                Job.pause_requested,
                Job.preempted_for,
            ).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        ).all()
    requeued = []
    for job_id, owner, attempts, cancel, pause, preempted in expired:
        pause = pause and not preempted  # a preemption's pause goes back in line, as its worker does
        still_expired = (Job.lease_owner == owner, Job.lease_expires_at < now)
        reason = f"worker {owner} stopped renewing its lease"
        with session_scope() as session:
            if cancel or pause:  # the user's request stands: stop here rather than run again
                status = AT_NEXT_STEP_ENDS_IN[JobAction.CANCEL if cancel else JobAction.PAUSE]
                message = f"{status}: {reason} before it stopped"
                move_job(session, job_id, RUNNING, status, message, where=still_expired)
                continue
            if attempts >= max_attempts:
                error = f"{reason}; gave up after {attempts} attempts"
                move_job(session, job_id, RUNNING, JobStatus.FAILED, error, where=still_expired, error=error)
                continue
            stale = requeue_from_checkpoint(session, job_id, None, reason, RUNNING, *still_expired)
        if stale is None:
            continue
        log.warning("job %s: %s; re-queued", job_id, reason)
        for name in stale:
            job_files(job_id).remove_checkpoint(name)
        requeued.append(job_id)
    if requeued:
        scheduler.dispatch()  # a broker outage leaves them queued for the next sweep
    return requeued


def redispatch_lost() -> list[str]:
    """Route and send queued jobs: those never sent (the broker was down), those whose class's
    workers are gone, those whose id the broker lost (`scheduler.redispatch`)."""
    return scheduler.redispatch()
