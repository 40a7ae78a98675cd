"""Routes: jobs, their metrics, files and samples; datasets; /healthz and /metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from app.api import waiting
from app.api.auth import Owner
from app.api.downloads import REDIRECT, send_file
from app.api.logs import format_csv, format_text_line, metric_events
from app.errors import InvalidCursor, InvalidFields
from app.models import JobStatus, SampleStatus
from app.schemas import (
    ERROR_RESPONSES,
    CheckpointRead,
    DatasetRead,
    EventRead,
    JobRead,
    MetricRead,
    Page,
    PreflightRead,
    ResumeRequest,
    SampleRead,
    SampleRequest,
)
from app.services import datasets, figures, jobs, monitoring, preflight, samples
from app.services.lineage import resolve_init_from
from app.settings import get_settings
from app.spec import (
    DEFAULT_BASE_MODEL,
    DEFAULT_MAX_SEQ_LENGTH,
    MAX_SEQ_LENGTH,
    MIN_SEQ_LENGTH,
    JobSpec,
    ModelOrDataset,
)

# /healthz answers without a key; every other route may answer any documented error.
ops_router = APIRouter()
router = APIRouter(responses=ERROR_RESPONSES)

JobStatusFilter = Annotated[JobStatus | None, Query(description="Only jobs in this status.")]
Limit = Annotated[int, Query(ge=1, le=1000)]
# Step numbers and event ids are 32-bit integers in the database.
MAX_ID = 2**31 - 1


@ops_router.get("/healthz", tags=["ops"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    tags=["ops"],
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def prometheus_metrics(request: Request) -> PlainTextResponse:
    """Totals for Prometheus: jobs by status, queue depth, tokens/s. With the
    operator's FINETUNE_METRICS_TOKEN as bearer (`authorization: {credentials: TOKEN}`), also
    each running job's step, steps/s and tokens/s, labelled with its id and owner."""
    per_job = request.state.operator
    return PlainTextResponse(monitoring.render(per_job=per_job), media_type=CONTENT_TYPE_LATEST)


# The body is required: an absent one gets the 422 below, not FastAPI's.
@router.post(
    "/jobs",
    status_code=201,
    response_model=JobRead,
    tags=["jobs"],
    openapi_extra={"requestBody": {"required": True}},
)
def create_job(
    owner: Owner,
    spec: Annotated[JobSpec, Body()] = None,  # type: ignore[assignment]
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255, description="Sent again with the same spec, returns the job made the first time."
        ),
    ] = None,
) -> JobRead:
    """Submit a fine-tune job. `{}` runs the default recipe (every field has a default)."""
    if spec is None:  # an empty body is more likely a mistake than a request for a long GPU run
        raise InvalidFields(("body", "send a job spec: `{}` asks for the default recipe (Phi-2, oasst1)"))
    return jobs.create_job(spec, owner, idempotency_key=idempotency_key)


@router.post("/preflight", response_model=PreflightRead, tags=["jobs"])
def preflight_job(owner: Owner, spec: Annotated[JobSpec | None, Body()] = None) -> PreflightRead:
    """What `POST /jobs` would say of this spec's memory: its estimate against the registered
    workers' GPUs, and the problems it would be refused for. Queues nothing; no body: the
    default recipe."""
    return preflight.read(preflight.check(resolve_init_from(spec or JobSpec(), owner)))


@router.get("/jobs", response_model=Page[JobRead], tags=["jobs"])
def list_jobs(
    owner: Owner, status: JobStatusFilter = None, limit: Limit = 50, cursor: str | None = None
) -> Page[JobRead]:
    return jobs.list_jobs(owner, status, limit, cursor)


@router.get("/jobs/{job_id}", response_model=JobRead, tags=["jobs"])
def get_job(job_id: str, owner: Owner) -> JobRead:
    return jobs.get_job(job_id, owner)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobRead, tags=["jobs"])
def cancel_job(job_id: str, owner: Owner) -> JobRead:
    """Cancel: a queued job at once, a running one at its next step boundary."""
    return jobs.cancel_job(job_id, owner)


@router.post("/jobs/{job_id}/pause", status_code=202, response_model=JobRead, tags=["jobs"])
def pause_job(job_id: str, owner: Owner) -> JobRead:
    """Pause: a queued job at once; a running one saves a checkpoint at its next step boundary
    and stops (`paused`). Resume continues from that checkpoint."""
    return jobs.pause_job(job_id, owner)


@router.post("/jobs/{job_id}/resume", status_code=202, response_model=JobRead, tags=["jobs"])
def resume_job(job_id: str, owner: Owner, body: Annotated[ResumeRequest | None, Body()] = None) -> JobRead:
    """Queue a paused, failed or cancelled job again from a checkpoint (default the latest)."""
    return jobs.resume_job(job_id, owner, body.checkpoint if body else None)


