"""A stored file a user may download, found through the store it is kept in (app/storage): the
REST routes, the OpenAI routes and the dashboard send it the same way (app/api/downloads.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.errors import ArtifactNotReady
from app.storage import ArtifactStore


@dataclass(frozen=True)
class StoredFile:
    """A file the database records, where its store keeps it, the name it is sent as and its
    recorded SHA-256."""

    store: ArtifactStore
    path: Path
    filename: str
    sha256: str | None
    size_bytes: int


def stored_file(store: ArtifactStore, path: Path, filename: str, sha256: str | None, what: str) -> StoredFile:
    """`path` in `store`; ArtifactNotReady when the store lacks it (the database names a file
    that was lost)."""
    size = store.size(path)
    if size is None:
        raise ArtifactNotReady(f"the file of {what} is missing")
    return StoredFile(store, path, filename, sha256, size)
