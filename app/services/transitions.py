"""The one function that changes a job's status, used by the API's services, the worker and
the sweeper alike: one conditional update, the cleanup each status needs, a state event, and
the notification a final status sends."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from app.db import changed_rows
from app.lifecycle import check_move
from app.models import Job, JobStatus, utcnow
from app.services.events import add_state_event
from app.services.notifications import queue_notification


def move_job(
    session: Session,
    job_id: str,
    before: JobStatus | Iterable[JobStatus],
    after: JobStatus,
    message: str,
    *,
    where: Iterable[ColumnElement[bool]] = (),
    event: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move the job from `before` (a status, or any of several) to `after` if it is still there
    and matches `where` (the lease or the attempt count the caller saw), setting `values` besides
    what every arrival in `after` sets (`arrival_values`). Records a state event with `message`
    (and `event`'s data) and, for a final status, queues the notification the job asked for.

    Returns False, changing nothing, when the job no longer matches: another process moved it
    first. Raises `IllegalMove` for a move `app.lifecycle` has no rule for."""
    after = JobStatus(after)
    befores = tuple(JobStatus(status) for status in ([before] if isinstance(before, str) else before))
    for status in befores:
        check_move(status, after)
    moved = changed_rows(
        session,
        update(Job)
        .where(Job.id == job_id, Job.status.in_(befores), *where)
        .values(status=after, **{**arrival_values(after, utcnow()), **values}),
    )
    if not moved:
        return False
    add_state_event(session, job_id, after, message, **(event or {}))
    if after.terminal:
        queue_notification(session, job_id, after, message)
    return True


def arrival_values(after: JobStatus, now: datetime) -> dict[str, Any]:
    """The columns every move into `after` sets, whoever makes it: a job that leaves a worker
    gives up its lease and its pending pause (a preemption's too); an ended one gets its finish
    time; a queued one starts clean, to be routed afresh; a running one is started now."""
    values: dict[str, Any] = {"updated_at": now, "preempted_for": None}
    if after == JobStatus.RUNNING:
        values.update(started_at=now, cancel_requested=False, pause_requested=False)
        return values
    values.update(lease_owner=None, lease_expires_at=None, pause_requested=False)
    if after == JobStatus.QUEUED:
        values.update(finished_at=None, cancel_requested=False, error=None, routed_to=None)
    else:
        values.update(finished_at=now if after.terminal else None)
    return values
