"""Rows a worker takes one at a time, samples and exports: sent, then queued → running →
succeeded or failed (`SampleStatus`'s values), under the rule jobs follow. Taking is a
conditional update that takes a lease, so two deliveries of one id never both work on it; the
taker renews the lease while it works (worker.lease.LeaseKeeper) and its writes go through only
while it holds it; the sweeper re-queues and re-sends a row whose lease expired, or fails it
with the reason once it has used `max_attempts`. A queued row no worker took in time (its id
lost by the broker, or no sampler running) is sent again or failed with the reason
(`sweep_untaken`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import select, update

from app.db import changed_rows, session_scope
from app.errors import BrokerUnavailable
from app.models import Export, Sample, SampleStatus, utcnow
from app.queue import samples_queue
from app.services.runs import LeaseLost, new_owner
from app.settings import get_settings

log = logging.getLogger(__name__)

Row = TypeVar("Row", Sample, Export)

QUEUED, RUNNING, FAILED = SampleStatus.QUEUED, SampleStatus.RUNNING, SampleStatus.FAILED


def _lease_expiry():
    return utcnow() + timedelta(seconds=get_settings().lease_s)


@dataclass(frozen=True)
class Lease:
    """A worker's hold on a row it took."""

    table: type[Sample] | type[Export]
    row_id: str
    owner: str

    def write(self, **values: Any) -> bool:
        """Set `values` if this worker still holds the lease; False when it lost it."""
        table = self.table
        with session_scope() as session:
            return bool(
                changed_rows(
                    session,
                    update(table)
                    .where(table.id == self.row_id, table.status == RUNNING, table.lease_owner == self.owner)
                    .values(**values),
                )
            )

    def renew(self) -> None:
        if not self.write(lease_expires_at=_lease_expiry()):
            raise LeaseLost(f"{self.row_id}: lease of {self.owner} is gone")


def send(table: type[Row], row_id: str, enqueue: Callable[[str], None]) -> None:
    """Send a committed queued row's id to its worker; if the broker doesn't answer, the row
    fails with the reason (nothing waits for an id that was never sent) and the error is raised."""
    try:
        enqueue(row_id)
    except BrokerUnavailable as exc:
        with session_scope() as session:
            session.execute(
                update(table)
                .where(table.id == row_id, table.status == QUEUED)
                .values(status=FAILED, error=str(exc), finished_at=utcnow(), dispatched_at=None)
            )
        raise


def take(table: type[Row], row_id: str) -> tuple[Row, Lease] | None:
    """The queued row, now running under this worker's lease and detached from its session;
    None when it is gone or another worker took it."""
    lease = Lease(table, row_id, new_owner())
    with session_scope() as session:
        taken = changed_rows(
            session,
            update(table)
            .where(table.id == row_id, table.status == QUEUED)
            .values(
                status=RUNNING,
                attempts=table.attempts + 1,
                lease_owner=lease.owner,
                lease_expires_at=_lease_expiry(),
                dispatched_at=None,
            ),
        )
        if not taken:
            return None
        row = session.get(table, row_id)
        assert row is not None
        session.expunge(row)
        return row, lease


def finish(lease: Lease, *, error: str | None = None, **values: Any) -> bool:
    """End the row: failed with `error`, else succeeded with `values`; False (and nothing
    written) when this worker lost its lease, the row being another's now or failed."""
    status = SampleStatus.FAILED if error is not None else SampleStatus.SUCCEEDED
    ended = lease.write(
        status=status, error=error, finished_at=utcnow(), lease_owner=None, lease_expires_at=None, **values
    )
    if not ended:
        log.warning("%s: the lease of %s is gone; its outcome is dropped", lease.row_id, lease.owner)
    return ended


def sweep(table: type[Row], enqueue: Callable[[str], None]) -> list[str]:
    """Re-queue and re-send running rows whose lease expired, or fail them with the reason once
    they have used `max_attempts`; as `sweeper.sweep` does for jobs, each change conditional on
    the lease seen expired. Returns the re-sent ids."""
    max_attempts = get_settings().max_attempts
    now = utcnow()
    with session_scope() as session:
        expired = session.execute(
            select(table.id, table.lease_owner, table.attempts).where(
                table.status == RUNNING, table.lease_expires_at < now
            )
        ).all()
    resent = []
    for row_id, owner, attempts in expired:
        reason = f"worker {owner} stopped renewing its lease"
        values: dict[str, Any] = {"status": QUEUED, "dispatched_at": now}
        if attempts >= max_attempts:
            error = f"{reason}; gave up after {attempts} attempts"
            values = {"status": FAILED, "error": error, "finished_at": now}
        with session_scope() as session:
            moved = changed_rows(
                session,
                update(table)
                .where(
                    table.id == row_id,
                    table.status == RUNNING,
                    table.lease_owner == owner,
                    table.lease_expires_at < now,
                )
                .values(lease_owner=None, lease_expires_at=None, **values),
            )
        if not moved:
            continue
        log.warning("%s: %s; %s", row_id, reason, values["status"])
        if values["status"] == FAILED:
            continue
        if _sent_again(table, row_id, enqueue):
            resent.append(row_id)
    return resent


def _sent_again(table: type[Row], row_id: str, enqueue: Callable[[str], None]) -> bool:
    """Send a row the sweep put back in the queue; False when the broker didn't answer (the row
    then fails with the broker's error, as at creation)."""
    try:
        send(table, row_id, enqueue)
    except BrokerUnavailable:
        return False
    return True


def sweep_untaken(
    table: type[Row], enqueue: Callable[[str], None], after_s: float, max_resends: int
) -> list[str]:
    """Queued rows no worker took within `after_s` of their id being sent, looked at only while
    no sample or export runs (the sampler takes one at a time: behind work in progress a row
    waits its turn, it isn't lost). The broker may have lost the id: the row is sent again, up
    to `max_resends` times; after that (at once when 0) it fails with the reason, no worker
    taking its queue. Each change is conditional on the row seen queued and unsent since.
    Returns the re-sent ids."""
    now = utcnow()
    cutoff = now - timedelta(seconds=after_s)
    with session_scope() as session:
        untaken = session.execute(
            select(table.id, table.resends).where(table.status == QUEUED, table.dispatched_at < cutoff)
        ).all()
        if not untaken or _sampler_working(session):
            return []
    resent = []
    for row_id, resends in untaken:
        values: dict[str, Any] = {"dispatched_at": now, "resends": resends + 1}
        if resends >= max_resends:
            times = f" each of the {resends + 1} times it was sent" if resends else ""
            error = (
                f"no sampler took it within {after_s:g} s{times}: "
                f"is `finetune sampler` running, taking the queue {samples_queue()}?"
            )
            values = {"status": FAILED, "error": error, "finished_at": now, "dispatched_at": None}
        with session_scope() as session:
            moved = changed_rows(
                session,
                update(table)
                .where(
                    table.id == row_id,
                    table.status == QUEUED,
                    table.dispatched_at < cutoff,
                    table.resends == resends,
                )
                .values(**values),
            )
        if not moved:
            continue
        if "error" in values:
            log.warning("%s: %s; failed", row_id, values["error"])
            continue
        log.warning("%s: no worker took it within %g s; sent again", row_id, after_s)
        if _sent_again(table, row_id, enqueue):
            resent.append(row_id)
    return resent


def _sampler_working(session) -> bool:
    """Whether a sample or an export runs under a live lease (the sampler is busy)."""
    now = utcnow()
    return any(
        session.scalar(select(table.id).where(table.lease_expires_at > now).limit(1)) is not None
        for table in (Sample, Export)
    )
