"""Rewriting every stored job spec, for the revisions that give old specs a field they lacked.

Only the mechanism lives here (a page of rows at a time, by id, so any number of jobs fits in
bounded memory); each revision keeps its own frozen values in its own `filled`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op

BATCH = 500

jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.JSON))


def rewrite_stored_specs(filled: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Store `filled(spec)` for every job whose spec it changes (None: leave the row)."""
    connection = op.get_bind()
    last = ""
    while True:
        rows = connection.execute(
            sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.id > last).order_by(jobs.c.id).limit(BATCH)
        ).all()
        if not rows:
            break
        for job_id, spec in rows:
            new = filled(spec or {})
            if new is not None:
                connection.execute(jobs.update().where(jobs.c.id == job_id).values(spec=new))
        last = rows[-1].id
