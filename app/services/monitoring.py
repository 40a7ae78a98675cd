"""`/metrics` in Prometheus' text format, read from the database at each scrape: jobs by
status, queue depth and the running jobs' total throughput; for the operator, also each
running job's progress and throughput (labelled with its id and owner)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.db import session_scope
from app.models import DeliveryStatus, Job, JobStatus, Notification
from app.models import Metric as MetricRow
from app.services.jobs import RATE_WINDOW, step_rate


class ServiceCollector(Collector):
    def __init__(self, per_job: bool):
        self.per_job = per_job

    def collect(self) -> Iterator[Metric]:
        with session_scope() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            running = session.execute(
                select(Job.id, Job.owner, Job.current_step, Job.total_steps).where(
                    Job.status == JobStatus.RUNNING
                )
            ).all()
            rates = {job_id: step_rate(session, job_id) for job_id, *_ in running} if self.per_job else {}
            tokens = {
                job_id: session.scalar(
                    select(MetricRow.tokens_per_second)
                    .where(MetricRow.job_id == job_id, MetricRow.tokens_per_second.is_not(None))
                    .order_by(MetricRow.step.desc())
                    .limit(1)
                )
                for job_id, *_ in running
            }
            pending = session.scalar(
                select(func.count())
                .select_from(Notification)
                .where(Notification.status == DeliveryStatus.PENDING)
            )

        jobs = GaugeMetricFamily("finetune_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs

        # From the database, not the broker: a cancelled job's id left in the queue won't run.
        yield GaugeMetricFamily(
            "finetune_queue_depth", "Jobs queued for a worker.", value=counts.get(JobStatus.QUEUED, 0)
        )

        yield GaugeMetricFamily(
            "finetune_tokens_per_second",
            "Trained tokens per second of all running jobs together, at their last logged steps.",
            value=sum(rate for rate in tokens.values() if rate is not None),
        )
        yield GaugeMetricFamily(
            "finetune_notifications_pending", "Job-end notifications not yet delivered.", value=pending
        )
        if self.per_job:
            yield from self._per_job(running, rates, tokens)

    @staticmethod
    def _per_job(running, rates, tokens) -> Iterator[Metric]:
        labels = ["job_id", "owner"]
        step = GaugeMetricFamily("finetune_job_step", "A running job's current step.", labels=labels)
        total = GaugeMetricFamily("finetune_job_total_steps", "A running job's total steps.", labels=labels)
        steps_rate = GaugeMetricFamily(
            "finetune_job_steps_per_second", f"Over the last {RATE_WINDOW} logged steps.", labels=labels
        )
        tokens_rate = GaugeMetricFamily(
            "finetune_job_tokens_per_second",
            "Trained tokens per second at the last logged step.",
            labels=labels,
        )
        for job_id, owner, current, total_steps in running:
            step.add_metric([job_id, owner], current)
            if total_steps:
                total.add_metric([job_id, owner], total_steps)
            if rates[job_id] is not None:
                steps_rate.add_metric([job_id, owner], rates[job_id])
            if tokens[job_id] is not None:
                tokens_rate.add_metric([job_id, owner], tokens[job_id])
        yield from (step, total, steps_rate, tokens_rate)


def render(per_job: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(per_job))
    return generate_latest(registry)
