"""The registry of running workers (the `workers` table): each Celery worker writes its queue
and the GPUs it sees when it starts, renews the row while it runs (`worker.heartbeat`) and
removes it when it stops. A row not renewed for STALE is a worker that died or lost the
database: the pre-flight check leaves it out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select

from app.db import session_scope
from app.models import Worker, utcnow

# How often a worker renews its row, and when a row counts as gone.
RENEW_S = 30.0
STALE = timedelta(seconds=4 * RENEW_S)


def register(name: str, queue: str, gpus: list[dict[str, Any]], gpu_class: str | None = None) -> None:
    """Write or renew a worker's row (renewing one that a restored database lost writes it anew):
    a training worker registers under the deployment's queue with its class (`app.routing`)."""
    with session_scope() as session:
        worker = session.get(Worker, name)
        if worker is None:
            session.add(Worker(name=name, queue=queue, gpus=gpus, gpu_class=gpu_class))
        else:
            worker.queue, worker.gpus, worker.seen_at = queue, gpus, utcnow()
            worker.gpu_class = gpu_class


def unregister(name: str) -> None:
    with session_scope() as session:
        session.execute(delete(Worker).where(Worker.name == name))


def live_workers(queue: str) -> list[Worker]:
    """The workers taking `queue` that renewed their row lately, by name."""
    with session_scope() as session:
        rows = session.scalars(
            select(Worker)
            .where(Worker.queue == queue, Worker.seen_at > utcnow() - STALE)
            .order_by(Worker.name)
        ).all()
        session.expunge_all()
        return list(rows)
