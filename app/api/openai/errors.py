"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
codes its client turns into exception classes.

The client retries 408, 409, 429 and 5xx on its own, so an action the job's state forbids (the
service's 409) and a bad field (422) are 400s here: retrying them can't help."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.schemas import ERROR_REASONS, error_responses

PREFIX = "/v1/"

TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error or server_error."
    )
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str = Field(description="The service's stable error code, e.g. `job_not_found`.")


class ErrorBody(BaseModel):
    error: ErrorDetail


# The service's statuses, with 409 and 422 answered as 400 (see above).
ERROR_RESPONSES = error_responses(
    ErrorBody,
    {
        400: "Invalid input, or the job's state does not allow this; `param` names the field.",
        **{status: reason for status, reason in ERROR_REASONS.items() if status not in (409, 422)},
    },
)


def is_openai_path(path: str) -> bool:
    return path.startswith(PREFIX)


def openai_error(
    status: int, code: str, detail: object, headers: dict[str, str] | None = None
) -> JSONResponse:
    """`detail` is a sentence, or the service's list of {"field", "message"} for bad fields."""
    param = None
    if isinstance(detail, list) and detail:
        fields = [(p.get("field"), p.get("message", "")) for p in detail]
        param = fields[0][0]
        message = "; ".join(f"{field}: {why}" if field else why for field, why in fields)
    else:
        message = str(detail)
    if status in (409, 422):
        status = 400
    kind = "server_error" if status >= 500 else TYPES.get(status, "invalid_request_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )
