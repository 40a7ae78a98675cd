"""What a worker does to a job row: claim it, report progress and checkpoints, finish it.

Every write after the claim is fenced by the lease: it renews the lease and goes through only
while this worker still holds it, else it raises LeaseLost. So a worker the sweeper gave up
on (it stopped renewing: killed, paused, cut off) can never overwrite its successor's work.
Writes are retried while the database is unreachable or locked (`retry_while_unreachable`);
metric rows are retried by the worker's ProgressWriter instead, without stalling training.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import JSON, ColumnElement, cast, delete, func, null, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from app.db import changed_rows, retry_while_unreachable, session_scope
from app.errors import CheckpointNotFound
from app.lifecycle import JobAction
from app.models import Checkpoint, Job, JobStatus, Metric, utcnow
from app.services.events import add_event
from app.services.transitions import move_job
from app.settings import get_settings
from app.spec import JobSpec, stored_spec
from app.storage import job_files

METRIC_FIELDS = ("epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")

# Why a run stops before its last step: asked by a user (the first two), or the worker stopping.
CANCEL, PAUSE, SHUTDOWN = JobAction.CANCEL, JobAction.PAUSE, "shutdown"


class LeaseLost(Exception):
    """This worker no longer holds the job's lease: it must stop and write nothing more."""


