"""A worker's sign of life that works over every broker: while its consumer runs, a Celery
worker touches `<data dir>/heartbeats/<node name>` every HEARTBEAT_S from the consumer's own
timer, and `finetune health worker|sampler` reads the file's age. (Celery's broadcast ping
needs a broker with fan-out; the embedded SQLite one has none.)

The same step registers the worker in the database (`app.services.workers`: its queue and
GPUs, renewed every RENEW_S), which the API's pre-flight check reads. A database that doesn't
answer costs a log line, never the worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from celery import bootsteps

from app.queue import job_queue
from app.routing import signature_of_queue
from app.services import scheduler, workers
from app.settings import get_settings
from worker.gpus import visible_gpus

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
# A node whose file is older than this is not answering.
STALE_S = 6 * HEARTBEAT_S


def heartbeat_file(node: str) -> Path:
    return get_settings().data_dir / "heartbeats" / node


def is_alive(node: str) -> bool:
    try:
        return time.time() - heartbeat_file(node).stat().st_mtime < STALE_S
    except OSError:
        return False


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _in_registry(action: Callable[..., None], *args) -> None:
    try:
        action(*args)
    except Exception as exc:  # the database is down or locked: the next renewal tries again
        log.warning("worker registry: %s failed: %s", action.__name__, str(exc).splitlines()[0])


def _registration(consumer) -> tuple:
    """(name, queue, GPUs, class): a training worker consumes its class's queue and registers
    under the deployment's queue with that class; the sampler under the queue it consumes."""
    queues = sorted(consumer.app.amqp.queues.consume_from)
    classes = [signature for signature in map(signature_of_queue, queues) if signature]
    if classes:
        return consumer.hostname, job_queue(), visible_gpus(), classes[0]
    return consumer.hostname, ",".join(queues) or get_settings().queue, visible_gpus(), None


def _register_and_dispatch(*registration) -> None:
    """Register, then send this worker (and its class) the jobs waiting for it."""
    workers.register(*registration)
    if registration[3]:
        scheduler.dispatch()


class Heartbeat(bootsteps.StartStopStep):
    """The consumer step that keeps this node's heartbeat file fresh."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.timer_entries: list = []

    def start(self, consumer) -> None:
        path = heartbeat_file(consumer.hostname)
        _touch(path)
        registration = _registration(consumer)
        _in_registry(_register_and_dispatch, *registration)
        registration = (workers.register, *registration)
        self.timer_entries = [
            consumer.timer.call_repeatedly(HEARTBEAT_S, _touch, (path,), priority=10),
            consumer.timer.call_repeatedly(workers.RENEW_S, _in_registry, registration, priority=10),
        ]

    def stop(self, consumer) -> None:
        for entry in self.timer_entries:
            entry.cancel()
        self.timer_entries = []
        heartbeat_file(consumer.hostname).unlink(missing_ok=True)
        _in_registry(workers.unregister, consumer.hostname)
