"""What a user can do with jobs: create, read, cancel, resume, and read their metrics and files.

Every function takes the asking owner: another owner's job is reported as not found."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import changed_rows, serialize, session_scope
from app.errors import (
    ArtifactNotReady,
    CheckpointNotFound,
    IdempotencyKeyReused,
    InvalidFields,
    JobNotFound,
    JobStateConflict,
    TooManyQueuedJobs,
)
from app.ids import CHECKPOINT_NAME, JOB_ID
from app.lifecycle import OWNER_ACTIONS, JobAction, refusal, statuses_allowing
from app.models import Checkpoint, Event, Job, JobStatus, Metric, utcnow
from app.routing import Needs
from app.schemas import CheckpointRead, EventRead, JobRead, MetricRead, Page
from app.services import preflight, scheduler
from app.services.admission import check_admissible, local_source_problems
from app.services.datasets import dataset_reference_problems
from app.services.downloads import StoredFile, stored_file
from app.services.events import add_event, add_state_event
from app.services.lineage import resolve_init_from
from app.services.pagination import newest_first
from app.services.runs import requeue_from_checkpoint
from app.services.transitions import move_job
from app.settings import get_settings
from app.spec import PRIORITY_RANKS, JobSpec, stored_spec
from app.storage import job_files

log = logging.getLogger(__name__)

RESUMABLE = statuses_allowing(JobAction.RESUME)
# How long a retried create (without an Idempotency-Key) looks back for its first attempt: the
# openai client's 3 tries of up to 10 minutes each.
RETRY_WINDOW = timedelta(minutes=30)


def create_job(
    spec: JobSpec, owner: str, *, idempotency_key: str | None = None, retry: bool = False
) -> JobRead:
    """Store and queue a job. A request repeated with the same `idempotency_key`, or marked as a
    client's `retry` of one without a key, returns the job its first attempt made (unless that
    one failed) instead of making a second. A job that continues from an earlier one's adapter
    (`init_from`) is stored with that job's base model, quantization and LoRA."""
    spec = resolve_init_from(spec, owner)
    fields = spec.model_dump(mode="json")
    request_sha256 = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    earlier = _first_attempt(owner, idempotency_key, request_sha256, retry)
    if earlier is not None:
        return earlier
    check_admissible(spec, owner)
    preflight_notes, needs = preflight.admit(spec)
    try:
        with session_scope() as session:
            _check_queue_room(session, owner)
            job = Job(
                owner=owner,
                status=JobStatus.QUEUED,
                spec=fields,
                dispatched_at=utcnow(),
                idempotency_key=idempotency_key,
                request_sha256=request_sha256,
                priority=PRIORITY_RANKS[spec.priority],
                needs_bytes=needs.bytes,
                needs_gpus=needs.gpus,
                needs_bf16=needs.bf16,
            )
            session.add(job)
            session.flush()
            add_state_event(session, job.id, JobStatus.QUEUED, "job created")
            for note in preflight_notes:
                add_event(session, job.id, note)
            unroutable = scheduler.unroutable_note(session, needs)
            if unroutable:
                add_event(session, job.id, unroutable)
            read = JobRead.model_validate(job)
    except IntegrityError:
        # the same key in a concurrent request that committed first
        earlier = _first_attempt(owner, idempotency_key, request_sha256, retry)
        if earlier is None:
            raise
        return earlier
    # Only after the commit: a worker that picks the id up must find the row.
    scheduler.dispatch()
    return read


def _first_attempt(owner: str, key: str | None, request_sha256: str, retry: bool) -> JobRead | None:
    with session_scope() as session:
        if key is not None:
            job = session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))
            if job is not None and job.request_sha256 != request_sha256:
                raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was used for a different job")
        elif retry:
            job = session.scalar(
                select(Job)
                .where(
                    Job.owner == owner,
                    Job.request_sha256 == request_sha256,
                    Job.idempotency_key.is_(None),
                    Job.created_at > utcnow() - RETRY_WINDOW,
                    Job.status != JobStatus.FAILED,
                )
                .order_by(Job.created_at.desc())
                .limit(1)
            )
        else:
            job = None
        return JobRead.model_validate(job) if job is not None else None


