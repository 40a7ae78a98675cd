"""The service's jobs, uploads, events and checkpoints as OpenAI's objects.

Ids are the service's own (a file id is the upload's `ds_…` id, a job id its `job_…` id), so
both APIs name the same things. Fields OpenAI has no name for are added under their own names
(`adapter_url`, `download_url`, `sha256`): its client keeps unknown fields."""

from __future__ import annotations

from datetime import datetime
from pathlib import PurePath
from typing import Any

from app.models import DatasetStatus, JobStatus
from app.schemas import CheckpointRead, DatasetRead, EventRead, JobRead, MetricRead
from app.services.timeline import Entry
from app.spec import JobSpec, stored_spec

from .requests import RECIPE_LEARNING_RATE

# How many of an invalid upload's problems its file object spells out.
PROBLEMS_SHOWN = 5


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def file_object(dataset: DatasetRead) -> dict[str, Any]:
    """`processed` when the upload validated; else `error`, with its problems in `status_details`."""
    details = None
    if dataset.status != DatasetStatus.READY:
        problems = dataset.report.get("problems", [])
        lines = [f"line {p['line']}: {p['error']}" if p.get("line") else p["error"] for p in problems]
        details = "; ".join(lines[:PROBLEMS_SHOWN])
        hidden = dataset.report.get("problem_count", len(problems)) - PROBLEMS_SHOWN
        if hidden > 0:
            details += f"; and {hidden} more (GET /datasets/{dataset.id})"
    return {
        "id": dataset.id,
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": unix(dataset.created_at),
        "filename": dataset.filename,
        "purpose": "fine-tune",
        "status": "processed" if dataset.status == DatasetStatus.READY else "error",
        "status_details": details,
        "expires_at": None,
    }


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def hyperparameters(spec: JobSpec) -> dict[str, Any]:
    training = spec.training
    return {
        "n_epochs": _number(training.epochs),
        "batch_size": training.batch_size * training.gradient_accumulation_steps,
        "learning_rate_multiplier": training.learning_rate / RECIPE_LEARNING_RATE,
    }


