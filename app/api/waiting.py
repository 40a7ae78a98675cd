"""Waiting, in a request, for the sampler to answer: the native `/generate` route (a 202 when it
has not answered in time) and the OpenAI-style completions (a 504, or a stream of what it
writes) read the sample's row the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.models import SampleStatus
from app.schemas import SampleRead
from app.services import samples

# How often a waiting request reads its sample's row.
POLL_S = 0.1


async def sample_updates(sample: SampleRead, owner: str, timeout_s: float) -> AsyncIterator[SampleRead]:
    """The sample's row each time it may have changed: until it is answered (or failed), or
    `timeout_s` has passed (the last one yielded then is not final)."""
    deadline = time.monotonic() + timeout_s
    while True:
        yield sample
        if sample.status in SampleStatus.FINAL or time.monotonic() > deadline:
            return
        await asyncio.sleep(POLL_S)
        sample = await run_in_threadpool(samples.get_sample, sample.job_id, sample.id, owner)


async def latest(sample: SampleRead, owner: str, timeout_s: float) -> SampleRead:
    """The sample once answered (or failed), or as it is after `timeout_s`."""
    async for update in sample_updates(sample, owner, timeout_s):
        sample = update
    return sample
