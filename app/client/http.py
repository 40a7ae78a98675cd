"""A small HTTP client for the service's REST API: what the `finetune` client commands use.

It knows the routes and the error shape (`{"error": code, "detail": ...}`), reads the live
metric stream (server-sent events, parsed by httpx-sse; a dropped stream is reopened after the
last step seen), and downloads files with a checksum check. It imports nothing heavy."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from app.models import SampleStatus

DEFAULT_URL = "http://127.0.0.1:8000"


class RequestFailed(Exception):
    """The service answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def _describe(response: httpx.Response) -> RequestFailed:
    try:
        body = response.json()
    except ValueError:
        body = {"error": "http_error", "detail": response.text[:500]}
    code, detail = body.get("error", "http_error"), body.get("detail")
    if isinstance(detail, list):  # 422: one entry per bad field
        detail = "; ".join(f"{item.get('field')}: {item.get('message')}" for item in detail)
    return RequestFailed(f"{response.status_code} {code}: {detail}", response.status_code, code)


@dataclass
class StreamEvent:
    event: str
    data: dict[str, Any]
    # The stream's last event id: the step of the last `metric` row sent on this connection (an
    # event without an `id:` line keeps it, as the SSE spec says); None before the first.
    id: str | None


class ServiceClient:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 30):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:  # connected (or tried to); no answer in time
            waited = f"{self.http.timeout.read:g} s"
            message = f"{self.http.base_url} did not answer {method} {path} within {waited}"
            raise RequestFailed(message) from exc
        except httpx.TransportError as exc:
            raise RequestFailed(f"cannot reach {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise _describe(response)
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body).json()

    # --- jobs -----------------------------------------------------------------------------
    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.post("/jobs", spec)

    def preflight(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.post("/preflight", spec)

    def jobs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self.get("/jobs", status=status, limit=limit)["items"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.get(f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.post(f"/jobs/{job_id}/cancel")

    def pause(self, job_id: str) -> dict[str, Any]:
        return self.post(f"/jobs/{job_id}/pause")

    def resume(self, job_id: str, checkpoint: str | None = None) -> dict[str, Any]:
        return self.post(f"/jobs/{job_id}/resume", {"checkpoint": checkpoint} if checkpoint else None)

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self.get(f"/jobs/{job_id}/checkpoints")["items"]

    def metrics(self, job_id: str, after_step: int | None = None) -> list[dict[str, Any]]:
        return self.get(f"/jobs/{job_id}/logs", after_step=after_step, limit=10000)["items"]

    def upload(self, path: Path, max_seq_length: int | None = None) -> dict[str, Any]:
        form = {"max_seq_length": str(max_seq_length)} if max_seq_length else {}
        with path.open("rb") as handle:
            return self.request("POST", "/datasets", files={"file": (path.name, handle)}, data=form).json()

    def generate(self, job_id: str, prompt: str, timeout_s: float = 600, **options: Any) -> dict[str, Any]:
        """Ask for one sample and wait for its answer by polling the sample it made (the first
        answer may take minutes while the sampler loads the model; no request is held that long,
        and a retry never asks twice)."""
        body: dict[str, Any] = {"prompt": prompt, "wait_s": 0}
        body.update({key: value for key, value in options.items() if value is not None})
        sample = self.post(f"/jobs/{job_id}/generate", body)
        return self._until_done(sample, f"/jobs/{job_id}/samples", timeout_s, every_s=0.5)

    def export(
        self, job_id: str, format: str, checkpoint: str | None = None, timeout_s: float = 3600
    ) -> dict[str, Any]:
        """Ask for an export and wait until the worker has made it (or failed)."""
        body = {"format": format, **({"checkpoint": checkpoint} if checkpoint else {})}
        export = self.post(f"/jobs/{job_id}/exports", body)
        return self._until_done(export, f"/jobs/{job_id}/exports", timeout_s, every_s=1.0)

    def _until_done(
        self, item: dict[str, Any], collection: str, timeout_s: float, every_s: float
    ) -> dict[str, Any]:
        """A sample or an export a worker makes, read again from `collection` until it has
        succeeded or failed."""
        return self.wait(
            lambda: self.get(f"{collection}/{item['id']}"),
            lambda latest: latest["status"] in SampleStatus.FINAL,
            timeout_s,
            first=item,
            every_s=every_s,
        )

    def wait_for_job(self, job_id: str, statuses: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        """The job, once its status is one of `statuses`."""
        return self.wait(lambda: self.job(job_id), lambda job: job["status"] in statuses, timeout_s)

    @staticmethod
    def wait(
        read: Callable[[], dict[str, Any]],
        done: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        first: dict[str, Any] | None = None,
        every_s: float = 1.0,
    ) -> dict[str, Any]:
        """`read()` again every `every_s` until `done` holds for what it returns; RequestFailed
        after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        value = first if first is not None else read()
        while not done(value):
            if time.monotonic() > deadline:
                raise RequestFailed(f"gave up waiting after {timeout_s:g} s (still {value.get('status')})")
            time.sleep(every_s)
            value = read()
        return value

    # --- live metrics ---------------------------------------------------------------------
    def follow(self, job_id: str, after_step: int = -1, retry_for_s: float = 60) -> Iterator[StreamEvent]:
        """Metric rows as they are written, then one `end` event. A dropped connection is
        reopened from the last step seen; gives up after `retry_for_s` without a connection."""
        last_id = str(after_step)
        failing_since: float | None = None
        while True:
            try:
                for event in self._stream(job_id, last_id):
                    failing_since = None
                    if event.id is not None:
                        last_id = event.id
                    yield event
                    if event.event == "end":
                        return
            except (httpx.TransportError, RequestFailed) as exc:
                if isinstance(exc, RequestFailed) and exc.status is not None and exc.status < 500:
                    raise
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > retry_for_s:
                    raise RequestFailed(f"lost the metric stream: {exc}") from exc
                time.sleep(1)

    def _stream(self, job_id: str, last_id: str) -> Iterator[StreamEvent]:
        """One connection's events, parsed by httpx-sse."""
        path = f"/jobs/{job_id}/logs"
        with connect_sse(self.http, "GET", path, params={"after_step": last_id}, timeout=None) as source:
            response = source.response
            if response.status_code >= 400:
                response.read()
                raise _describe(response)
            try:
                for event in source.iter_sse():
                    if event.data:  # not a ping (httpx-sse yields one after an id, with no data)
                        yield StreamEvent(event.event, event.json(), event.id or None)
            except SSEError as exc:  # an answer that is no event stream (a proxy's page): no retry
                raise RequestFailed(f"GET {path}: {exc}", response.status_code) from exc

    # --- files ----------------------------------------------------------------------------
    def download(
        self,
        path: str,
        destination: Path,
        expected_sha256: str | None,
        on_progress: Callable[[int, int | None], None] = lambda done, total: None,
    ) -> str:
        """Stream `path` into `destination` (through a temporary file, so an interrupted or
        corrupt download never leaves a file there) and return its SHA-256, which must match
        `expected_sha256` when given."""
        partial = destination.with_name(destination.name + ".part")
        digest = hashlib.sha256()
        try:
            # a store's presigned URL (FINETUNE_STORAGE_REDIRECT_S) is another origin: httpx
            # drops the API key on the way there
            with self.http.stream("GET", path, timeout=None, follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _describe(response)
                total = (
                    int(response.headers["content-length"]) if "content-length" in response.headers else None
                )
                done = 0
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        on_progress(done, total)
            sha256 = digest.hexdigest()
            if expected_sha256 and sha256 != expected_sha256:
                raise RequestFailed(
                    f"checksum mismatch: got sha256 {sha256}, the service says {expected_sha256}"
                )
            os.replace(partial, destination)
            return sha256
        except httpx.TransportError as exc:
            raise RequestFailed(f"download interrupted: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
