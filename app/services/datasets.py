"""Uploaded datasets: store the file, validate it, keep the report; jobs refer to them by id."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.dataset_report import UPLOAD_SUFFIXES, validate_file
from app.db import session_scope
from app.errors import BrokerUnavailable, DatasetInUse, DatasetNotFound, InvalidFields, UploadTooLarge
from app.ids import DATASET_ID, new_dataset_id
from app.models import Dataset, DatasetStatus, Job, JobStatus
from app.preferences import method_fit_problem
from app.queue import TASK_ANALYZE_DATASET, samples_queue, send
from app.schemas import DatasetRead, Page
from app.services.downloads import StoredFile, stored_file
from app.services.pagination import newest_first
from app.settings import get_settings
from app.spec import JobSpec, stored_spec
from app.storage import artifact_store

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# An upload's name on disk, in UTF-8 bytes: with `_store`'s ".NAME.part" around it, well within the
# 255 bytes a file name may have.
MAX_NAME_BYTES = 200


def _safe_filename(filename: str | None) -> str:
    """The upload's name as stored and shown: its last path component, letters, digits, `.`, `-`
    and `_` only, not hidden, and a long stem cut (on a character boundary) to MAX_NAME_BYTES."""
    name = re.sub(r"[^\w.-]", "_", Path(filename or "").name).lstrip(".")
    if not name.endswith(UPLOAD_SUFFIXES):
        raise InvalidFields(("file", f"expected a {' or '.join(UPLOAD_SUFFIXES)} file, got {filename!r}"))
    suffix = Path(name).suffix
    stem = name.removesuffix(suffix).encode()[: MAX_NAME_BYTES - len(suffix.encode())]
    return stem.decode(errors="ignore") + suffix  # a character cut in two is dropped


def _store(stream: BinaryIO, target: Path, limit: int) -> tuple[int, str]:
    """Copy to a temporary name, then rename: (size, sha256). Refuses more than `limit` bytes."""
    digest, size = hashlib.sha256(), 0
    tmp = target.with_name(f".{target.name}.part")
    with tmp.open("wb") as out:
        while chunk := stream.read(CHUNK):
            size += len(chunk)
            if size > limit:
                out.close()
                tmp.unlink()
                raise UploadTooLarge(f"uploads are limited to {limit} bytes")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(target)
    return size, digest.hexdigest()


def upload_dataset(
    filename: str | None, stream: BinaryIO, owner: str, tokenizer: str, max_seq_length: int
) -> DatasetRead:
    """Store the file (streamed to disk), validate it a line at a time, record it, and ask a
    worker for its token statistics. Nothing is left behind if any step fails."""
    settings = get_settings()
    name = _safe_filename(filename)
    dataset_id = new_dataset_id()
    folder = settings.dataset_dir(dataset_id)
    folder.mkdir(parents=True)
    store = artifact_store(settings)
    try:
        size, sha256 = _store(stream, folder / name, settings.max_upload_bytes)
        report = validate_file(folder / name)
        location = store.put(folder / name)  # whole in the store before the row records it
        valid = report["valid"]
        report["tokens"] = {
            "status": "pending" if valid else "skipped",
            "tokenizer": tokenizer,
            "max_seq_length": max_seq_length,
        }
        with session_scope() as session:
            row = Dataset(
                id=dataset_id,
                owner=owner,
                filename=name,
                path=location,
                size_bytes=size,
                sha256=sha256,
                status=DatasetStatus.READY if valid else DatasetStatus.INVALID,
                format=report["format"],
                report=report,
            )
            session.add(row)
            session.flush()
            read = DatasetRead.model_validate(row)
    except BaseException:
        store.delete_folder(folder)
        raise
    finally:
        store.evict(folder)  # this host's copy, where the store keeps its own
    if valid:
        try:
            send(TASK_ANALYZE_DATASET, dataset_id, tokenizer, max_seq_length, queue=samples_queue())
        except BrokerUnavailable as exc:  # the upload stands; only its token statistics are missing
            log.warning("dataset %s: %s", dataset_id, exc)
            set_token_stats(dataset_id, {**report["tokens"], "status": "unavailable", "error": str(exc)})
            return get_dataset(dataset_id, owner)
    return read


def _get(session: Session, dataset_id: str, owner: str | None) -> Dataset:
    """The dataset, if `owner` owns it (owner None: the worker, which trusts the job's spec)."""
    row = session.get(Dataset, dataset_id) if DATASET_ID.match(dataset_id) else None
    if row is None or (owner is not None and row.owner != owner):
        raise DatasetNotFound(f"no dataset {dataset_id!r}")
    return row


def get_dataset(dataset_id: str, owner: str) -> DatasetRead:
    with session_scope() as session:
        return DatasetRead.model_validate(_get(session, dataset_id, owner))


def list_datasets(owner: str, limit: int, cursor: str | None) -> Page[DatasetRead]:
    return newest_first(Dataset, DatasetRead, limit, cursor, Dataset.owner == owner)


def uploaded_file(dataset_id: str, owner: str) -> StoredFile:
    """The uploaded file as stored, for its owner to download."""
    with session_scope() as session:
        row = _get(session, dataset_id, owner)
        filename, sha256 = row.filename, row.sha256
    path = get_settings().dataset_dir(dataset_id) / filename
    return stored_file(artifact_store(), path, filename, sha256, f"dataset {dataset_id}")


def delete_dataset(dataset_id: str, owner: str) -> None:
    """Remove an upload and its file, unless a job that may still train on it (queued, running
    or paused) names it."""
    with session_scope() as session:
        row = _get(session, dataset_id, owner)
        active = session.scalars(
            select(Job).where(
                Job.owner == owner, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED))
            )
        )
        users = [job.id for job in active if dataset_id in _dataset_references(stored_spec(job.spec))]
        if users:
            raise DatasetInUse(f"dataset {dataset_id} is used by {', '.join(users)}; cancel them first")
        # the file first: a store that can't be reached is a 503 with nothing changed
        artifact_store().delete_folder(get_settings().dataset_dir(dataset_id))
        session.delete(row)


def _dataset_references(spec: JobSpec) -> set[str]:
    return {ref for ref in (spec.dataset.source, spec.dataset.validation_source) if ref is not None}


def set_token_stats(dataset_id: str, tokens: dict[str, Any]) -> None:
    with session_scope() as session:
        row = _get(session, dataset_id, None)
        row.report = {**row.report, "tokens": tokens}


def dataset_reference_problems(spec: JobSpec, owner: str) -> list[tuple[str, str]]:
    """(field, why) for each uploaded dataset the spec names that is unknown (to this owner)
    or invalid."""
    problems = []
    references = {
        "dataset.source": spec.dataset.source,
        "dataset.validation_source": spec.dataset.validation_source,
    }
    for field, value in references.items():
        if value is None or not DATASET_ID.match(value):
            continue
        with session_scope() as session:
            row = session.get(Dataset, value)
            if row is None or row.owner != owner:
                problems.append((field, f"no uploaded dataset {value!r}"))
            elif row.status != DatasetStatus.READY:
                count = row.report.get("problem_count", 0)
                problems.append(
                    (field, f"dataset {value} is {row.status}: {count} problem(s), see GET /datasets/{value}")
                )
            elif (misfit := method_fit_problem(row.report.get("format"), spec.method.type)) is not None:
                problems.append((field, misfit))
    return problems
