"""Keeps a lease alive while its holder works: a job's while it trains, also through long steps
and model loading; a sample's while it is answered; an export's while it is made."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

from sqlalchemy.exc import SQLAlchemyError

from app.services.queued_work import Lease
from app.services.runs import Claim, LeaseLost, renew_lease

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the lease of `held` (a job's claim, or a sample's or export's lease) every
    `interval_s` from a background thread.

    It only renews: when the lease is gone, the holder's next fenced write raises LeaseLost (a
    training stops) or is dropped (a sample's or export's outcome). A database that is briefly
    unreachable is retried at the next tick.
    """

    def __init__(self, held: Claim | Lease, interval_s: float):
        self.renew: Callable[[], None] = partial(renew_lease, held) if isinstance(held, Claim) else held.renew
        self.name = f"job {held.job_id}" if isinstance(held, Claim) else held.row_id
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except LeaseLost:
                log.warning("%s: lease lost; its next write is refused", self.name)
                return
            except SQLAlchemyError as exc:
                log.warning("%s: could not renew the lease (%s); retrying", self.name, exc)
