"""The names of the figures a job's metric rows carry (a method's own, e.g. DPO's rewards): the
columns of its metrics as a table, the same on every page of it."""

from __future__ import annotations

from sqlalchemy import Select, func, select

from app.db import session_scope
from app.models import Metric
from app.services.jobs import owned_job


def figure_names(job_id: str, owner: str) -> list[str]:
    """Every figure name in the job's rows, sorted; [] for a job whose method has none."""
    with session_scope() as session:
        owned_job(session, job_id, owner)
        query: Select[str]
        if session.get_bind().dialect.name == "postgresql":  # json_object_keys raises on a non-object
            query = select(func.json_object_keys(Metric.figures)).where(
                func.json_typeof(Metric.figures) == "object"
            )
        else:
            keys = func.json_each(Metric.figures).table_valued("key")
            query = select(keys.c.key).select_from(Metric).join(keys, keys.c.key.is_not(None))
        rows = session.scalars(query.where(Metric.job_id == job_id, Metric.figures.is_not(None)).distinct())
        return sorted(rows)
