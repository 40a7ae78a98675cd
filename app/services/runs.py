"""What a worker does to a job row: claim it, report progress and checkpoints, finish it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db import session_scope
from app.models import Checkpoint, Job, JobStatus, Metric, utcnow
from app.services.events import add_event, add_state_event
from app.storage import job_files

METRIC_FIELDS = ("epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second")


@dataclass(frozen=True)
class Claim:
    job_id: str
    spec: dict[str, Any]
    resume_from: str | None
    attempt: int


def claim_job(job_id: str) -> Claim | None:
    """Move a queued job to running; None when it is not queued (cancelled, or a redelivery)."""
    with session_scope() as session:
        now = utcnow()
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                started_at=now,
                updated_at=now,
                cancel_requested=False,
            )
        ).rowcount
        if not claimed:
            return None
        job = session.get(Job, job_id)
        assert job is not None
        add_state_event(session, job_id, JobStatus.RUNNING, f"started (attempt {job.attempts})")
        return Claim(job_id, dict(job.spec), job.resume_from, job.attempts)


def set_total_steps(job_id: str, total_steps: int) -> None:
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(total_steps=total_steps))


def _upsert_metrics(session: Session, job_id: str, rows: list[dict[str, Any]]) -> None:
    """Idempotent per (job, step): a replayed step overwrites, a later eval row fills eval_loss."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for row in rows:
        stmt = insert(Metric).values(job_id=job_id, **row)
        merged = {
            name: func.coalesce(stmt.excluded[name], Metric.__table__.c[name]) for name in METRIC_FIELDS
        }
        merged["time"] = stmt.excluded.time
        session.execute(stmt.on_conflict_do_update(index_elements=["job_id", "step"], set_=merged))


def report_progress(job_id: str, step: int, rows: list[dict[str, Any]]) -> bool:
    """Write buffered metric rows and the current step; answer whether a cancel was requested."""
    with session_scope() as session:
        if rows:
            _upsert_metrics(session, job_id, rows)
        session.execute(update(Job).where(Job.id == job_id).values(current_step=step, updated_at=utcnow()))
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_checkpoint(
    job_id: str,
    name: str,
    step: int,
    zip_path: str,
    size_bytes: int,
    sha256: str,
    keep: int,
    timings: dict[str, float] | None = None,
) -> None:
    """Record a finished checkpoint zip and drop the oldest beyond `keep` (save_total_limit)."""
    with session_scope() as session:
        existing = session.scalar(
            select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == name)
        )
        if existing is not None:
            session.delete(existing)
            session.flush()
        session.add(
            Checkpoint(
                job_id=job_id, name=name, step=step, path=zip_path, size_bytes=size_bytes, sha256=sha256
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


def finish_job(
    job_id: str, status: str, message: str, *, error: str | None = None, adapter: dict[str, Any] | None = None
) -> None:
    assert status in JobStatus.TERMINAL
    with session_scope() as session:
        values: dict[str, Any] = {
            "status": status,
            "finished_at": utcnow(),
            "updated_at": utcnow(),
            "error": error,
        }
        if adapter:
            values.update(
                adapter_path=adapter["path"],
                adapter_size_bytes=adapter["size_bytes"],
                adapter_sha256=adapter["sha256"],
            )
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING).values(**values))
        add_state_event(session, job_id, status, message, **({"error": error} if error else {}))


def log_message(job_id: str, message: str, **data: Any) -> None:
    with session_scope() as session:
        add_event(session, job_id, message, data=data or None)
