"""Experiment tracking: a job's run in MLflow or Weights & Biases, as its spec's `integrations` ask.

A thread of its own mirrors into each tracker what the database holds: the spec as the run's
parameters, each metric row as the live stream sends it (the step's figures once its row is
written: loss, learning rate, grad norm, tokens/s, epoch and the method's own; an evaluation's
once it arrives), then the adapter zip (MLflow) and how the run ended. Training hands the thread
nothing and never waits for it: rows are read back from the database every POLL_S. A tracker
that fails (down, refusing, not installed) is dropped for the rest of the job, with one event
saying why; the others go on. At the end the job waits at most FINISH_WAIT_S for the trackers
to take what is left. A resumed job continues its run (MLflow: the run tagged with its id; W&B:
the run whose id is the job's).

Where runs go is the operator's: FINETUNE_MLFLOW_TRACKING_URI, and W&B's own variables
(WANDB_API_KEY, WANDB_BASE_URL, WANDB_MODE=offline: runs kept under the job's folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select

from app.db import session_scope
from app.models import Metric
from app.schemas import MetricRead
from app.services.runs import Claim, log_message
from app.settings import Settings
from app.spec import Integration, JobSpec

log = logging.getLogger(__name__)

POLL_S = 2.0
FINISH_WAIT_S = 60.0
# A run's end: trained to the end, stopped early (a cancel, a pause, a shutdown), or failed.
FINISHED, KILLED, FAILED = "FINISHED", "KILLED", "FAILED"
# A row's own figures, as the metric stream names them; a method's figures follow by their names.
ROW_FIGURES = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch")

# mlflow's HTTP client retries a refused request for about four minutes by default; a tracker
# that is down is dropped after seconds instead. Neither library reports usage or crashes to its
# vendor from here. (The operator's own values win.)
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "WANDB_ERROR_REPORTING": "false",
}


# What MLflow takes in a parameter's name: letters, digits, `_ - . / :` and spaces.
NOT_IN_A_NAME = re.compile(r"[^\w./ :-]")


class Tracker(Protocol):
    title: str

    def start(self) -> str:
        """Open (or reopen) the job's run; a sentence naming it."""

    def log(self, step: int, figures: dict[str, float], time_ms: int) -> None: ...

    def log_adapter(self, path: Path) -> None: ...

    def end(self, status: str) -> None: ...


def spec_params(spec: JobSpec) -> dict[str, str]:
    """The spec as flat parameters: `training.learning_rate` → "0.0002" (lists and null as JSON;
    characters MLflow refuses in a name, as a metadata key may have them, as `_`)."""

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, str]]:
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(prefix + NOT_IN_A_NAME.sub("_", key) + ".", item)
        else:
            yield prefix.removesuffix("."), value if isinstance(value, str) else json.dumps(value)

    return dict(walk("", spec.model_dump(mode="json", exclude={"integrations"})))


