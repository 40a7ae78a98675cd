"""Request caps: 431 for headers larger than FINETUNE_MAX_HEADER_BYTES, 413 before a large body is
read (or as soon as it outgrows the cap), and 422 for a JSON body nested deeper than any request of
this API needs."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.errors import BodyTooLarge, HeadersTooLarge, RequestInvalid

# The deepest request body here (a job spec's sections, an OpenAI request's hyperparameters)
# is 4 levels; this leaves room for clients that send more, and keeps parsers far from their
# recursion limits.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether `body`, read as JSON, nests arrays and objects more than `limit` levels deep
    (brackets inside strings don't count)."""
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


class HeaderSizeLimit:
    """Refuses a request whose header names and values add up to more than `limit` bytes with a
    431, before anything else looks at it. The server's parser bounds what it buffers before this
    runs (app/cli.py `serve`)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and headers_size(scope) > self.limit:
            detail = f"request headers here are limited to {self.limit} bytes (names and values together)"
            response = error_response(scope.get("path", ""), 431, HeadersTooLarge.code, detail)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def headers_size(scope: Scope) -> int:
    return sum(len(name) + len(value) for name, value in scope.get("headers") or [])


class JsonDepthLimit:
    """Refuses JSON bodies nested deeper than MAX_JSON_DEPTH with a 422 on `body`, before any
    parser sees them. Runs inside BodySizeLimit, so what it buffers is capped."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        # FastAPI reads a body without a content type as JSON too
        content_type = headers.get(b"content-type", b"json").split(b";")[0].strip()
        if scope["type"] != "http" or not content_type.endswith(b"json"):
            await self.app(scope, receive, send)
            return
        messages, chunks = [], []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        if json_depth_exceeds(b"".join(chunks), MAX_JSON_DEPTH):
            detail = [
                {
                    "field": "body",
                    "message": f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
                    "type": "json_too_deep",
                }
            ]
            response = error_response(scope.get("path", ""), 422, RequestInvalid.code, detail)
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class BodySizeLimit:
    """Caps request bodies at `limit` bytes, and at `upload_limit` under `upload_prefixes`."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int, upload_prefixes: tuple[str, ...]):
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_prefixes = upload_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.upload_limit if path.startswith(self.upload_prefixes) else self.limit
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(limit, scope, receive, send)
            return
        received = 0
        too_large = False
        replaced = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # The app sees the client go away (so no handler runs on a cut-off body);
                    # whatever it answers is replaced by a 413 below.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if not too_large:
                await send(message)
            elif not replaced:
                replaced = True
                await self._reject(limit, scope, receive, send)

        await self.app(scope, counting_receive, guarded_send)
        if too_large and not replaced:  # the app gave up on the body without answering
            await self._reject(limit, scope, receive, send)

    @staticmethod
    async def _reject(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            scope.get("path", ""), 413, BodyTooLarge.code, f"request bodies here are limited to {limit} bytes"
        )
        await response(scope, receive, send)
