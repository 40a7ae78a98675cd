"""Newest-first keyset pagination over a table with `created_at` and `id` columns."""

from __future__ import annotations

import base64
import re
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import and_, or_, select

from app.db import session_scope
from app.errors import InvalidCursor
from app.ids import DATASET_ID, JOB_ID
from app.models import Dataset, Job
from app.schemas import Page


def _encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


# The shape of each paginated table's ids: a cursor's id is checked against it, so that nothing
# else (a NUL, which Postgres refuses; a string longer than the column) reaches the query.
ID_SHAPES: dict[type, re.Pattern[str]] = {Job: JOB_ID, Dataset: DATASET_ID}


def _decode_cursor(cursor: str, id_shape: re.Pattern[str]) -> tuple[datetime, str]:
    """The (created_at, id) a cursor of `_encode_cursor`'s holds; InvalidCursor for any other
    text, a time without an offset among them (every cursor handed out has one)."""
    try:
        created, _, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        created_at = datetime.fromisoformat(created)
    except ValueError as exc:  # UnicodeDecodeError and binascii.Error among them
        raise InvalidCursor() from exc
    if created_at.utcoffset() is None or not id_shape.fullmatch(row_id):
        raise InvalidCursor()
    return created_at, row_id


def cursor_of(model, row_id: str, *where) -> str:
    """The cursor that pages on after the row `row_id` (OpenAI's `after=<id>`)."""
    with session_scope() as session:
        row = session.scalar(select(model).where(model.id == row_id, *where))
    if row is None:
        raise InvalidCursor(f"no {row_id!r} to list after")
    return _encode_cursor(row.created_at, row.id)


def newest_first(model, schema: type[BaseModel], limit: int, cursor: str | None, *where) -> Page:
    query = select(model).where(*where).order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    if cursor:
        created_at, row_id = _decode_cursor(cursor, ID_SHAPES[model])
        query = query.where(
            or_(model.created_at < created_at, and_(model.created_at == created_at, model.id < row_id))
        )
    with session_scope() as session:
        rows = list(session.scalars(query))
    last = rows[limit - 1] if len(rows) > limit else None
    return Page(
        items=[schema.model_validate(row) for row in rows[:limit]],
        next=_encode_cursor(last.created_at, last.id) if last else None,
    )