class MlflowTracker:
    title = "MLflow"

    def __init__(self, uri: str, integration: Integration, claim: Claim):
        assert integration.mlflow is not None
        self.uri, self.settings, self.claim = uri, integration.mlflow, claim
        self.client: Any = None
        self.run_id = ""

    def start(self) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = client = MlflowClient(tracking_uri=self.uri)
        name, job_id = self.settings.experiment, self.claim.job_id
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        earlier = client.search_runs(
            [experiment_id], filter_string=f"tags.`finetune.job_id` = '{job_id}'", max_results=1
        )
        if earlier:  # a resumed job continues its run
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            return f"MLflow run {self.run_id} in experiment {name!r} continues"
        run = client.create_run(
            experiment_id,
            run_name=self.settings.run_name or job_id,
            tags={"finetune.job_id": job_id, "finetune.base_model": self.claim.spec.base_model},
        )
        self.run_id = run.info.run_id
        params = [Param(key, value) for key, value in spec_params(self.claim.spec).items()]
        for first in range(0, len(params), 100):  # mlflow's most per call
            client.log_batch(self.run_id, params=params[first : first + 100])
        return f"MLflow run {self.run_id} in experiment {name!r}"

    def log(self, step: int, figures: dict[str, float], time_ms: int) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(name, value, time_ms, step) for name, value in figures.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_adapter(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandbTracker:
    title = "W&B"

    def __init__(self, integration: Integration, claim: Claim, folder: Path):
        assert integration.wandb is not None
        self.settings, self.claim, self.folder = integration.wandb, claim, folder
        self.run: Any = None

    def start(self) -> str:
        import wandb

        job_id = self.claim.job_id
        self.run = wandb.init(
            project=self.settings.project,
            entity=self.settings.entity,
            name=self.settings.name or job_id,
            tags=[*(self.settings.tags or []), f"finetune/{job_id}"],
            id=job_id,  # a resumed job continues its run
            resume="allow",
            dir=str(self.folder),
            config=self.claim.spec.model_dump(mode="json", exclude={"integrations"}),
            # not the training process' stdout and stderr
            settings=wandb.Settings(silent=True, console="off"),
        )
        where = self.run.url or f"{self.folder / 'wandb'} (offline)"
        return f"W&B run {job_id} in project {self.settings.project!r}: {where}"

    def log(self, step: int, figures: dict[str, float], time_ms: int) -> None:
        self.run.log(figures, step=step)

    def log_adapter(self, path: Path) -> None:
        pass  # the adapter is the service's to serve; W&B gets the run's figures

    def end(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == FAILED else 0)


def trackers_for(claim: Claim, settings: Settings, folder: Path) -> list[Tracker]:
    trackers: list[Tracker] = []
    for integration in claim.spec.integrations:
        if integration.type == "mlflow":
            trackers.append(MlflowTracker(settings.mlflow_tracking_uri, integration, claim))
        else:
            trackers.append(WandbTracker(integration, claim, folder))
    return trackers


def row_figures(row: MetricRead, evaluation_only: bool = False) -> dict[str, float]:
    """A metric row's figures; `evaluation_only`: those an evaluation that arrived after the row
    added (eval_loss, the method's `eval_…` figures)."""
    figures = {name: getattr(row, name) for name in ROW_FIGURES} | (row.figures or {})
    return {
        name: float(value)
        for name, value in figures.items()
        if value is not None and (not evaluation_only or name.startswith("eval_"))
    }


def rows_since(job_id: str, after_step: int, evals_after: int) -> tuple[list[MetricRead], list[MetricRead]]:
    """The job's rows after `after_step`, and those up to it whose evaluation was merged in after
    step `evals_after` (app.services.jobs.metrics_since's reading, without the owner's check and
    the queue client that module brings into the training process)."""
    job = Metric.job_id == job_id
    with session_scope() as session:
        rows = session.scalars(select(Metric).where(job, Metric.step > after_step).order_by(Metric.step))
        evaluated = (Metric.step > evals_after, Metric.step <= after_step, Metric.eval_loss.is_not(None))
        evals = session.scalars(select(Metric).where(job, *evaluated).order_by(Metric.step))
        return [MetricRead.model_validate(row) for row in rows], [
            MetricRead.model_validate(row) for row in evals
        ]


class Tracking:
    """The job's trackers, fed from their own thread (`tracking` starts and ends it)."""

    def __init__(self, claim: Claim, trackers: list[Tracker]):
        self.claim = claim
        self.trackers = trackers
        self.adapter: Path | None = None
        self.status = KILLED
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tracking-{claim.job_id}", daemon=True)

    def log_adapter(self, adapter: Path) -> None:
        """The job's adapter zip, for the trackers that keep one (sent at the end)."""
        self.adapter = adapter

    def start(self) -> None:
        self._thread.start()

    def finish(self, status: str) -> None:
        """Send what is left and end the runs, waiting at most FINISH_WAIT_S."""
        self.status = status
        self._done.set()
        self._thread.join(FINISH_WAIT_S)
        if self._thread.is_alive():
            self._say(
                f"tracking: still sending after {FINISH_WAIT_S:g} s; the job ends without waiting (its "
                "run may lack the last figures or the adapter)"
            )

    def _run(self) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "start")
        resumed = self.claim.resume_from
        after_step = evals_after = int(resumed.rpartition("-")[2]) if resumed else 0
        finishing = False
        while self.trackers and not finishing:
            finishing = self._done.wait(POLL_S)
            try:
                after_step, evals_after = self._send(after_step, evals_after)
            except Exception as exc:  # the database: the rows wait for the next poll
                log.warning("job %s: tracking could not read metric rows: %s", self.claim.job_id, exc)
        for tracker in list(self.trackers):
            if self.adapter is not None:
                self._call(tracker, "log_adapter", self.adapter, drop=False)
            self._call(tracker, "end", self.status)

    def _send(self, after_step: int, evals_after: int) -> tuple[int, int]:
        """Each row after `after_step`, and evaluations merged since into rows already sent (as
        app.api.logs' stream reads them); where the reading has got to."""
        rows, evals = rows_since(self.claim.job_id, after_step, evals_after)
        sends = [(row, True) for row in evals] + [(row, False) for row in rows]
        for row, evaluation_only in sends:
            figures = row_figures(row, evaluation_only)
            time_ms = int(row.time.timestamp() * 1000)
            for tracker in list(self.trackers):
                self._call(tracker, "log", row.step, figures, time_ms)
            if evaluation_only or row.eval_loss is not None:
                evals_after = row.step
            if not evaluation_only:
                after_step = row.step
        return after_step, evals_after

    def _call(self, tracker: Tracker, action: str, *args: Any, drop: bool = True) -> None:
        """`tracker.action(*args)`; a failure is said, and drops the tracker unless `drop` is
        false (its run is still ended)."""
        try:
            said = getattr(tracker, action)(*args)
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:500]}"
            log.warning(
                "job %s: %s tracking failed at %s (%s)", self.claim.job_id, tracker.title, action, error
            )
            if drop:
                self.trackers.remove(tracker)
            self._say(
                f"tracking: {tracker.title} failed ({error})"
                + ("; the job goes on without it" if drop else ""),
                tracker=tracker.title,
                error=error,
            )
            return
        if action == "start":
            self._say(f"tracking: {said}", tracker=tracker.title)

    def _say(self, message: str, **data: Any) -> None:
        try:
            log_message(self.claim.job_id, message, **data)
        except Exception as exc:  # the database: the worker's log keeps it
            log.warning("job %s: %s (not recorded: %s)", self.claim.job_id, message, exc)


@contextmanager
def tracking(claim: Claim, settings: Settings, folder: Path, main: bool = True) -> Iterator[Tracking]:
    """The job's trackers for the duration of the block (none on other ranks than the main one,
    or without `integrations`): the run ends FINISHED once an adapter was logged, KILLED when the
    block ends without one (a cancel, a pause, a shutdown), FAILED on an exception."""
    run = Tracking(claim, trackers_for(claim, settings, folder) if main else [])
    if not run.trackers:
        yield run
        return
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    run.start()
    status = FAILED
    try:
        yield run
        status = FINISHED if run.adapter is not None else KILLED
    finally:
        run.finish(status)
