"""Absolute links in responses (a checkpoint's `download_url`, a job's `adapter_url`): a client
joins a relative path to its own base URL (the openai client's is `…/v1`), which breaks it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.settings import get_settings


def base_url(request: Request) -> str:
    """FINETUNE_PUBLIC_URL where a proxy stands in front, else the address this request came to
    (with any root path the server was started with)."""
    return (get_settings().public_url or str(request.base_url)).rstrip("/")


BaseUrl = Annotated[str, Depends(base_url)]
