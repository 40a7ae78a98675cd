"""Graceful stop: on a warm shutdown (SIGTERM, e.g. `docker compose stop`) the worker asks the
child training a job to save a checkpoint at its next step and hand the job back.

The parent signals the child running a job with SIGUSR2 (an idle worker stops without signalling
anyone); the child's handler only sets a flag that the training callback reads at each step
boundary.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery.signals import worker_shutting_down
from celery.worker import state

log = logging.getLogger(__name__)

STOP_SIGNAL = signal.SIGUSR2
stop_requested = threading.Event()
# In the worker's main process: set once it shuts down; a job delivered after that (the id a
# handed-back job just sent again, say) goes back to the broker for the next worker.
worker_stopping = threading.Event()


def _child_pids() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        children = task / "children"
        if children.exists():
            pids += [int(pid) for pid in children.read_text().split()]
    return pids


def processes_to_checkpoint(requests: Iterable[Any], children: list[int]) -> list[int]:
    """The pool processes that run a job: each running request's (`worker_pid`), or every child
    while one is on its way to a process that has not said which it is yet. None when no job runs:
    SIGUSR2 to an idle pool process is billiard's signal to exit, and when the pool's own stop
    signals it again inside its exit, it ends with exitcode 70, logged as an ERROR."""
    pids = {request.worker_pid for request in requests}
    if None in pids:
        return children
    return sorted(pid for pid in pids if pid in children)  # a solo pool runs jobs in-process


@worker_shutting_down.connect
def _ask_children_to_checkpoint(sig=None, how=None, exitcode=None, **_) -> None:
    worker_stopping.set()
    if how != "Warm":
        return
    requests = [*state.active_requests, *state.reserved_requests]
    for pid in processes_to_checkpoint(requests, _child_pids()):
        log.info("warm shutdown: asking process %d to checkpoint and hand its job back", pid)
        try:
            os.kill(pid, STOP_SIGNAL)
        except ProcessLookupError:
            pass


@contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """In the process training a job: set `stop_requested` when the parent asks."""
    stop_requested.clear()
    if threading.current_thread() is not threading.main_thread():
        yield stop_requested
        return
    previous = signal.signal(STOP_SIGNAL, lambda *_: stop_requested.set())
    try:
        yield stop_requested
    finally:
        signal.signal(STOP_SIGNAL, previous)