@router.get(
    "/jobs/{job_id}/logs",
    response_model=Page[MetricRead],
    tags=["metrics"],
    responses={200: {"content": {"text/event-stream": {}, "text/plain": {}, "text/csv": {}}}},
)
async def job_logs(
    request: Request,
    job_id: str,
    owner: Owner,
    after_step: Annotated[int | None, Query(ge=-1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    format: Annotated[str, Query(pattern="^(json|text|csv)$")] = "json",
    accept: Annotated[str, Header()] = "",
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response | Page[MetricRead]:
    """Metric rows. `Accept: text/event-stream` streams them live; `?format=text` gives a log
    file, `?format=csv` a table."""
    if "text/event-stream" in accept:
        start = after_step if after_step is not None else -1
        if last_event_id:
            if not last_event_id.isdigit() or int(last_event_id) > MAX_ID:
                raise InvalidCursor("Last-Event-ID must be a step number")
            start = int(last_event_id)
        await run_in_threadpool(jobs.get_job, job_id, owner)  # 404 before the stream starts
        return EventSourceResponse(metric_events(job_id, owner, start), ping=15)
    page = await run_in_threadpool(jobs.list_metrics, job_id, owner, after_step, limit)
    if format == "text":
        text = "".join(format_text_line(row) + "\n" for row in page.items)
        return PlainTextResponse(text)
    if format == "csv":  # the same columns on every page: the figures of all the job's rows
        names = await run_in_threadpool(figures.figure_names, job_id, owner)
        return PlainTextResponse(format_csv(page.items, figures=names), media_type="text/csv")
    return page


@router.get("/jobs/{job_id}/events", response_model=Page[EventRead], tags=["jobs"])
def job_events(
    job_id: str, owner: Owner, after: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None, limit: Limit = 200
) -> Page[EventRead]:
    return jobs.list_events(job_id, owner, after, limit)


@router.get("/jobs/{job_id}/checkpoints", response_model=Page[CheckpointRead], tags=["artifacts"])
def job_checkpoints(job_id: str, owner: Owner) -> Page[CheckpointRead]:
    return Page(items=jobs.list_checkpoints(job_id, owner), next=None)


@router.get(
    "/jobs/{job_id}/checkpoints/{name}/download",
    response_class=FileResponse,
    tags=["artifacts"],
    responses={200: {"content": {"application/zip": {}}}, **REDIRECT},
)
def download_checkpoint(job_id: str, name: str, owner: Owner) -> Response:
    """The checkpoint's zip (`sha256` in the listing and in the `X-Checksum-Sha256` header)."""
    return send_file(jobs.checkpoint_zip(job_id, owner, name), "application/zip")


@router.get(
    "/jobs/{job_id}/adapter",
    response_class=FileResponse,
    tags=["artifacts"],
    responses={200: {"content": {"application/zip": {}}}, **REDIRECT},
)
def download_adapter(job_id: str, owner: Owner) -> Response:
    """The final adapter's zip (`adapter_sha256` in the job, and in `X-Checksum-Sha256`)."""
    return send_file(jobs.adapter_zip(job_id, owner), "application/zip")


@router.post(
    "/jobs/{job_id}/generate",
    response_model=SampleRead,
    tags=["samples"],
    responses={202: {"model": SampleRead, "description": "Not answered yet: GET the sample later."}},
)
async def generate(job_id: str, owner: Owner, request: SampleRequest, response: Response) -> SampleRead:
    """Answer a prompt with the base model plus this job's adapter (or a checkpoint), formatted
    as the recipe formats conversations (`Human: …` / `Assistant:`). Waits up to `wait_s` for
    the sampler; a 202 means it is still working."""
    sample = await run_in_threadpool(samples.create_sample, job_id, owner, request)
    wait_s = request.wait_s if request.wait_s is not None else get_settings().sample_wait_s
    sample = await waiting.latest(sample, owner, wait_s)
    if sample.status not in SampleStatus.FINAL:
        response.status_code = 202
    return sample


@router.get("/jobs/{job_id}/samples/{sample_id}", response_model=SampleRead, tags=["samples"])
def get_sample(job_id: str, sample_id: str, owner: Owner) -> SampleRead:
    return samples.get_sample(job_id, sample_id, owner)


@router.post("/datasets", status_code=201, response_model=DatasetRead, tags=["datasets"])
def upload_dataset(
    owner: Owner,
    file: Annotated[
        UploadFile, File(description="Records of a format `dataset.format` names (.jsonl, .json or .parquet)")
    ],
    tokenizer: Annotated[
        ModelOrDataset, Form(description="Tokenizer for the length statistics.")
    ] = DEFAULT_BASE_MODEL,
    max_seq_length: Annotated[int, Form(ge=MIN_SEQ_LENGTH, le=MAX_SEQ_LENGTH)] = DEFAULT_MAX_SEQ_LENGTH,
) -> DatasetRead:
    """Store and validate a training file. An invalid file is kept with a report that names each
    bad line and why; jobs can only use valid ones (`"dataset": {"source": "<id>"}`)."""
    return datasets.upload_dataset(file.filename, file.file, owner, tokenizer, max_seq_length)


@router.get("/datasets", response_model=Page[DatasetRead], tags=["datasets"])
def list_datasets(owner: Owner, limit: Limit = 50, cursor: str | None = None) -> Page[DatasetRead]:
    return datasets.list_datasets(owner, limit, cursor)


@router.get("/datasets/{dataset_id}", response_model=DatasetRead, tags=["datasets"])
def get_dataset(dataset_id: str, owner: Owner) -> DatasetRead:
    return datasets.get_dataset(dataset_id, owner)


@router.get(
    "/datasets/{dataset_id}/content", response_class=FileResponse, tags=["datasets"], responses=REDIRECT
)
def dataset_content(dataset_id: str, owner: Owner) -> Response:
    """The file as it was uploaded."""
    return send_file(datasets.uploaded_file(dataset_id, owner), "application/octet-stream")


@router.delete("/datasets/{dataset_id}", status_code=204, tags=["datasets"])
def delete_dataset(dataset_id: str, owner: Owner) -> Response:
    """Remove an upload and its file; 409 while a queued, running or paused job uses it."""
    datasets.delete_dataset(dataset_id, owner)
    return Response(status_code=204)
