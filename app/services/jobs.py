"""What a user can do with jobs: create, read, cancel, resume, and read their metrics and files.

Every function takes the asking owner: another owner's job is reported as not found."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import (
    ArtifactNotReady,
    CheckpointNotFound,
    JobNotFound,
    JobStateConflict,
    TooManyQueuedJobs,
)
from app.models import CHECKPOINT_NAME, JOB_ID, Checkpoint, Event, Job, JobStatus, Metric, utcnow
from app.queue import enqueue_job
from app.schemas import CheckpointRead, EventRead, JobRead, MetricRead, Page
from app.services.admission import check_admissible
from app.services.events import add_state_event
from app.services.pagination import newest_first
from app.settings import get_settings
from app.spec import JobSpec
from app.storage import job_files

RESUMABLE = (JobStatus.FAILED, JobStatus.CANCELLED)


def create_job(spec: JobSpec, owner: str) -> JobRead:
    check_admissible(spec, owner)
    with session_scope() as session:
        _check_queue_room(session, owner)
        job = Job(
            owner=owner, status=JobStatus.QUEUED, spec=spec.model_dump(mode="json"), dispatched_at=utcnow()
        )
        session.add(job)
        session.flush()
        add_state_event(session, job.id, JobStatus.QUEUED, "job created")
        read = JobRead.model_validate(job)
    # Only after the commit: a worker that picks the id up must find the row.
    enqueue_or_fail(read.id)
    return read


def enqueue_or_fail(job_id: str) -> None:
    try:
        enqueue_job(job_id)
    except Exception as exc:
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.FAILED, error=str(exc), finished_at=utcnow())
            )
            add_state_event(session, job_id, JobStatus.FAILED, f"could not enqueue: {exc}")
        raise


def _check_queue_room(session: Session, owner: str) -> None:
    """Per-owner cap on waiting jobs (checked, not locked: concurrent submissions may pass it
    by a few)."""
    limit = get_settings().max_queued_jobs
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.owner == owner, Job.status == JobStatus.QUEUED)
    )
    if queued >= limit:
        raise TooManyQueuedJobs(
            f"{queued} jobs are already queued; the limit is {limit} (FINETUNE_MAX_QUEUED_JOBS)"
        )


def owned_job(session: Session, job_id: str, owner: str) -> Job:
    job = session.get(Job, job_id) if JOB_ID.match(job_id) else None
    if job is None or job.owner != owner:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def get_job(job_id: str, owner: str) -> JobRead:
    with session_scope() as session:
        return JobRead.model_validate(owned_job(session, job_id, owner))


def list_jobs(owner: str, status: str | None, limit: int, cursor: str | None) -> Page[JobRead]:
    return newest_first(
        Job, JobRead, limit, cursor, Job.owner == owner, *([Job.status == status] if status else [])
    )


def cancel_job(job_id: str, owner: str) -> JobRead:
    """A queued job is cancelled at once; a running one when the worker reaches a step boundary."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        now = utcnow()
        queued = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, finished_at=now, updated_at=now)
        ).rowcount
        if queued:
            add_state_event(session, job_id, JobStatus.CANCELLED, "cancelled before it started")
        else:
            running = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                .values(cancel_requested=True, updated_at=now)
            ).rowcount
            if not running:
                raise JobStateConflict(f"job is {job.status}; only queued or running jobs can be cancelled")
            add_state_event(session, job_id, JobStatus.RUNNING, "cancel requested")
        session.refresh(job)
        return JobRead.model_validate(job)


