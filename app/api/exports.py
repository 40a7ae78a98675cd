"""A job's exports: its adapter (or a checkpoint's) merged into the base, as a model folder or a
GGUF file, made by a worker and downloaded with its SHA-256 (`finetune export` and the dashboard
use these)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from app.api.auth import Owner
from app.api.downloads import REDIRECT, send_file
from app.schemas import ERROR_RESPONSES, ExportRead, ExportRequest, Page
from app.services import exports

router = APIRouter(responses=ERROR_RESPONSES, tags=["artifacts"])

MEDIA_TYPES = {".zip": "application/zip", ".gguf": "application/octet-stream"}


@router.post("/jobs/{job_id}/exports", status_code=202, response_model=ExportRead)
def create_export(job_id: str, owner: Owner, request: ExportRequest) -> ExportRead:
    """Queue an export of the final adapter (once the job succeeded) or of a kept `checkpoint`;
    GET it until `status` is `succeeded`, then download it."""
    return exports.create_export(job_id, owner, request)


@router.get("/jobs/{job_id}/exports", response_model=Page[ExportRead])
def list_exports(job_id: str, owner: Owner) -> Page[ExportRead]:
    return Page(items=exports.list_exports(job_id, owner), next=None)


@router.get("/jobs/{job_id}/exports/{export_id}", response_model=ExportRead)
def get_export(job_id: str, export_id: str, owner: Owner) -> ExportRead:
    return exports.get_export(job_id, export_id, owner)


@router.get(
    "/jobs/{job_id}/exports/{export_id}/download",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}, "application/octet-stream": {}}}, **REDIRECT},
)
def download_export(job_id: str, export_id: str, owner: Owner) -> Response:
    """The export's file; its `sha256` is in the export and in the `X-Checksum-Sha256` header."""
    file, _ = exports.export_file(job_id, export_id, owner)
    return send_file(file, MEDIA_TYPES.get(file.path.suffix, "application/octet-stream"))
