"""The worker's Celery app. Importing it must stay cheap: no torch in the parent process."""

from __future__ import annotations

import worker.warmup  # noqa: F401  (a new pool child starts importing the training stack)
from app.queue import make_celery
from app.settings import get_settings
from worker.heartbeat import Heartbeat

settings = get_settings()
celery = make_celery(settings.broker_url, settings.broker_transport_options, settings.queue)
celery.conf.update(include=["worker.tasks"], worker_hijack_root_logger=False)
celery.steps["consumer"].add(Heartbeat)