def _check_queue_room(session: Session, owner: str) -> None:
    """Per-owner cap on waiting jobs. The owner's queue is locked until the caller's
    transaction commits the job it queues, so concurrent submissions can't pass the cap."""
    serialize(session, f"queue:{owner}")
    limit = get_settings().max_queued_jobs
    queued = (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.owner == owner, Job.status == JobStatus.QUEUED)
        )
        or 0
    )  # a COUNT always has its one row
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
    """The job; a queued one with its place in the dispatcher's line and what it waits for."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        position, waiting_for = scheduler.waiting(session, job)
        read = JobRead.model_validate(job)
        return read.model_copy(update={"queue_position": position, "waiting_for": waiting_for})


def list_jobs(
    owner: str,
    status: str | None,
    limit: int,
    cursor: str | None,
    metadata: dict[str, str] | None = None,
    unlabelled: bool = False,
) -> Page[JobRead]:
    """The owner's jobs, newest first; only those in `status`, labelled with every `metadata`
    pair, or `unlabelled` (no metadata), when asked."""
    where = [Job.owner == owner, *([Job.status == status] if status else [])]
    where += [Job.spec[("metadata", key)].as_string() == value for key, value in (metadata or {}).items()]
    if unlabelled:
        where.append(Job.spec["metadata"].as_string().is_(None))
    return newest_first(Job, JobRead, limit, cursor, *where)


def cancel_job(job_id: str, owner: str) -> JobRead:
    """A queued or paused job is cancelled at once; a running one when the worker reaches a step
    boundary."""
    return _stop(job_id, owner, JobAction.CANCEL)


def pause_job(job_id: str, owner: str) -> JobRead:
    """A running job saves a checkpoint at its next step boundary and stops (`paused`); a queued
    one is paused at once. `resume_job` continues it."""
    return _stop(job_id, owner, JobAction.PAUSE)


def _stop(job_id: str, owner: str, action: JobAction) -> JobRead:
    """Take `action` (pause or cancel) as OWNER_ACTIONS says for the job's status: move the job
    now, or ask its worker to at the next step. A job that changes status meanwhile (a worker
    claims it) is looked at again."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        for _ in range(3):
            before = job.status
            target = OWNER_ACTIONS.get(before, {}).get(action)
            if target is None:
                raise JobStateConflict(refusal(action, before))
            if isinstance(target, JobStatus):
                done = move_job(session, job_id, before, target, f"{target} while {before}")
            else:  # AT_NEXT_STEP: the worker stops at its next step boundary
                flag = "cancel_requested" if action == JobAction.CANCEL else "pause_requested"
                done = 0 < changed_rows(
                    session,
                    update(Job)
                    .where(Job.id == job_id, Job.status == before)
                    # the owner's pause stands: the job stays paused, not back in line after a
                    # preemption (app/services/scheduler.py)
                    .values({flag: True, "updated_at": utcnow(), "preempted_for": None}),
                )
                if done:
                    add_state_event(session, job_id, before, f"{action} requested")
            if done:
                break
            session.refresh(job)
        else:
            raise JobStateConflict("the job kept changing state; try again")
        session.refresh(job)
        return JobRead.model_validate(job)


