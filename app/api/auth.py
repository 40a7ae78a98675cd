"""Who is asking: the owner behind the request's API key, or "local" with auth off.

The key is checked in a middleware, before any body is read, so a client without a valid key
can't make the server spool an upload; routes get the owner through the `Owner` dependency.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import database_unavailable, error_response
from app.db import UNREACHABLE
from app.errors import NotAuthenticated
from app.models import LOCAL_OWNER
from app.services.keys import owner_of
from app.settings import get_settings

PUBLIC_PATHS = frozenset(
    {"/", "/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/ui"}
)
# The dashboard's static files; the page asks for a key and sends it with every API call.
PUBLIC_PREFIXES = ("/ui/",)


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or []:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


METRICS_PATH = "/metrics"


def _is_operator(token: str | None, metrics_token: str) -> bool:
    if not token or not metrics_token:
        return False
    return hmac.compare_digest(token.encode(), metrics_token.encode())


class Authenticate:
    """Rejects requests without a valid key (401) except to public paths; puts the owner in
    the request's state, and whether the caller is the operator (FINETUNE_METRICS_TOKEN on
    /metrics, or anyone with auth off)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        if path == METRICS_PATH and _is_operator(_bearer_token(scope), settings.metrics_token):
            scope.setdefault("state", {}).update(owner=None, operator=True)
            await self.app(scope, receive, send)
            return
        if settings.auth:
            token = _bearer_token(scope)
            try:
                owner = await run_in_threadpool(owner_of, token) if token else None
            except UNREACHABLE as exc:  # outside the app's exception handlers: answered here
                await database_unavailable(scope.get("method", ""), path, exc)(scope, receive, send)
                return
            if owner is None:
                error = NotAuthenticated(
                    "unknown or revoked API key" if token else "missing `Authorization: Bearer <key>` header"
                )
                response = error_response(
                    path, error.status_code, error.code, error.detail, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        else:
            owner = LOCAL_OWNER
        # With auth off there is one owner, who may see everything.
        scope.setdefault("state", {}).update(owner=owner, operator=not settings.auth)
        await self.app(scope, receive, send)


_bearer = HTTPBearer(auto_error=False, description="An API key from `finetune keys create OWNER`.")


def current_owner(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The owner the middleware found (the HTTPBearer parameter documents the scheme in OpenAPI)."""
    return request.state.owner


Owner = Annotated[str, Depends(current_owner)]
