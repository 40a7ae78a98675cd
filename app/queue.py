"""The Celery client the API uses to dispatch job ids; the worker shares its configuration."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from app.errors import BrokerUnavailable
from app.settings import get_settings

TASK_RUN_JOB = "finetune.run_job"
TASK_ANALYZE_DATASET = "finetune.analyze_dataset"
TASK_GENERATE_SAMPLE = "finetune.generate_sample"
TASK_EXPORT = "finetune.export"


def job_queue() -> str:
    """The deployment's queue name, FINETUNE_QUEUE: job ids go to one queue under it per class of
    worker (`app.routing.class_queue`), and the training workers register under it."""
    return get_settings().queue


def samples_queue() -> str:
    """Where samples go (`finetune sampler`), so that a long training never makes a prompt
    wait; so do uploads' token statistics (seconds of tokenizing a bounded sample)."""
    return f"{get_settings().queue}.samples"


def make_celery(broker_url: str, transport_options: dict[str, Any] | None, default_queue: str) -> Celery:
    celery = Celery("finetune", broker=broker_url)
    celery.conf.update(
        task_default_queue=default_queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # Trainings run for hours: acknowledge a job only once it has finished, take one at a
        # time, and give each its own child process so GPU memory is returned afterwards.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )
    defaults = {}
    if broker_url.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacknowledged task after this many seconds, also while the first
        # copy still runs; the job row's status guards against running a job twice
        # (services.runs.claim_job). Dead workers are found sooner by their expired lease.
        defaults = {"visibility_timeout": 7 * 24 * 3600}
    celery.conf.broker_transport_options = {**defaults, **(transport_options or {})}
    return celery


@lru_cache
def get_celery() -> Celery:
    settings = get_settings()
    return make_celery(settings.broker_url, settings.broker_transport_options, settings.queue)


def declare_queue() -> None:
    """Create the samples queue on the broker now. For the embedded SQLite broker this creates
    its tables, which the API and the worker would otherwise race to create at their first use."""
    celery = get_celery()
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3)
        celery.amqp.queues[samples_queue()](connection.default_channel).declare()


def waiting_messages(queue: str) -> int:
    """Messages waiting in `queue` (not counting those a worker has taken)."""
    celery = get_celery()
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        # Not passive: a Redis restarted without persistence has forgotten the queue itself.
        declared = celery.amqp.queues[queue](connection.default_channel).queue_declare()
        return declared.message_count


def send(task: str, *args: object, queue: str) -> None:
    """Publish `task(*args)` to `queue`."""
    try:
        get_celery().send_task(task, args=list(args), queue=queue)
    except Exception as exc:  # any failure to publish leaves the work undispatched
        raise BrokerUnavailable(f"could not enqueue {task}{args}: {exc}") from exc


def enqueue_sample(sample_id: str) -> None:
    send(TASK_GENERATE_SAMPLE, sample_id, queue=samples_queue())


def enqueue_export(export_id: str) -> None:
    """Exports go to the sampler's queue: work that isn't training, and mustn't wait behind it."""
    send(TASK_EXPORT, export_id, queue=samples_queue())
