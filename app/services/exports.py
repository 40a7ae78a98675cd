"""Exports: a job's adapter (or a checkpoint's) merged into its base, as a model folder or a GGUF
file, made by `finetune sampler`'s process (worker/exports.py) and downloaded with its SHA-256.
The API stores the request and sends its id; the worker writes the file and the outcome."""

from __future__ import annotations

from sqlalchemy import select

from app.db import session_scope
from app.errors import (
    ArtifactNotReady,
    CheckpointNotFound,
    ExportNotFound,
    JobStateConflict,
)
from app.ids import EXPORT_ID
from app.models import Export, JobStatus, SampleStatus
from app.queue import enqueue_export
from app.schemas import ExportRead, ExportRequest
from app.services import queued_work
from app.services.downloads import StoredFile, stored_file
from app.services.jobs import checkpoint_names, owned_job
from app.services.queued_work import Lease
from app.storage import job_files


def create_export(job_id: str, owner: str, request: ExportRequest) -> ExportRead:
    """Queue an export of the final adapter (a job that succeeded) or of a kept checkpoint."""
    with session_scope() as session:
        job = owned_job(session, job_id, owner)
        if request.checkpoint is not None:
            if request.checkpoint not in checkpoint_names(session, job_id):
                raise CheckpointNotFound(f"job {job_id} has no checkpoint {request.checkpoint!r}")
        elif job.status != JobStatus.SUCCEEDED or not job.adapter_path:
            raise JobStateConflict(
                f"job is {job.status}: its adapter is exported once it succeeds; "
                "name a `checkpoint` to export one of those"
            )
        export = Export(job_id=job_id, checkpoint=request.checkpoint, format=request.format)
        session.add(export)
        session.flush()
        read = ExportRead.model_validate(export)
    queued_work.send(Export, read.id, enqueue_export)
    return read


def list_exports(job_id: str, owner: str) -> list[ExportRead]:
    with session_scope() as session:
        owned_job(session, job_id, owner)
        rows = session.scalars(select(Export).where(Export.job_id == job_id).order_by(Export.created_at))
        return [ExportRead.model_validate(row) for row in rows]


def _owned_export(session, job_id: str, export_id: str, owner: str) -> Export:
    owned_job(session, job_id, owner)
    export = session.get(Export, export_id) if EXPORT_ID.match(export_id) else None
    if export is None or export.job_id != job_id:
        raise ExportNotFound(f"job {job_id} has no export {export_id!r}")
    return export


def get_export(job_id: str, export_id: str, owner: str) -> ExportRead:
    with session_scope() as session:
        return ExportRead.model_validate(_owned_export(session, job_id, export_id, owner))


def export_file(job_id: str, export_id: str, owner: str) -> tuple[StoredFile, ExportRead]:
    """The finished export's file (in the job's folder of the store) and its row."""
    with session_scope() as session:
        export = _owned_export(session, job_id, export_id, owner)
        read, recorded = ExportRead.model_validate(export), export.path
    if read.status != SampleStatus.SUCCEEDED or not recorded:
        raise ArtifactNotReady(
            f"export {export_id} is {read.status}" + (f": {read.error}" if read.error else "")
        )
    files = job_files(job_id)
    path = files.export_file(export_id, read.format)
    file = stored_file(files.store, path, read.filename or path.name, read.sha256, f"export {export_id}")
    return file, read


# --- what the worker does ---------------------------------------------------------------------


def start_export(export_id: str) -> tuple[Export, Lease] | None:
    """The worker takes a queued export under a lease (None if it is gone or already taken)."""
    return queued_work.take(Export, export_id)


def finish_export(
    lease: Lease,
    *,
    path: str | None = None,
    filename: str | None = None,
    size_bytes: int | None = None,
    sha256: str | None = None,
    error: str | None = None,
) -> bool:
    return queued_work.finish(
        lease,
        error=error,
        path=path,
        filename=filename,
        size_bytes=size_bytes,
        sha256=sha256,
    )