def method_object(spec: JobSpec, hyper: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `method`: the training hyperparameters under the method's own section, DPO's with
    its beta and the spec's other DPO settings beside them."""
    dpo = spec.dpo
    if dpo is None:
        return {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    return {"type": "dpo", "dpo": {"hyperparameters": {**hyper, **dpo.model_dump()}}}


def integrations(spec: JobSpec) -> list[dict[str, Any]]:
    """OpenAI's `integrations`: `{"type": "wandb", "wandb": {"project", "entity", "name", "tags"}}`,
    an MLflow one as the spec has it."""
    return [
        {"type": integration.type, integration.type: getattr(integration, integration.type).model_dump()}
        for integration in spec.integrations
    ]


def model_name(spec: JobSpec) -> str:
    """The base model as a user named it: a hub id, or a local folder's name."""
    base = spec.base_model
    return PurePath(base).name if base.startswith("/") else base


def fine_tuned_model(job: JobRead, step: int | None = None) -> str:
    """OpenAI's `ft:<model>:<owner>:<suffix>:<job>` naming, `:ckpt-step-N` for a checkpoint."""
    spec = stored_spec(job.spec)
    name = f"ft:{model_name(spec)}:{job.owner}:{spec.name or ''}:{job.id}"
    return name if step is None else f"{name}:ckpt-step-{step}"


# A job's result file: its metric rows as CSV, once it has stopped (OpenAI's `result_files`); a
# column per figure of the job's method after the fixed ones, named as the method names them.
RESULTS_PREFIX = "results-"
RESULT_HEADERS = {"loss": "train_loss", "eval_loss": "valid_loss"}


def results_file_id(job_id: str) -> str:
    return RESULTS_PREFIX + job_id


def results_job_id(file_id: str) -> str | None:
    """The job whose result file this id names, or None (an upload's id)."""
    return file_id.removeprefix(RESULTS_PREFIX) if file_id.startswith(RESULTS_PREFIX) else None


def results_file_object(job: JobRead, size: int) -> dict[str, Any]:
    return {
        "id": results_file_id(job.id),
        "object": "file",
        "bytes": size,
        "created_at": unix(job.finished_at or job.updated_at),
        "filename": f"{job.id}-step-metrics.csv",
        "purpose": "fine-tune-results",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def job_object(job: JobRead, base_url: str, estimated_finish: datetime | None = None) -> dict[str, Any]:
    spec = stored_spec(job.spec)
    hyper = hyperparameters(spec)
    succeeded = job.status == JobStatus.SUCCEEDED
    error = None
    if job.status == JobStatus.FAILED:
        error = {"code": "training_failed", "message": job.error or "the job failed", "param": None}
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "model": model_name(spec),
        "fine_tuned_model": fine_tuned_model(job) if succeeded else None,
        "finished_at": unix(job.finished_at),
        "status": job.status,
        "error": error,
        "hyperparameters": hyper,
        "method": method_object(spec, hyper),
        "training_file": spec.dataset.source,
        "validation_file": spec.dataset.validation_source,
        "result_files": [results_file_id(job.id)] if job.status.stopped else [],
        "trained_tokens": job.trained_tokens,
        "seed": spec.training.seed,
        "estimated_finish": unix(estimated_finish),
        "metadata": spec.metadata,
        "organization_id": job.owner,
        "user_provided_suffix": spec.name,
        "integrations": integrations(spec),
        "adapter_url": f"{base_url}/jobs/{job.id}/adapter" if succeeded else None,
    }


def metric_data(row: MetricRead, total_steps: int | None) -> dict[str, Any]:
    """A metrics event's `data`: OpenAI's fields, then the method's own figures named as the
    method names them (DPO: `rewards/margins`, `eval_rewards/accuracies`, …)."""
    data: dict[str, Any] = {
        "step": row.step,
        "total_steps": total_steps,
        "train_loss": row.loss,
        "valid_loss": row.eval_loss,
        "learning_rate": row.learning_rate,
        "epoch": row.epoch,
        "grad_norm": row.grad_norm,
        "tokens_per_second": row.tokens_per_second,
    }
    data.update((name, value) for name, value in sorted((row.figures or {}).items()) if name not in data)
    return data


def event_object(entry: Entry, total_steps: int | None) -> dict[str, Any]:
    row = entry.row
    base = {
        "id": f"ftevent-{entry.kind}-{entry.id}",
        "object": "fine_tuning.job.event",
        "created_at": unix(row.time),
    }
    if isinstance(row, EventRead):
        failed = (row.data or {}).get("status") == JobStatus.FAILED
        return {
            **base,
            "level": "error" if failed else "info",
            "message": row.message,
            "type": "message",
            "data": row.data,
        }
    losses = (("training loss", row.loss), ("validation loss", row.eval_loss))
    measured = ", ".join(f"{name}={value:.4f}" for name, value in losses if value is not None)
    message = f"Step {row.step}/{total_steps or '?'}: {measured}"
    return {
        **base,
        "level": "info",
        "message": message,
        "type": "metrics",
        "data": metric_data(row, total_steps),
    }


def parse_event_id(event_id: str) -> tuple[str, int]:
    """`ftevent-<kind>-<row id>` (the route checked its shape) → (kind, row id)."""
    _, kind, number = event_id.split("-")
    return kind, int(number)


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id}-{step}"


def parse_checkpoint_step(checkpoint: str) -> int:
    """`ftckpt-<job id>-<step>` (the route checked its shape) → the step."""
    return int(checkpoint.rpartition("-")[2])


def checkpoint_object(
    job: JobRead, checkpoint: CheckpointRead, metric: MetricRead | None, base_url: str
) -> dict[str, Any]:
    metrics: dict[str, float | None] = {"step": checkpoint.step}
    if metric is not None:
        metrics.update(train_loss=metric.loss, valid_loss=metric.eval_loss)
    return {
        "id": checkpoint_id(job.id, checkpoint.step),
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": fine_tuned_model(job, checkpoint.step),
        "fine_tuning_job_id": job.id,
        "step_number": checkpoint.step,
        "metrics": metrics,
        "download_url": f"{base_url}/jobs/{job.id}/checkpoints/{checkpoint.name}/download",
        "bytes": checkpoint.size_bytes,
        "sha256": checkpoint.sha256,
    }
