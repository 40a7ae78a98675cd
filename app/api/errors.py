"""Every error leaves the API as {"error": code, "detail": ...} (under /v1 in OpenAI's shape);
no traceback reaches a user."""

from __future__ import annotations

import difflib
import logging
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.openai.errors import is_openai_path, openai_error
from app.db import UNREACHABLE
from app.errors import (
    DatabaseUnavailable,
    InternalError,
    MethodNotAllowed,
    RequestInvalid,
    RouteNotFound,
    ServiceError,
)

log = logging.getLogger(__name__)

BODY_PARSE_ERROR = "There was an error parsing the body"


def _field(loc: tuple) -> str:
    # ("body", "training", "learning_rate") -> "training.learning_rate"
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or str(loc[0] if loc else "")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a value of this type may be (through Optional, unions, lists, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _fields_of(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A model's fields by every name a request may spell them with (name and alias)."""
    fields = dict(model.model_fields)
    fields.update({f.alias: f for f in model.model_fields.values() if f.alias})
    return fields


def closest_field(annotation: Any, loc: tuple) -> str | None:
    """For an unknown field at `loc` inside a value of type `annotation` (a typo like
    `training.learning_rat`), the allowed name at that level closest to it, if one is close."""
    models = _models_in(annotation)
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list: the same models
            continue
        tagged = [model for model in models if model.__name__ == part]  # a union's member
        if tagged:
            models = tagged
            continue
        fields = [_fields_of(model)[part] for model in models if part in _fields_of(model)]
        models = [model for field in fields for model in _models_in(field.annotation)]
    names = {name for model in models for name in _fields_of(model)}
    close = difflib.get_close_matches(str(loc[-1]), sorted(names), n=1) if loc else []
    return close[0] if close else None


def _field_error(err: dict, body_type: Any = None) -> dict[str, object]:
    """One request-validation error as {"field", "message", "type"}; a body that is not JSON is
    named as the body, with where the parser stopped (FastAPI puts that position in `loc`); an
    unknown field of the body (`body_type`) names the allowed one it is closest to."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error") or err.get("msg", "")
        message = f"not valid JSON at character {loc[-1]}: {reason}"
        return {"field": "body", "message": message, "type": "json_invalid"}
    message = err.get("msg", "")
    if err.get("type") == "extra_forbidden" and loc[:1] == ("body",) and body_type is not None:
        suggestion = closest_field(body_type, loc[1:])
        if suggestion:
            message = f"{message}; did you mean '{suggestion}'?"
    return {"field": _field(loc), "message": message, "type": err.get("type")}


def _body_type(request: Request) -> Any:
    """The type the matched route reads its body as (None: it reads none)."""
    route = request.scope.get("route")
    body = route.body_field if isinstance(route, APIRoute) else None
    return body.field_info.annotation if body is not None else None


def error_response(
    path: str, status: int, code: str, detail: object, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one place errors are rendered: `{"error": code, "detail": …}`, or OpenAI's shape for
    the OpenAI-compatible routes."""
    if is_openai_path(path):
        return openai_error(status, code, detail, headers)
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def service_error_response(path: str, exc: ServiceError) -> JSONResponse:
    return error_response(path, exc.status_code, exc.code, exc.detail, headers=exc.headers)


def database_unavailable(method: str, path: str, exc: Exception) -> JSONResponse:
    """A restart, an outage or a lock held too long: a 503 the client may retry, never a 500."""
    log.warning("database unavailable on %s %s: %s", method, path, exc)
    return service_error_response(path, DatabaseUnavailable("the database did not answer; retry shortly"))


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app answers at this request's path (Starlette's own 405
    names only the first such route's)."""
    methods: set[str] = set()
    routes = list(request.app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # an included APIRouter (FastAPI ≥ 0.16x)
        if included is not None:
            routes.extend(included.routes)
        elif route.matches(request.scope)[0] in (Match.PARTIAL, Match.FULL):
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        body_type = _body_type(request)
        detail = [_field_error(err, body_type) for err in exc.errors()]
        return error_response(request.url.path, 422, RequestInvalid.code, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 400:
            # FastAPI's and Starlette's answer to a body they can't parse (not UTF-8 text, broken
            # multipart; the service's own code raises no HTTPException): a bad field like any other
            if exc.detail == BODY_PARSE_ERROR:
                detail = [
                    {"field": "body", "message": "the body is not UTF-8 JSON text", "type": "json_invalid"}
                ]
            else:
                detail = [{"field": "body", "message": str(exc.detail), "type": "body_invalid"}]
            return error_response(path, 422, RequestInvalid.code, detail)
        code = {404: RouteNotFound.code, 405: MethodNotAllowed.code}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(path, exc.status_code, code, exc.detail, headers=headers or None)

    for unreachable in UNREACHABLE:

        @app.exception_handler(unreachable)
        async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
            return database_unavailable(request.method, request.url.path, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, InternalError.code, "unexpected server error")
