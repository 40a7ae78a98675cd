"""Keeps a job's lease alive while it trains, also through long steps and model loading."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError

from app.services.runs import Claim, LeaseLost, renew_lease

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews `claim`'s lease every `interval_s` from a background thread.

    It only renews: when the lease is gone, the training's next fenced write raises LeaseLost
    and stops it. A database that is briefly unreachable is retried at the next tick.
    """

    def __init__(self, claim: Claim, interval_s: float):
        self.claim = claim
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                renew_lease(self.claim)
            except LeaseLost:
                log.warning("job %s: lease lost; training stops at its next write", self.claim.job_id)
                return
            except SQLAlchemyError as exc:
                log.warning("job %s: could not renew the lease (%s); retrying", self.claim.job_id, exc)
