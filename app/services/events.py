"""The job event log: state changes and messages, in order. (Status changes themselves are
made by `app.services.transitions.move_job`, which records their events here.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.models import Event


def add_event(
    session: Session, job_id: str, message: str, *, kind: str = "message", data: dict[str, Any] | None = None
) -> None:
    session.add(Event(job_id=job_id, kind=kind, message=message, data=data))


def add_state_event(session: Session, job_id: str, status: str, message: str, **data: Any) -> None:
    add_event(session, job_id, message, kind="state", data={"status": status, **data})
