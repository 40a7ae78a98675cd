"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.routes import router


def create_app() -> FastAPI:
    app = FastAPI(
        title="Fine-tune job service",
        version="0.1.0",
        description="Submit QLoRA fine-tune jobs, watch metrics live, download checkpoints and adapters.",
    )
    install_error_handlers(app)
    app.include_router(router)
    return app


app = create_app()
