"""A job's trained adapter as the sampler and the exports read it: the job's spec, and the folder
of its final adapter or of a kept checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from app.db import session_scope
from app.models import Job
from app.services.lineage import stored_adapter_dir
from app.spec import JobSpec, stored_spec


def job_spec(job_id: str) -> JobSpec:
    """The job's spec; LookupError when the job was deleted since the work was queued."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} no longer exists")
        return stored_spec(job.spec)


def adapter_folder(job_id: str, checkpoint: str | None) -> Path:
    """The folder of the job's final adapter (checkpoint None) or of a checkpoint's;
    FileNotFoundError when it is no longer on disk or in the store."""
    try:
        folder = stored_adapter_dir(job_id, checkpoint)
    except FileNotFoundError:
        folder = None
    if folder is None or not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{checkpoint or 'the adapter'} is no longer on disk or in the store")
    return folder


def trained_biases(folder: Path) -> bool:
    """Whether the adapter trained bias vectors (peft's `bias` other than none): those are the
    base's own parameters, which loading the adapter overwrites."""
    return json.loads((folder / "adapter_config.json").read_text()).get("bias", "none") != "none"
