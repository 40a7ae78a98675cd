"""An S3-compatible object store (AWS S3, MinIO, Cloudflare R2, …) through boto3; credentials
come the standard AWS way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance
role). The data dir holds only what this host is working on or has downloaded."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.errors import StorageUnavailable
from app.storage.stores import CHUNK, ArtifactStore, sha256_of

log = logging.getLogger(__name__)

# Unpacked checkpoints and adapters a host keeps (the newest first); older ones are deleted.
UNPACKED_KEPT = 8
MISSING = {"404", "NoSuchKey", "NotFound"}


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING


@contextmanager
def _reaching(what: str) -> Iterator[None]:
    """Any failure to reach the store, or a refusal other than "no such key", as
    StorageUnavailable (a 503 at the API, a failed attempt at a worker). Its message names the
    error's kind only: boto's text holds the store's address and keys, which are the
    operator's (logged here)."""
    try:
        yield
    except ClientError as exc:
        if _missing(exc):
            raise
        log.warning("object store: could not %s: %s", what, exc)
        raise StorageUnavailable(
            f"the object store refused to {what} ({exc.response['Error'].get('Code')})"
        ) from exc
    except BotoCoreError as exc:
        log.warning("object store: could not %s: %s", what, exc)
        raise StorageUnavailable(f"the object store could not {what} ({type(exc).__name__})") from exc


def extract_whole(archive: Path, target: Path) -> None:
    """Unzip `archive` into `target` (created whole by a rename; a concurrent unzip of the same
    archive into the same target leaves one of them)."""
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(staging)  # member names with `..` or a root are made safe by zipfile
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process unpacked it first


class S3Store(ArtifactStore):
    def __init__(self, scratch: Path, url: str, endpoint_url: str | None):
        super().__init__(scratch)
        parsed = urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        # A store of one's own (MinIO, R2) is addressed by path: its buckets have no DNS names.
        addressing = "path" if endpoint_url else "auto"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": addressing},
                retries={"max_attempts": 5, "mode": "standard"},
            ),
        )

    def object_key(self, path: Path) -> str:
        key = self.key(path)
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, path: Path) -> str:
        return f"s3://{self.bucket}/{self.object_key(path)}"

    def put(self, path: Path) -> str:
        # Above boto3's multipart threshold the object appears only when the last part is in
        # (CompleteMultipartUpload): a process killed mid-upload leaves no object, only parts that
        # the bucket's AbortIncompleteMultipartUpload rule removes (docs/deploy.md).
        with _reaching(f"store {path.name}"):
            self.client.upload_file(str(path), self.bucket, self.object_key(path))
        return self.location(path)

    def _download(self, path: Path, target: Path) -> None:
        """The object at `path` into `target`, through a temporary name."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            with _reaching(f"send {path.name}"):
                self.client.download_file(self.bucket, self.object_key(path), str(partial))
        except ClientError as exc:
            partial.unlink(missing_ok=True)
            if _missing(exc):
                raise FileNotFoundError(f"{path.name} is not in the store") from exc
            raise
        os.replace(partial, target)

    def fetch(self, path: Path) -> Path:
        if not path.is_file():
            self._download(path, path)
        return path

    def size(self, path: Path) -> int | None:
        try:
            with _reaching(f"find {path.name}"):
                head = self.client.head_object(Bucket=self.bucket, Key=self.object_key(path))
            return int(head["ContentLength"])
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def local_file(self, path: Path) -> Path | None:
        return None

    def chunks(self, path: Path) -> Iterator[bytes]:
        with _reaching(f"send {path.name}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(path))["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def download_url(self, path: Path, filename: str, expires_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self.object_key(path),
                "ResponseContentDisposition": f"attachment; filename*=UTF-8''{quote(filename)}",
            },
            ExpiresIn=expires_s,
        )

    def delete(self, path: Path) -> None:
        with _reaching(f"delete {path.name}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(path))
        path.unlink(missing_ok=True)

    def _listed(self, folder: Path, **extra) -> Iterator[dict]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.object_key(folder) + "/", **extra
        )
        with _reaching(f"list {folder.name}"):
            for page in pages:
                yield from page.get("Contents", [])

    def delete_folder(self, folder: Path) -> None:
        keys = [{"Key": item["Key"]} for item in self._listed(folder)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys at most
            with _reaching(f"delete {folder.name}"):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})
        shutil.rmtree(folder, ignore_errors=True)

    def names(self, folder: Path) -> set[str]:
        return {item["Key"].rsplit("/", 1)[-1] for item in self._listed(folder, Delimiter="/")}

    def unpacked(self, folder: Path, archive: Path, sha256: str | None) -> Path:
        # Kept by content (a checkpoint's name comes back after a resume branches the run, with
        # other weights): a copy unpacked here earlier is used only if it is the same zip.
        cache = self.scratch / "unpacked"
        entry = cache / (sha256 or f"{self.key(archive).replace('/', '_')}-{time.time_ns()}")
        if not (entry / folder.name).is_dir():
            zipped = cache / f".{entry.name}.{os.getpid()}.zip"
            try:
                self._download(archive, zipped)
                if sha256 is not None and (got := sha256_of(zipped)) != sha256:
                    raise OSError(f"{archive.name} in the store has sha256 {got}, recorded {sha256}")
                extract_whole(zipped, entry)
            finally:
                zipped.unlink(missing_ok=True)
        entry.touch()  # its time says when it was last used
        self._forget_old_unpacked(cache)
        return entry / folder.name

    def _forget_old_unpacked(self, cache: Path) -> None:
        entries = sorted(
            (p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in entries[UNPACKED_KEPT:]:
            shutil.rmtree(old, ignore_errors=True)

    def evict(self, path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