def resume_job(job_id: str, owner: str, checkpoint: str | None) -> JobRead:
    """Queue a paused, failed or cancelled job again, continuing from a checkpoint (default the
    latest)."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        if job.status not in RESUMABLE:
            raise JobStateConflict(refusal(JobAction.RESUME, job.status))
        spec = stored_spec(job.spec)
        gone = dataset_reference_problems(spec, owner) + local_source_problems(spec)
        if gone:
            raise InvalidFields(*gone)
        _check_queue_room(session, owner)
        stale = requeue_from_checkpoint(session, job_id, checkpoint, "resume", RESUMABLE)
        if stale is None:
            raise JobStateConflict("job changed state while resuming; try again")
        session.refresh(job)
        read = JobRead.model_validate(job)
        unroutable = scheduler.unroutable_note(session, Needs.of(job))
        if unroutable:
            add_event(session, job_id, unroutable)
    for name in stale:
        job_files(job_id).remove_checkpoint(name)
    scheduler.dispatch()
    return read


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


def metrics_since(
    job_id: str, owner: str, after_step: int, evals_after: int | None = None
) -> tuple[JobStatus, list[MetricRead], list[MetricRead]]:
    """The job's status (read first: when it is final, no row can follow), its rows after
    `after_step`, and the rows up to `after_step` whose eval_loss arrived after them (an
    evaluation runs once its step's row is written) after step `evals_after` (default: none)."""
    evals_after = after_step if evals_after is None else evals_after
    with session_scope() as session:
        status = owned_job(session, job_id, owner).status
        rows = session.scalars(
            select(Metric).where(Metric.job_id == job_id, Metric.step > after_step).order_by(Metric.step)
        )
        evals = session.scalars(
            select(Metric)
            .where(
                Metric.job_id == job_id,
                Metric.step > evals_after,
                Metric.step <= after_step,
                Metric.eval_loss.is_not(None),
            )
            .order_by(Metric.step)
        )
        as_read = MetricRead.model_validate
        return status, [as_read(row) for row in rows], [as_read(row) for row in evals]


def list_events(job_id: str, owner: str, after: int | None, limit: int) -> Page[EventRead]:
    return _page_of_job_rows(job_id, owner, Event, Event.id, EventRead, after, limit)


def metrics_at(job_id: str, owner: str, steps: list[int]) -> dict[int, MetricRead]:
    """The job's metric rows at these steps (a step without one is left out)."""
    with session_scope() as session:
        owned_job(session, job_id, owner)
        rows = session.scalars(select(Metric).where(Metric.job_id == job_id, Metric.step.in_(steps)))
        return {row.step: MetricRead.model_validate(row) for row in rows}


def checkpoint_names(session: Session, job_id: str) -> list[str]:
    """The job's kept checkpoints, by step."""
    return list(
        session.scalars(select(Checkpoint.name).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )


def list_checkpoints(job_id: str, owner: str) -> list[CheckpointRead]:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)
        )
        return [CheckpointRead.model_validate(row) for row in rows]


def checkpoint_zip(job_id: str, owner: str, name: str) -> StoredFile:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        row = None
        if CHECKPOINT_NAME.match(name):
            row = session.scalar(
                select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == name)
            )
        if row is None:
            raise CheckpointNotFound(f"job {job_id} has no checkpoint {name!r}")
        sha256 = row.sha256
    files = job_files(job_id)
    return stored_file(files.store, files.checkpoint_zip(name), f"{job_id}-{name}.zip", sha256, name)


def adapter_zip(job_id: str, owner: str) -> StoredFile:
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        if not job.adapter_path:
            raise ArtifactNotReady(f"job {job_id} is {job.status}; the adapter is written when it succeeds")
        sha256 = job.adapter_sha256
    files = job_files(job_id)
    return stored_file(files.store, files.adapter_zip, f"{job_id}-adapter.zip", sha256, "the adapter")


# A running job's speed is measured over this many of its latest metric rows.
RATE_WINDOW = 20


def step_rate(session: Session, job_id: str) -> float | None:
    """Steps per second over the job's last RATE_WINDOW logged steps (None before two)."""
    rows = session.execute(
        select(Metric.step, Metric.time)
        .where(Metric.job_id == job_id)
        .order_by(Metric.step.desc())
        .limit(RATE_WINDOW)
    ).all()
    if len(rows) < 2:
        return None
    (last_step, last_time), (first_step, first_time) = rows[0], rows[-1]
    seconds = (last_time - first_time).total_seconds()
    return (last_step - first_step) / seconds if seconds > 0 else None


def estimated_finish(job: JobRead) -> datetime | None:
    """When a running job will reach its last step at its recent speed."""
    if job.status != JobStatus.RUNNING or not job.total_steps:
        return None
    with session_scope() as session:
        rate = step_rate(session, job.id)
    if not rate:
        return None
    return utcnow() + timedelta(seconds=max(0, job.total_steps - job.current_step) / rate)