def resume_job(job_id: str, owner: str, checkpoint: str | None) -> JobRead:
    """Queue a failed or cancelled job again, continuing from a checkpoint (default the latest)."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        if job.status not in RESUMABLE:
            raise JobStateConflict(f"job is {job.status}; only failed or cancelled jobs can be resumed")
        _check_queue_room(session, owner)
        stale = requeue_from_checkpoint(session, job_id, checkpoint, "resume", Job.status.in_(RESUMABLE))
        if stale is None:
            raise JobStateConflict("job changed state while resuming; try again")
        session.refresh(job)
        read = JobRead.model_validate(job)
    for name in stale:
        job_files(job_id).remove_checkpoint(name)
    enqueue_or_fail(job_id)
    return read


def requeue_from_checkpoint(
    session: Session, job_id: str, checkpoint: str | None, reason: str, *only_if
) -> list[str] | None:
    """Mark the job queued to continue from `checkpoint` (default the latest), if `only_if` still
    holds. The run branches off there: later checkpoints and metric rows are dropped. Returns
    the dropped checkpoints' names (their files go once the caller has committed), or None
    when the job no longer matches `only_if`."""
    checkpoints = list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )
    if checkpoint is not None:
        chosen = next((c for c in checkpoints if c.name == checkpoint), None)
        if chosen is None:
            raise CheckpointNotFound(f"job {job_id} has no checkpoint {checkpoint!r}")
    else:
        chosen = checkpoints[-1] if checkpoints else None
    start_step = chosen.step if chosen else 0
    requeued = session.execute(
        update(Job)
        .where(Job.id == job_id, *only_if)
        .values(
            status=JobStatus.QUEUED,
            resume_from=chosen.name if chosen else None,
            current_step=start_step,
            cancel_requested=False,
            error=None,
            finished_at=None,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=utcnow(),
            dispatched_at=utcnow(),
        )
    ).rowcount
    if not requeued:
        return None
    stale = [c for c in checkpoints if c.step > start_step]
    for row in stale:
        session.delete(row)
    session.execute(delete(Metric).where(Metric.job_id == job_id, Metric.step > start_step))
    where = f"resuming from {chosen.name}" if chosen else "no checkpoint; restarting from step 0"
    add_state_event(
        session, job_id, JobStatus.QUEUED, f"{reason}: {where}", checkpoint=chosen.name if chosen else None
    )
    return [row.name for row in stale]


def _page_of_job_rows(job_id: str, owner: str, model, key, schema, after: int | None, limit: int) -> Page:
    """Rows of one of the job's tables in `key` order after a cursor (keyset pagination)."""
    with session_scope() as session:
        owned_job(session, job_id, owner)
        query = select(model).where(model.job_id == job_id).order_by(key).limit(limit + 1)
        if after is not None:
            query = query.where(key > after)
        rows = list(session.scalars(query))
    more = len(rows) > limit
    return Page(
        items=[schema.model_validate(row) for row in rows[:limit]],
        next=str(getattr(rows[limit - 1], key.key)) if more else None,
    )


def list_metrics(job_id: str, owner: str, after_step: int | None, limit: int) -> Page[MetricRead]:
    return _page_of_job_rows(job_id, owner, Metric, Metric.step, MetricRead, after_step, limit)


def metrics_since(job_id: str, owner: str, after_step: int) -> tuple[str, list[MetricRead]]:
    """The job's status, read before its new rows: when it is final, no row can follow."""
    with session_scope() as session:
        status = owned_job(session, job_id, owner).status
        rows = session.scalars(
            select(Metric).where(Metric.job_id == job_id, Metric.step > after_step).order_by(Metric.step)
        )
        return status, [MetricRead.model_validate(row) for row in rows]


def list_events(job_id: str, owner: str, after: int | None, limit: int) -> Page[EventRead]:
    return _page_of_job_rows(job_id, owner, Event, Event.id, EventRead, after, limit)


def list_checkpoints(job_id: str, owner: str) -> list[CheckpointRead]:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        )
        return [CheckpointRead.model_validate(row) for row in rows]


def _confined(job_id: str, path: str) -> Path:
    """A file the database names, refused unless it lies inside the job's own directory."""
    resolved = job_files(job_id).confine(path)
    if resolved is None:
        raise ArtifactNotReady(f"file for job {job_id} is missing")
    return resolved


def checkpoint_zip(job_id: str, owner: str, name: str) -> Path:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        row = None
        if CHECKPOINT_NAME.match(name):
            row = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == name)
            )
        if row is None:
            raise CheckpointNotFound(f"job {job_id} has no checkpoint {name!r}")
        return _confined(job_id, row.path)


def adapter_zip(job_id: str, owner: str) -> Path:
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        if not job.adapter_path:
            raise ArtifactNotReady(f"job {job_id} is {job.status}; the adapter is written when it succeeds")
        return _confined(job_id, job.adapter_path)
