"""A job's events and metric rows as one list, newest first, paged by an entry's id (the shape of
OpenAI's job events: state changes and messages beside per-step metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from sqlalchemy import ScalarResult, and_, false, or_, select, true

from app.db import session_scope
from app.errors import InvalidCursor
from app.models import Event, Metric
from app.schemas import EventRead, MetricRead
from app.services.jobs import owned_job

# Entries with the same time: events after metric rows (a step's row, then what it caused).
Kind = Literal["event", "metric"]
TABLES: dict[Kind, tuple[type[Event] | type[Metric], type[EventRead] | type[MetricRead], int]] = {
    "event": (Event, EventRead, 1),
    "metric": (Metric, MetricRead, 0),
}


@dataclass(frozen=True)
class Entry:
    kind: Kind
    id: int  # the row's id in its table; (kind, id) is the entry's cursor
    row: EventRead | MetricRead


def job_timeline(
    job_id: str, owner: str, after: tuple[str, int] | None, limit: int
) -> tuple[list[Entry], bool]:
    """Up to `limit` entries older than the entry `after` (newest first), and whether more follow."""
    with session_scope() as session:
        owned_job(session, job_id, owner)
        older_than = None
        if after is not None:
            kind, row_id = after
            table = TABLES[kind] if kind in TABLES else None
            # the row of the table's model, or None
            row = cast("Event | Metric | None", session.get(table[0], row_id)) if table is not None else None
            if table is None or row is None or row.job_id != job_id:
                raise InvalidCursor(f"no event {kind}-{row_id} in job {job_id}")
            older_than = (row.time, table[2], row_id)
        entries = []
        for kind, (model, schema, rank) in TABLES.items():
            query = select(model).where(model.job_id == job_id)
            if older_than is not None:
                time, cursor_rank, cursor_id = older_than
                if rank == cursor_rank:
                    same_time = model.id < cursor_id
                else:  # at the cursor's time, this table's rows all sort before it, or all after
                    same_time = true() if rank < cursor_rank else false()
                query = query.where(or_(model.time < time, and_(model.time == time, same_time)))
            query = query.order_by(model.time.desc(), model.id.desc()).limit(limit + 1)
            rows = cast("ScalarResult[Event | Metric]", session.scalars(query))  # of the table's model
            entries += [Entry(kind, row.id, schema.model_validate(row)) for row in rows]
    entries.sort(key=lambda e: (e.row.time, TABLES[e.kind][2], e.id), reverse=True)
    return entries[:limit], len(entries) > limit
