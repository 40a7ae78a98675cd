"""A worker's sign of life that works over every broker: while its consumer runs, a Celery
worker touches `<data dir>/heartbeats/<node name>` every HEARTBEAT_S from the consumer's own
timer, and `finetune health worker|sampler` reads the file's age. (Celery's broadcast ping
needs a broker with fan-out; the embedded SQLite one has none.)"""

from __future__ import annotations

import time
from pathlib import Path

from celery import bootsteps

from app.settings import get_settings

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


class Heartbeat(bootsteps.StartStopStep):
    """The consumer step that keeps this node's heartbeat file fresh."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.timer_entry = None

    def start(self, consumer) -> None:
        path = heartbeat_file(consumer.hostname)
        _touch(path)
        self.timer_entry = consumer.timer.call_repeatedly(HEARTBEAT_S, _touch, (path,), priority=10)

    def stop(self, consumer) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        heartbeat_file(consumer.hostname).unlink(missing_ok=True)
