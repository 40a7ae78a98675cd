"""OpenAI's files and fine-tuning API under /v1, over the same services as the service's own
routes: `OpenAI(base_url="http://HOST/v1", api_key=KEY)` lists, creates and follows the same
jobs that `POST /jobs` makes."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from app.api.auth import Owner
from app.api.downloads import REDIRECT, send_file
from app.api.logs import format_csv
from app.api.urls import BaseUrl
from app.errors import InvalidFields, ModelNotFound
from app.ids import DATASET_ID_PATTERN, JOB_ID_PATTERN, STEP
from app.models import Dataset, Job
from app.schemas import JobRead
from app.services import datasets, jobs
from app.services.pagination import cursor_of
from app.services.timeline import job_timeline
from app.spec import (
    DEFAULT_BASE_MODEL,
    DEFAULT_MAX_SEQ_LENGTH,
    MAX_SEQ_LENGTH,
    MIN_SEQ_LENGTH,
    ModelOrDataset,
)

from .errors import ERROR_RESPONSES
from .inference import resolve as resolve_model
from .objects import (
    RESULT_HEADERS,
    checkpoint_object,
    event_object,
    file_object,
    job_object,
    page,
    parse_checkpoint_step,
    parse_event_id,
    results_file_object,
    results_job_id,
)
from .requests import OPENAI_NAMES, CreateJobRequest, job_spec

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)


def after(pattern: str, what: str) -> Any:
    """A page cursor's query parameter: the id of the last object of the page before (checked
    for shape, so that nothing else reaches the database)."""
    return Query(pattern=f"^{pattern}$", description=f"The last {what} of the page before.")


# spelled out as Annotated here (not built by a function), so that type checkers take them as types
FileAfter = Annotated[str | None, after(DATASET_ID_PATTERN, "file id")]
JobAfter = Annotated[str | None, after(JOB_ID_PATTERN, "job id")]
EventAfter = Annotated[str | None, after(r"ftevent-(event|metric)-[0-9]{1,9}", "event id")]
CheckpointAfter = Annotated[str | None, after(rf"ftckpt-{JOB_ID_PATTERN}-{STEP}", "checkpoint id")]
Limit = Annotated[int, Query(ge=1, le=100)]
Object = dict[str, Any]
# A metadata filter in a job list's query: metadata[KEY]=VALUE
METADATA_PARAM = re.compile(r"metadata\[(.{1,64})\]")


# --- files: the service's uploaded datasets ---------------------------------------------------
@router.post("/files")
def create_file(
    owner: Owner,
    file: Annotated[
        UploadFile, File(description='Chat JSONL (`{"messages": [...]}` per line), or oasst rows.')
    ],
    purpose: Annotated[str, Form(max_length=64)],
    tokenizer: Annotated[ModelOrDataset, Form()] = DEFAULT_BASE_MODEL,
    max_seq_length: Annotated[int, Form(ge=MIN_SEQ_LENGTH, le=MAX_SEQ_LENGTH)] = DEFAULT_MAX_SEQ_LENGTH,
) -> Object:
    """Upload a training file. It is validated at once: a file with bad lines is kept with
    `status: "error"` and the lines and reasons in `status_details`."""
    if purpose != "fine-tune":
        raise InvalidFields(("purpose", f"only 'fine-tune' files are kept here, not {purpose!r}"))
    return file_object(datasets.upload_dataset(file.filename, file.file, owner, tokenizer, max_seq_length))


@router.get("/files")
def list_files(
    owner: Owner,
    after: FileAfter = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Annotated[str, Query(pattern="^desc$", description="Newest first only.")] = "desc",
    purpose: str | None = None,
) -> Object:
    if purpose not in (None, "fine-tune"):
        return page([], False)
    cursor = cursor_of(Dataset, after, Dataset.owner == owner) if after else None
    listed = datasets.list_datasets(owner, limit, cursor)
    return page([file_object(d) for d in listed.items], listed.next is not None)


def _results(job_id: str, owner: str) -> tuple[JobRead, bytes]:
    """A job's result file: its metric rows as CSV, headed as OpenAI's (`train_loss`, …)."""
    job = jobs.get_job(job_id, owner)
    _, rows, _ = jobs.metrics_since(job_id, owner, -1)
    return job, format_csv(rows, RESULT_HEADERS).encode()


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, owner: Owner) -> Object:
    job_id = results_job_id(file_id)
    if job_id is not None:
        job, content = _results(job_id, owner)
        return results_file_object(job, len(content))
    return file_object(datasets.get_dataset(file_id, owner))


@router.get("/files/{file_id}/content", response_class=FileResponse, responses=REDIRECT)
def file_content(file_id: str, owner: Owner) -> Response:
    """The upload as sent, or a job's result file (`results-<job id>`: its metrics as CSV)."""
    job_id = results_job_id(file_id)
    if job_id is not None:
        return Response(_results(job_id, owner)[1], media_type="text/csv")
    return send_file(datasets.uploaded_file(file_id, owner), "application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(file_id: str, owner: Owner) -> Object:
    job_id = results_job_id(file_id)
    if job_id is not None:
        jobs.get_job(job_id, owner)  # 404 unless it is the owner's
        raise InvalidFields(("file_id", "a result file goes with its job; it can't be deleted"))
    datasets.delete_dataset(file_id, owner)
    return {"id": file_id, "object": "file", "deleted": True}


# --- fine-tuning jobs: the service's jobs -----------------------------------------------------
def _job(job: JobRead, base: str) -> Object:
    return job_object(job, base, jobs.estimated_finish(job))


def _continued_from(model: str, owner: str) -> dict[str, str | None] | None:
    """`model: ft:…`, a fine-tuned model or checkpoint of the owner's (read as /v1/models and the
    completions read it), as the spec's `init_from`; None for a base model."""
    if not model.startswith("ft:"):
        return None
    try:
        target = resolve_model(model, owner)
    except ModelNotFound as exc:
        raise InvalidFields(("model", str(exc.detail))) from None
    return {"job": target.job_id, "checkpoint": target.checkpoint}


@router.post("/fine_tuning/jobs")
def create_job(
    owner: Owner,
    base: BaseUrl,
    request: CreateJobRequest,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    x_stainless_retry_count: Annotated[str | None, Header()] = None,
) -> Object:
    """Create a job. QLoRA settings go in extra body fields under the spec's names (`lora`,
    `quantization`, `training`, …). A request the client retries (`x-stainless-retry-count`
    above 0, or the same `Idempotency-Key`) returns the job its first attempt made."""
    retry = (x_stainless_retry_count or "0") not in ("", "0")
    spec = job_spec(request, _continued_from(request.model, owner))
    try:
        job = jobs.create_job(spec, owner, idempotency_key=idempotency_key, retry=retry)
    except InvalidFields as exc:  # e.g. an upload that is invalid: named as this request named it
        raise exc.renamed(OPENAI_NAMES) from None
    return _job(job, base)


@router.get("/fine_tuning/jobs")
def list_jobs(
    request: Request, owner: Owner, base: BaseUrl, after: JobAfter = None, limit: Limit = 20
) -> Object:
    """Newest first; `metadata[KEY]=VALUE` (as the client sends `metadata={...}`) keeps only the
    jobs with those labels, `metadata=null` those without any."""
    query = request.query_params
    labels = {m.group(1): v for name, v in query.multi_items() if (m := METADATA_PARAM.fullmatch(name))}
    cursor = cursor_of(Job, after, Job.owner == owner) if after else None
    listed = jobs.list_jobs(owner, None, limit, cursor, labels, unlabelled=query.get("metadata") == "null")
    return page([_job(job, base) for job in listed.items], listed.next is not None)


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, owner: Owner, base: BaseUrl) -> Object:
    return _job(jobs.get_job(job_id, owner), base)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, owner: Owner, base: BaseUrl) -> Object:
    """A queued or paused job is cancelled at once, a running one at its next step."""
    return _job(jobs.cancel_job(job_id, owner), base)


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, owner: Owner, base: BaseUrl) -> Object:
    """A running job saves a checkpoint at its next step and stops (`paused`). 400 unless the
    job is queued or running."""
    return _job(jobs.pause_job(job_id, owner), base)


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, owner: Owner, base: BaseUrl) -> Object:
    """Queue a paused (or failed, or cancelled) job to continue from its latest checkpoint."""
    return _job(jobs.resume_job(job_id, owner, None), base)


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, owner: Owner, after: EventAfter = None, limit: Limit = 20) -> Object:
    """State changes and messages (`type: "message"`) and per-step metrics (`type: "metrics"`,
    `data` with `step`, `train_loss`, `valid_loss`, …), newest first."""
    cursor = parse_event_id(after) if after is not None else None
    job = await run_in_threadpool(jobs.get_job, job_id, owner)
    entries, more = await run_in_threadpool(job_timeline, job_id, owner, cursor, limit)
    return page([event_object(entry, job.total_steps) for entry in entries], more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str, owner: Owner, base: BaseUrl, after: CheckpointAfter = None, limit: Limit = 10
) -> Object:
    """Checkpoints newest first, each with its metrics and a `download_url` (the zip that
    `GET /jobs/{id}/checkpoints/{name}/download` serves)."""
    before_step = parse_checkpoint_step(after) if after is not None else None
    job = jobs.get_job(job_id, owner)
    listed = [
        c
        for c in reversed(jobs.list_checkpoints(job_id, owner))
        if before_step is None or c.step < before_step
    ]
    shown = listed[:limit]
    metrics = jobs.metrics_at(job_id, owner, [c.step for c in shown])
    return page([checkpoint_object(job, c, metrics.get(c.step), base) for c in shown], len(listed) > limit)