@dataclass(frozen=True)
class Claim:
    """A job this worker holds the lease of, with its stored spec read once (`stored_spec`)."""

    job_id: str
    owner: str
    spec: JobSpec
    resume_from: str | None
    attempt: int
    # the sha256 of resume_from's zip, which a host that didn't write it unpacks from the store
    resume_sha256: str | None = None

    def to_json(self) -> str:
        """For another process of the same job (a data-parallel rank)."""
        return json.dumps({**dataclasses.asdict(self), "spec": self.spec.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> Claim:
        fields = json.loads(text)
        return cls(**{**fields, "spec": stored_spec(fields["spec"])})


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _lease_expiry():
    return utcnow() + timedelta(seconds=get_settings().lease_s)


@retry_while_unreachable
def claim_job(job_id: str, owner: str | None = None, routed_to: str | None = None) -> Claim | None:
    """Move a queued job to running under a lease; None when it is not queued (cancelled, or a
    duplicate delivery of its id). `routed_to`: the class of the worker claiming it, which it
    then counts against (an id sent to one class and taken by another keeps the count right)."""
    owner = owner or new_owner()
    with session_scope() as session:
        attempts = session.scalar(select(Job.attempts).where(Job.id == job_id))
        if attempts is None:
            return None
        attempt = attempts + 1
        claimed = move_job(
            session,
            job_id,
            JobStatus.QUEUED,
            JobStatus.RUNNING,
            f"started (attempt {attempt})",
            where=[Job.attempts == attempts],
            event={"worker": owner},
            attempts=attempt,
            lease_owner=owner,
            lease_expires_at=_lease_expiry(),
            **({"routed_to": routed_to} if routed_to else {}),
        )
        if not claimed:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        resume_sha256 = session.scalar(
            select(Checkpoint.sha256).where(Checkpoint.job_id == job_id, Checkpoint.name == job.resume_from)
        )
        return Claim(job_id, owner, stored_spec(job.spec), job.resume_from, attempt, resume_sha256)


def skip_stale_delivery(job_id: str) -> str | None:
    """If the job is not queued (cancelled or paused before it started, or a second delivery of
    its id while another worker has it or after it ended), note the delivery as skipped and
    return its status ("missing" for an id the database doesn't know); None if it is queued."""
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        if status == JobStatus.QUEUED:
            return None
        if status is not None:
            add_event(
                session,
                job_id,
                f"delivery skipped: job is {status}",
                data={"status": status, "worker": f"{socket.gethostname()}:{os.getpid()}"},
            )
        return status or "missing"


def _hold(session: Session, claim: Claim, **values: Any) -> None:
    """Renew the lease (and set `values`) if this worker still holds it; else raise LeaseLost."""
    held = changed_rows(
        session,
        update(Job)
        .where(Job.id == claim.job_id, Job.lease_owner == claim.owner, Job.status == JobStatus.RUNNING)
        .values(**{"lease_expires_at": _lease_expiry(), "updated_at": utcnow(), **values}),
    )
    if not held:
        raise LeaseLost(f"job {claim.job_id}: lease of {claim.owner} is gone")


def renew_lease(claim: Claim) -> None:
    with session_scope() as session:
        _hold(session, claim)


@retry_while_unreachable
def set_total_steps(claim: Claim, total_steps: int) -> None:
    with session_scope() as session:
        _hold(session, claim, total_steps=total_steps)


def _upsert_metrics(session: Session, job_id: str, rows: list[dict[str, Any]]) -> None:
    """Idempotent per (job, step): a replayed step overwrites, a later eval row fills eval_loss
    and adds its figures to the step's (a figure named again takes the later value)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for row in rows:
        figures = _finite_figures(row.get("figures"))
        # SQL NULL, not JSON's null, for a row without figures: NULL is what the merge skips.
        stmt = insert(Metric).values(job_id=job_id, **{**row, "figures": figures if figures else null()})
        merged: dict[str, ColumnElement[Any]] = {
            name: func.coalesce(stmt.excluded[name], Metric.__table__.c[name]) for name in METRIC_FIELDS
        }
        merged["figures"] = _merged_figures(dialect, Metric.__table__.c.figures, stmt.excluded.figures)
        merged["time"] = stmt.excluded.time
        session.execute(stmt.on_conflict_do_update(index_elements=["job_id", "step"], set_=merged))


def _finite_figures(figures: dict[str, Any] | None) -> dict[str, float]:
    """A row's figures as floats, without the non-finite ones: neither database's JSON takes NaN
    or infinity, and one such row would keep every later row of the job from being written."""
    result = {}
    for name, value in (figures or {}).items():
        if value is not None and math.isfinite(value := float(value)):
            result[str(name)] = value
    return result


def _merged_figures(dialect: str, stored: ColumnElement[Any], new: ColumnElement[Any]) -> ColumnElement[Any]:
    """The stored figures with the new ones added, either side possibly NULL (a JSON object
    merge: SQLite's json_patch; Postgres' jsonb ||, the column being json)."""
    if dialect == "postgresql":
        stored_b, new_b = cast(stored, JSONB), cast(new, JSONB)
        return cast(func.coalesce(stored_b.op("||", return_type=JSONB)(new_b), new_b, stored_b), JSON)
    return func.coalesce(func.json_patch(stored, new), new, stored)


def report_progress(
    claim: Claim, step: int, rows: list[dict[str, Any]], trained_tokens: int | None = None
) -> str | None:
    """Write buffered metric rows, the current step and the tokens trained on; answer CANCEL or
    PAUSE when a user asked for it."""
    progress: dict[str, Any] = {"current_step": step}
    if trained_tokens:
        progress["trained_tokens"] = trained_tokens
    with session_scope() as session:
        _hold(session, claim, **progress)
        if rows:
            _upsert_metrics(session, claim.job_id, rows)
        return _requested(session, claim)


@retry_while_unreachable
def requested_stop(claim: Claim) -> str | None:
    """CANCEL or PAUSE when the owner asked for it (a cancel first); renews the lease."""
    with session_scope() as session:
        _hold(session, claim)
        return _requested(session, claim)


@retry_while_unreachable
def preempted_for(claim: Claim) -> str | None:
    """The high-priority job this one was asked to pause for (app/services/scheduler.py)."""
    with session_scope() as session:
        return session.scalar(select(Job.preempted_for).where(Job.id == claim.job_id))


def _requested(session: Session, claim: Claim) -> str | None:
    cancel, pause = session.execute(
        select(Job.cancel_requested, Job.pause_requested).where(Job.id == claim.job_id)
    ).one()
    return CANCEL if cancel else PAUSE if pause else None


@retry_while_unreachable
def record_checkpoint(
    claim: Claim,
    name: str,
    step: int,
    location: str,
    size_bytes: int,
    sha256: str,
    keep: int,
    timings: dict[str, float] | None = None,
) -> None:
    """Record a finished checkpoint zip, whole in its store at `location`, and drop the oldest
    beyond `keep` (save_total_limit)."""
    job_id = claim.job_id
    with session_scope() as session:
        _hold(session, claim)
        existing = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == name)
        )
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(
            Checkpoint(
                job_id=job_id, name=name, step=step, path=location, size_bytes=size_bytes, sha256=sha256
            )
        )
        add_event(
            session, job_id, f"saved {name}", data={"step": step, "size_bytes": size_bytes, **(timings or {})}
        )
        session.flush()
        rows = list(
            session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
            )
        )
        pruned = [row.name for row in rows[keep:]]
        for row in rows[keep:]:
            session.delete(row)
    for old in pruned:
        job_files(job_id).remove_checkpoint(old)


@retry_while_unreachable
def finish_job(
    claim: Claim,
    status: JobStatus,
    message: str,
    *,
    error: str | None = None,
    adapter: dict[str, Any] | None = None,
) -> None:
    """End this worker's run of the job in `status` (paused, or a final status); LeaseLost when
    the lease is no longer this worker's."""
    values: dict[str, Any] = {"error": error}
    if adapter:
        values.update(
            adapter_path=adapter["path"],
            adapter_size_bytes=adapter["size_bytes"],
            adapter_sha256=adapter["sha256"],
        )
    with session_scope() as session:
        finished = move_job(
            session,
            claim.job_id,
            JobStatus.RUNNING,
            status,
            message,
            where=[Job.lease_owner == claim.owner],
            event={"error": error} if error else None,
            **values,
        )
    if not finished:
        raise LeaseLost(f"job {claim.job_id}: lease of {claim.owner} is gone")


@retry_while_unreachable
def requeue_from_checkpoint(
    session: Session,
    job_id: str,
    checkpoint: str | None,
    reason: str,
    before: JobStatus | Iterable[JobStatus],
    *only_if: ColumnElement[bool],
    attempt_spent: bool = True,
) -> list[str] | None:
    """Move the job from `before` to queued, to continue from `checkpoint` (default the latest),
    if `only_if` still holds. The run branches off there: later checkpoints and metric rows are
    dropped. Returns the dropped checkpoints' names (their files go once the caller has
    committed), or None when the job is no longer in `before` or matching `only_if`.
    `attempt_spent=False` (a worker shutting down, not failing) gives the run's attempt back."""
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
    where = f"resuming from {chosen.name}" if chosen else "no checkpoint; restarting from step 0"
    requeued = move_job(
        session,
        job_id,
        before,
        JobStatus.QUEUED,
        f"{reason}: {where}",
        where=only_if,
        event={"checkpoint": chosen.name if chosen else None},
        resume_from=chosen.name if chosen else None,
        current_step=start_step,
        dispatched_at=utcnow(),
        **({} if attempt_spent else {"attempts": Job.attempts - 1}),
    )
    if not requeued:
        return None
    stale = [c for c in checkpoints if c.step > start_step]
    for row in stale:
        session.delete(row)
    session.execute(delete(Metric).where(Metric.job_id == job_id, Metric.step > start_step))
    return [row.name for row in stale]


def hand_back(claim: Claim, reason: str) -> None:
    """Release the job to the queue, to continue from its latest checkpoint, without counting
    this run against FINETUNE_MAX_ATTEMPTS: a worker shutting down is not a failure (the
    caller sends its id to the broker)."""
    with session_scope() as session:
        stale = requeue_from_checkpoint(
            session,
            claim.job_id,
            None,
            reason,
            JobStatus.RUNNING,
            Job.lease_owner == claim.owner,
            attempt_spent=False,
        )
    if stale is None:
        raise LeaseLost(f"job {claim.job_id}: lease of {claim.owner} is gone")
    for name in stale:
        job_files(claim.job_id).remove_checkpoint(name)


@retry_while_unreachable
def recorded_checkpoints(job_id: str) -> set[str]:
    """Names of the job's complete checkpoints (zipped and recorded)."""
    with session_scope() as session:
        return set(session.scalars(select(Checkpoint.name).where(Checkpoint.job_id == job_id)))


@retry_while_unreachable
def log_message(job_id: str, message: str, **data: Any) -> None:
    with session_scope() as session:
        add_event(session, job_id, message, data=data or None)
