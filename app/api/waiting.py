"""Waiting, in a request, for the sampler to answer: the native `/generate` route (a 202 when it
has not answered in time) and the OpenAI-style completions (a 504, or a stream of what it
writes) read the sample's row the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.db import UNREACHABLE
from app.errors import RETRY_AFTER_S
from app.models import SampleStatus
from app.schemas import SampleRead
from app.services import samples

# How often a waiting request reads its sample's row.
POLL_S = 0.1


async def sample_updates(sample: SampleRead, owner: str, timeout_s: float) -> AsyncIterator[SampleRead]:
    """The sample's row each time it may have changed: until it is answered (or failed), or
    `timeout_s` has passed (the last one yielded then is not final). While the database does
    not answer, the last row read stands and the wait goes on: the error is raised only if it
    is still down at the deadline."""
    deadline = time.monotonic() + timeout_s
    unreachable: Exception | None = None
    while True:
        yield sample
        if sample.status in SampleStatus.FINAL or time.monotonic() > deadline:
            if unreachable is not None:
                raise unreachable
            return
        await asyncio.sleep(POLL_S if unreachable is None else RETRY_AFTER_S)
        try:
            sample = await run_in_threadpool(samples.get_sample, sample.job_id, sample.id, owner)
            unreachable = None
        except UNREACHABLE as exc:
            unreachable = exc


async def latest(sample: SampleRead, owner: str, timeout_s: float) -> SampleRead:
    """The sample once answered (or failed), or as it is after `timeout_s`."""
    async for update in sample_updates(sample, owner, timeout_s):
        sample = update
    return sample
