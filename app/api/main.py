"""The FastAPI application."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.api.auth import Authenticate
from app.api.errors import install_error_handlers
from app.api.exports import router as exports_router
from app.api.limits import BodySizeLimit, HeaderSizeLimit, JsonDepthLimit
from app.api.openai.inference import router as openai_inference_router
from app.api.openai.routes import router as openai_router
from app.api.routes import ops_router, router
from app.api.urls import BaseUrl
from app.services.notifications import deliver_due
from app.services.sweeper import redispatch_lost, sweep
from app.settings import get_settings

log = logging.getLogger(__name__)

# The dashboard: static files that call the same REST API as the CLI.
UI_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"


async def sweep_forever(interval_s: float) -> None:
    """Re-queue jobs whose worker died, re-send ids the broker lost, and deliver job-end
    notifications, for as long as the API runs."""
    while True:
        await asyncio.sleep(interval_s)
        for task in (sweep, redispatch_lost, deliver_due):
            try:
                await run_in_threadpool(task)
            except Exception as exc:  # a database or broker hiccup must not end the sweeper
                log.warning("%s failed: %s", task.__name__, exc)


@asynccontextmanager
async def lifespan(_: FastAPI):
    task = asyncio.create_task(sweep_forever(get_settings().sweep_interval_s))
    yield
    task.cancel()


def redirect(url: str) -> PlainTextResponse:
    """A 307 to `url` that says where it goes, for clients that don't follow it (curl)."""
    return PlainTextResponse(f"Redirecting to {url}\n", status_code=307, headers={"location": url})


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        title="Fine-tune job service",
        version="0.1.0",
        description="Submit QLoRA fine-tune jobs, watch metrics live, download checkpoints and adapters.",
    )
    install_error_handlers(app)
    app.include_router(ops_router)
    app.include_router(router)
    app.include_router(exports_router)
    app.include_router(openai_router)
    app.include_router(openai_inference_router)
    app.mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)  # else Starlette's bare 307 to /ui/, with no body
    def to_dashboard(base: BaseUrl) -> PlainTextResponse:
        return redirect(f"{base}/ui/")

    settings = get_settings()
    app.add_middleware(JsonDepthLimit)
    app.add_middleware(
        BodySizeLimit,
        limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_prefixes=("/datasets", "/v1/files"),
    )
    app.add_middleware(Authenticate)  # no body is read for a request without a key
    app.add_middleware(HeaderSizeLimit, limit=settings.max_header_bytes)  # outermost
    return app


app = create_app()
