"""Domain errors. Each carries its HTTP status and error code; one handler renders them."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 400
    code = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, detail: Any = None):
        super().__init__(detail)
        self.detail = detail if detail is not None else self.__doc__


class JobNotFound(ServiceError):
    """No such job."""

    status_code = 404
    code = "job_not_found"


class CheckpointNotFound(ServiceError):
    """No such checkpoint for this job."""

    status_code = 404
    code = "checkpoint_not_found"


class ArtifactNotReady(ServiceError):
    """The job has not produced this file (yet)."""

    status_code = 404
    code = "artifact_not_ready"


class JobStateConflict(ServiceError):
    """The job's status does not allow this action."""

    status_code = 409
    code = "invalid_job_state"


class DatasetNotFound(ServiceError):
    """No such uploaded dataset."""

    status_code = 404
    code = "dataset_not_found"


class RequestInvalid(ServiceError):
    """The request's body, path or query is malformed: `detail` lists each {"field", "message"}."""

    status_code = 422
    code = "validation_error"


class InvalidFields(RequestInvalid):
    """Fields that are well-formed but refer to something unusable; rendered like a 422 from
    request validation: a list of {"field", "message"}."""

    detail: list[dict[str, str]]

    def __init__(self, *problems: tuple[str, str]):
        super().__init__([{"field": field, "message": message} for field, message in problems])

    def renamed(self, names: dict[str, str]) -> InvalidFields:
        """The same problems, with fields named as in `names` (e.g. another API's parameters)."""
        return InvalidFields(*((names.get(p["field"], p["field"]), p["message"]) for p in self.detail))


class UploadTooLarge(ServiceError):
    """The upload is larger than FINETUNE_MAX_UPLOAD_BYTES."""

    status_code = 413
    code = "upload_too_large"


class InvalidCursor(ServiceError):
    """The cursor is not one this API handed out."""

    status_code = 422
    code = "invalid_cursor"


# How long a client is asked to wait when a dependency (database, broker) did not answer.
RETRY_AFTER_S = 2


class BrokerUnavailable(ServiceError):
    """The job queue's broker could not be reached."""

    status_code = 503
    code = "broker_unavailable"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class StorageUnavailable(ServiceError):
    """The object store (FINETUNE_STORAGE_URL) could not be reached or refused the request."""

    status_code = 503
    code = "storage_unavailable"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class DatabaseUnavailable(ServiceError):
    """The database did not answer; nothing was changed."""

    status_code = 503
    code = "database_unavailable"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class NotAuthenticated(ServiceError):
    """Send `Authorization: Bearer <key>`; `finetune keys create OWNER` makes a key."""

    status_code = 401
    code = "not_authenticated"


class TooManyQueuedJobs(ServiceError):
    """This owner already has FINETUNE_MAX_QUEUED_JOBS jobs waiting."""

    status_code = 429
    code = "too_many_queued_jobs"


class SampleNotFound(ServiceError):
    """No such sample for this job."""

    status_code = 404
    code = "sample_not_found"


class ExportNotFound(ServiceError):
    """No such export for this job."""

    status_code = 404
    code = "export_not_found"


class ModelNotFound(ServiceError):
    """No such model, or not yours: `GET /v1/models` lists the fine-tuned models and checkpoints
    you can call."""

    status_code = 404
    code = "model_not_found"


class SampleFailed(ServiceError):
    """The sampler could not answer (its adapter is gone, the model raised); `detail` says why."""

    status_code = 502
    code = "sample_failed"


class SampleTimedOut(ServiceError):
    """The sampler did not answer within FINETUNE_COMPLETION_TIMEOUT_S (busy, or not running)."""

    status_code = 504
    code = "sample_timed_out"
    headers = {"Retry-After": str(RETRY_AFTER_S)}


class IdempotencyKeyReused(ServiceError):
    """This Idempotency-Key was sent before with a different request."""

    status_code = 422
    code = "idempotency_key_reused"


class DatasetInUse(ServiceError):
    """A queued, running or paused job trains on this dataset."""

    status_code = 409
    code = "dataset_in_use"


# Errors the web layer answers before or around the services (app/api/errors.py, limits.py).


class BodyTooLarge(ServiceError):
    """The request body is larger than this route accepts."""

    status_code = 413
    code = "body_too_large"


class HeadersTooLarge(ServiceError):
    """The request's header names and values add up to more than FINETUNE_MAX_HEADER_BYTES."""

    status_code = 431
    code = "headers_too_large"


class RouteNotFound(ServiceError):
    """No such route."""

    status_code = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    """The route does not take this method; `Allow` lists those it takes."""

    status_code = 405
    code = "method_not_allowed"


class InternalError(ServiceError):
    """An unexpected server error (logged; no detail is sent)."""

    status_code = 500
    code = "internal_error"


def all_errors() -> list[type[ServiceError]]:
    """Every error the API answers with, one per code."""
    found: dict[str, type[ServiceError]] = {}
    pending = list(ServiceError.__subclasses__())
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return sorted(found.values(), key=lambda cls: (cls.status_code, cls.code))


def error_table() -> str:
    """The README's table of error codes, generated from the classes above."""
    rows = ["| HTTP | `error` | when |", "|---|---|---|"]
    for cls in all_errors():
        when = " ".join((cls.__doc__ or "").split())
        rows.append(f"| {cls.status_code} | `{cls.code}` | {when} |")
    return "\n".join(rows)
