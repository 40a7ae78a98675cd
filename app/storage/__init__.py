"""A job's files and the store artifacts are kept in: `job_files(job_id)` names every path
(app/storage/layout.py), `artifact_store()` keeps them whole (app/storage/stores.py: the data dir,
or an S3-compatible object store)."""

from app.storage.layout import JobFiles, RunFiles, being_written, job_files
from app.storage.stores import ArtifactStore, LocalStore, artifact_store, sha256_of

__all__ = [
    "ArtifactStore",
    "JobFiles",
    "LocalStore",
    "RunFiles",
    "artifact_store",
    "being_written",
    "job_files",
    "sha256_of",
]
