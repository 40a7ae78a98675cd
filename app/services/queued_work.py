"""Rows a worker takes one at a time, samples and exports: sent, then queued → running →
succeeded or failed (`SampleStatus`'s values). Taking is a conditional update, so two deliveries
of one id never both work on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import update

from app.db import changed_rows, session_scope
from app.errors import BrokerUnavailable
from app.models import Export, Sample, SampleStatus, utcnow

Row = TypeVar("Row", Sample, Export)


def send(table: type[Row], row_id: str, enqueue: Callable[[str], None]) -> None:
    """Send a committed queued row's id to its worker; if the broker doesn't answer, the row
    fails with the reason (nothing waits for an id that was never sent) and the error is raised."""
    try:
        enqueue(row_id)
    except BrokerUnavailable as exc:
        finish(table, row_id, error=str(exc))
        raise


def take(table: type[Row], row_id: str) -> Row | None:
    """The queued row, now running and detached from its session; None when it is gone or
    another worker took it."""
    with session_scope() as session:
        taken = changed_rows(
            session,
            update(table)
            .where(table.id == row_id, table.status == SampleStatus.QUEUED)
            .values(status=SampleStatus.RUNNING),
        )
        if not taken:
            return None
        row = session.get(table, row_id)
        session.expunge(row)
        return row


def finish(table: type[Row], row_id: str, *, error: str | None = None, **values: Any) -> None:
    """End the row: failed with `error`, else succeeded with `values`."""
    status = SampleStatus.FAILED if error is not None else SampleStatus.SUCCEEDED
    with session_scope() as session:
        session.execute(
            update(table)
            .where(table.id == row_id)
            .values(status=status, error=error, finished_at=utcnow(), **values)
        )
