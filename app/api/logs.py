"""Metric rows as JSON pages, a plain-text log, or a live server-sent event stream."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable

from starlette.concurrency import run_in_threadpool

from app.db import UNREACHABLE
from app.errors import RETRY_AFTER_S
from app.schemas import JobRead, MetricRead
from app.services import jobs
from app.settings import get_settings

log = logging.getLogger(__name__)


def format_text_line(row: MetricRead) -> str:
    fields = [f"step={row.step}"]
    for name, value, fmt in (
        ("epoch", row.epoch, ".3f"),
        ("loss", row.loss, ".4f"),
        ("eval_loss", row.eval_loss, ".4f"),
        ("lr", row.learning_rate, ".3e"),
        ("grad_norm", row.grad_norm, ".4f"),
        ("tokens_per_s", row.tokens_per_second, ".1f"),
    ):
        if value is not None:
            fields.append(f"{name}={value:{fmt}}")
    # then the method's own figures (DPO: rewards/accuracies=0.75 …), by name
    fields.extend(f"{name}={value:.4g}" for name, value in sorted((row.figures or {}).items()))
    return f"{row.time.isoformat(timespec='seconds')} " + " ".join(fields)


CSV_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "eval_loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_second",
    "time",
)


def format_csv(
    rows: Iterable[MetricRead], headers: dict[str, str] | None = None, figures: list[str] | None = None
) -> str:
    """Metric rows as CSV, a column per field (named as in `headers` where it names one), then a
    column per figure in `figures` (default: every figure name in `rows`, sorted), named as is."""
    rows = list(rows)  # read twice when `figures` is not given
    if figures is None:
        figures = sorted({name for row in rows for name in row.figures or {}})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([(headers or {}).get(column, column) for column in CSV_COLUMNS] + figures)
    for row in rows:
        record = row.model_dump(mode="json")  # the time as ISO 8601 text
        own = record["figures"] or {}
        writer.writerow(
            ["" if record[column] is None else record[column] for column in CSV_COLUMNS]
            + [own.get(name, "") for name in figures]
        )
    return out.getvalue()


def _read(
    job_id: str, owner: str, after_step: int, evals_after: int
) -> tuple[list[MetricRead], list[MetricRead], JobRead | None]:
    """One poll of a stream: the new rows, the late evaluations, and the job once it has stopped."""
    status, rows, evals = jobs.metrics_since(job_id, owner, after_step, evals_after)
    return rows, evals, jobs.get_job(job_id, owner) if status.stopped else None


async def metric_events(job_id: str, owner: str, after_step: int) -> AsyncIterator[dict]:
    """Rows as they are written (`metric`, `id:` is the step), and for every evaluated step an
    `eval` event (the step's row with its eval_loss, and its figures with the eval set's among
    them, no `id:`): right after the step's `metric` event when the evaluation was already
    merged into the row, or once it arrives for a step already sent. Ends with an `end` event
    once the job has stopped (finished or paused).

    While the database does not answer, the stream waits, polling less often, and then goes on
    from the same step. A comment says so (comments, not events: every SSE client skips them);
    after FINETUNE_STREAM_OUTAGE_S it closes cleanly, without `end`, naming the step to reconnect
    from (the client's Last-Event-ID)."""
    settings = get_settings()
    # A client resuming after step N may have missed the evaluation of step N (it is written
    # after the step's row, and before any later row).
    evals_after = after_step - 1
    wait = settings.stream_poll_s
    down_since: float | None = None
    while True:
        try:
            rows, evals, job = await run_in_threadpool(_read, job_id, owner, after_step, evals_after)
        except UNREACHABLE as exc:
            if down_since is None:
                down_since = time.monotonic()
                log.warning("metric stream of %s: the database did not answer: %s", job_id, exc)
                yield {"comment": f"database unavailable; waiting up to {settings.stream_outage_s:g} s"}
            elif time.monotonic() - down_since > settings.stream_outage_s:
                yield {
                    "comment": f"database still unavailable; reconnect with Last-Event-ID: {after_step}",
                    "retry": RETRY_AFTER_S * 1000,
                }
                return
            wait = min(wait * 2, RETRY_AFTER_S)
            await asyncio.sleep(wait)
            continue
        if down_since is not None:
            down_since, wait = None, settings.stream_poll_s
            yield {"comment": "database available again"}
        for row in evals:
            evals_after = row.step
            yield {"event": "eval", "data": row.model_dump_json()}
        for row in rows:
            after_step = row.step
            yield {"id": str(row.step), "event": "metric", "data": row.model_dump_json()}
            # Whether the evaluation was merged into the row before this read or arrives after
            # it is a race (a fast job writes a step's row and its evaluation in one flush):
            # either way the client gets the same `eval` event.
            if row.eval_loss is not None:
                evals_after = row.step
                yield {"event": "eval", "data": row.model_dump_json()}
        if job is not None:
            yield {"event": "end", "data": json.dumps({"status": job.status, "error": job.error})}
            return
        await asyncio.sleep(wait)
