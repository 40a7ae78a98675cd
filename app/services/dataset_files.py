"""Where an uploaded dataset's file lies: what a worker trains on. Apart from the upload service
(app/services/datasets.py) so that training code needs no queue client."""

from __future__ import annotations

from pathlib import Path

from app.db import session_scope
from app.errors import DatasetNotFound
from app.ids import DATASET_ID
from app.models import Dataset
from app.settings import get_settings
from app.storage import artifact_store


def dataset_file(dataset_id: str) -> Path:
    """The stored file of an uploaded dataset, on this host (fetched from the store where it
    keeps it elsewhere). No owner check: the worker trusts the job's spec, which the job service
    checked when the job was created."""
    with session_scope() as session:
        row = session.get(Dataset, dataset_id) if DATASET_ID.match(dataset_id) else None
        if row is None:
            raise DatasetNotFound(f"no dataset {dataset_id!r}")
        filename = row.filename
    return artifact_store().fetch(get_settings().dataset_dir(dataset_id) / filename)
