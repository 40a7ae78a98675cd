"""Where artifacts live once they are whole: the data dir itself (the default), or an S3-compatible
object store (`FINETUNE_STORAGE_URL=s3://bucket/prefix`, app/storage/s3.py).

Every artifact is named by a local path under the data dir (app/storage/layout.py names them);
its key in a store is that path relative to the data dir (`jobs/<id>/checkpoints/checkpoint-20.zip`),
so every host computes the same key from its own data dir. With an object store the data dir is
a scratch cache: files are written there, `put` uploads them whole, and `fetch` / `unpacked`
bring them back on any host. With the local store the data dir *is* the store, and those calls
find the file where it already lies.
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from app.settings import Settings, get_settings

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore(ABC):
    """One backend; `scratch` is this host's data dir."""

    def __init__(self, scratch: Path):
        self.scratch = scratch

    def key(self, path: Path) -> str:
        """The artifact's name in the store: its path relative to the data dir."""
        return path.relative_to(self.scratch).as_posix()

    @abstractmethod
    def location(self, path: Path) -> str:
        """What the database records as the artifact's path (a local path, or an s3:// URL)."""

    @abstractmethod
    def put(self, path: Path) -> str:
        """Store the complete local file `path` (written and renamed whole by the caller); until
        this returns, no reader sees it. Returns its location."""

    @abstractmethod
    def fetch(self, path: Path) -> Path:
        """A local copy of an artifact that never changes once stored (an upload, an export, an
        adapter zip) at `path`; FileNotFoundError when the store has none."""

    @abstractmethod
    def size(self, path: Path) -> int | None:
        """The stored artifact's size, or None when there is none."""

    @abstractmethod
    def local_file(self, path: Path) -> Path | None:
        """`path` when this store keeps the artifact on this host's disk (serve it as a file)."""

    @abstractmethod
    def chunks(self, path: Path) -> Iterator[bytes]:
        """The stored artifact's bytes, streamed."""

    @abstractmethod
    def download_url(self, path: Path, filename: str, expires_s: int) -> str | None:
        """A URL anyone holding it may download the artifact from until it expires (None: this
        store has no such URLs)."""

    @abstractmethod
    def delete(self, path: Path) -> None:
        """Remove the artifact (and any local copy); nothing when it is gone already."""

    @abstractmethod
    def delete_folder(self, folder: Path) -> None:
        """Remove every artifact under `folder` (and the local folder)."""

    @abstractmethod
    def names(self, folder: Path) -> set[str]:
        """The names of the artifacts stored directly in `folder`."""

    @abstractmethod
    def unpacked(self, folder: Path, archive: Path, sha256: str | None) -> Path:
        """A local folder holding what `folder` held when it was zipped to `archive` (its zip
        holds `folder.name/…`). `sha256`: the archive's recorded checksum, verified on download."""

    @abstractmethod
    def evict(self, path: Path) -> None:
        """Drop this host's copy of `path` (a file or a folder) where the store keeps its own."""


class LocalStore(ArtifactStore):
    """The data dir is the store: artifacts are where they were written, on a disk every process
    of the service shares (one host, or a shared mount at the same FINETUNE_DATA_DIR)."""

    def location(self, path: Path) -> str:
        return str(path)

    def put(self, path: Path) -> str:
        return str(path)

    def _kept(self, path: Path) -> Path | None:
        """`path` if it is a file of the data dir's own: no link (one swapped in to lead a
        download out of the data dir) and inside it."""
        resolved = path.resolve()
        if path.is_symlink() or not resolved.is_relative_to(self.scratch) or not resolved.is_file():
            return None
        return resolved

    def fetch(self, path: Path) -> Path:
        if self._kept(path) is None:
            raise FileNotFoundError(f"{path.name} is no longer on disk")
        return path

    def size(self, path: Path) -> int | None:
        kept = self._kept(path)
        return kept.stat().st_size if kept is not None else None

    def local_file(self, path: Path) -> Path | None:
        return path

    def chunks(self, path: Path) -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def download_url(self, path: Path, filename: str, expires_s: int) -> str | None:
        return None

    def delete(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def delete_folder(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def names(self, folder: Path) -> set[str]:
        return {p.name for p in folder.glob("*") if p.is_file()}

    def unpacked(self, folder: Path, archive: Path, sha256: str | None) -> Path:
        return folder  # the folder the trainer wrote (the caller says so when it is gone)

    def evict(self, path: Path) -> None:
        pass


@lru_cache
def _store(url: str, endpoint_url: str, scratch: Path) -> ArtifactStore:
    if not url:
        return LocalStore(scratch)
    from app.storage.s3 import S3Store

    return S3Store(scratch, url, endpoint_url or None)


def artifact_store(settings: Settings | None = None) -> ArtifactStore:
    """The store FINETUNE_STORAGE_URL names (one per process and setting)."""
    settings = settings if settings is not None else get_settings()
    return _store(settings.storage_url, settings.storage_endpoint_url, settings.data_dir)
