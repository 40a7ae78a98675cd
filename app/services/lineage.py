"""A job that continues from an earlier job's adapter (`init_from`): what it takes from that job,
checked when it is created (`POST /jobs`, `POST /preflight`, OpenAI's `model: ft:…`), and where
the worker finds the adapter.

The adapter fixes the base model, its quantization and the LoRA shape, so those three come from
the earlier job's stored spec; a request that sets one of them to something else is refused.
A chain (continuing from a job that itself continued from another) needs nothing more: the
earlier job's stored spec already holds what it took.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select

from app.db import session_scope
from app.errors import InvalidFields
from app.models import Checkpoint, Job, JobStatus
from app.settings import Settings
from app.spec import InitFrom, JobSpec, stored_spec
from app.storage import job_files

# What an adapter fixes: taken from the job it was trained by.
INHERITED = ("base_model", "quantization", "lora")


def resolve_init_from(spec: JobSpec, owner: str) -> JobSpec:
    """`spec` with the base model, quantization and LoRA of the job it continues from, or `spec`
    itself when it has no `init_from`. InvalidFields when that job is not the owner's, has no
    such adapter, or the request set one of the inherited fields to something else."""
    if spec.init_from is None:
        return spec
    earlier = _earlier_spec(spec.init_from, owner)
    conflicts = list(_conflicts(spec, earlier, spec.init_from.job))
    if conflicts:
        raise InvalidFields(*conflicts)
    return spec.model_copy(update={name: getattr(earlier, name) for name in INHERITED})


def init_adapter_dir(init_from: InitFrom, settings: Settings | None = None) -> Path:
    """The folder holding the adapter a job continues from: the earlier job's final adapter, or
    the named checkpoint's folder. (It may be gone since the job was created: the caller says so.)"""
    return stored_adapter_dir(init_from.job, init_from.checkpoint, settings)


def stored_adapter_dir(job_id: str, checkpoint: str | None, settings: Settings | None = None) -> Path:
    """The unzipped folder of job `job_id`'s final adapter (checkpoint None) or of a kept
    checkpoint, brought from the store to this host when it was written on another
    (FileNotFoundError when the store lacks it)."""
    with session_scope() as session:
        if checkpoint is None:
            sha256 = session.scalar(select(Job.adapter_sha256).where(Job.id == job_id))
        else:
            sha256 = session.scalar(
                select(Checkpoint.sha256).where(Checkpoint.job_id == job_id, Checkpoint.name == checkpoint)
            )
    files = job_files(job_id, settings)
    if checkpoint is None:
        return files.unzipped_adapter(sha256)
    return files.unzipped_checkpoint(checkpoint, sha256)


def _earlier_spec(init_from: InitFrom, owner: str) -> JobSpec:
    with session_scope() as session:
        job = session.get(Job, init_from.job)
        if job is None or job.owner != owner:  # the same answer whether or not it exists
            raise InvalidFields(("init_from.job", f"no job {init_from.job!r}"))
        kept = list(
            session.scalars(
                select(Checkpoint.name).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
            )
        )
        listed = ", ".join(kept) or "none"
        if init_from.checkpoint is None:
            if job.status != JobStatus.SUCCEEDED or not job.adapter_path:
                raise InvalidFields(
                    (
                        "init_from.job",
                        f"job {job.id} is {job.status} and has no final adapter yet; name one of its "
                        f"checkpoints in init_from.checkpoint (kept: {listed})",
                    )
                )
        elif init_from.checkpoint not in kept:
            missing = f"job {job.id} has no checkpoint {init_from.checkpoint!r} (kept: {listed})"
            raise InvalidFields(("init_from.checkpoint", missing))
        return stored_spec(job.spec)


def _conflicts(spec: JobSpec, earlier: JobSpec, job_id: str) -> Iterator[tuple[str, str]]:
    """(field, why) for each inherited field the request set to something other than the earlier
    job's; a field set to the same value is no conflict."""
    origin = f"comes from the earlier job {job_id} (init_from)"
    if "base_model" in spec.model_fields_set and spec.base_model != earlier.base_model:
        yield "base_model", f"{origin}, which trained {earlier.base_model}; leave it out"
    for section in ("quantization", "lora"):
        if section not in spec.model_fields_set:
            continue
        mine, theirs = getattr(spec, section), getattr(earlier, section)
        for name in sorted(mine.model_fields_set):
            if getattr(mine, name) != getattr(theirs, name):
                yield (
                    f"{section}.{name}",
                    f"{origin}, which has {getattr(theirs, name)!r}; leave it out",
                )
