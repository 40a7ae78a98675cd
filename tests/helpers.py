"""What tests of every kind share: waiting for a condition, and reading a job's live metric
stream (server-sent events, parsed by httpx-sse as the `finetune` client parses them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx
from httpx_sse import ServerSentEvent, connect_sse

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 60,
    *,
    what: str,
    every: float = 0.2,
    state: Callable[[], object] | None = None,
) -> T:
    """`condition()`'s first truthy value, asking every `every` s (once more at the deadline).
    After `timeout` s the test fails: "waited 60 s for WHAT", then `state()` if given (what
    there is instead, read when it gives up)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(every)
    message = f"waited {timeout:g} s for {what}"
    if state is not None:
        message += f"; {state()}"
    raise AssertionError(message)


def metric_stream(
    client: httpx.Client, job_id: str, last_event_id: str | None = None, timeout: float | None = 300
) -> list[ServerSentEvent]:
    """Every event of the job's live metric stream (`GET /jobs/{id}/logs` as an event stream,
    resumed after `Last-Event-ID` when given), read until the server closes it (it does after
    the `end` event). Per the SSE spec, an event without an `id:` line carries the last id
    seen before it ("" before the first). Pings are left out (httpx-sse yields a ping after
    an id as an event without data)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    path = f"/jobs/{job_id}/logs"
    with connect_sse(client, "GET", path, headers=headers, timeout=timeout) as source:
        assert source.response.status_code == 200, source.response.read()
        return [event for event in source.iter_sse() if event.data]


def assert_same_step(got: tuple[float, dict], expected: tuple[float, dict]) -> None:
    """Two training steps' (loss, {name: gradient}) agree: loss to 1e-5, each gradient to
    1e-5 absolute / 1e-4 relative (compiled layers against eager ones)."""
    import torch

    (loss, grads), (expected_loss, expected_grads) = got, expected
    assert abs(loss - expected_loss) < 1e-5
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
