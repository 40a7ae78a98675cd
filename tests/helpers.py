"""What tests of every kind share: waiting for a condition, and reading a job's live metric
stream (server-sent events, parsed by httpx-sse as the `finetune` client parses them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

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


def without_dropout(model: Any) -> None:
    """Every dropout of `model` at p = 0: two paths of one step compute the same function."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def lora_step(model: Any, lora: dict[str, Any], **inputs: Any) -> tuple[float, dict]:
    """One forward and backward of `model` on `inputs`: (its loss, {name: gradient} of the
    `lora` parameters), the gradients zeroed after (what `assert_same_step` compares)."""
    loss = model(**inputs).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in lora.items()}
    model.zero_grad()
    return loss.item(), grads


def demo_lora_model(samples: int = 6) -> tuple[Any, Any, list]:
    """The real tiny Phi through the real 4-bit LoRA path (the demo spec, 256-token samples):
    (model, tokenizer, its first `samples` training samples). Needs the `demo_model` fixture."""
    from app.spec import JobSpec
    from tests.conftest import demo_spec
    from worker.training.data import build_training_data
    from worker.training.model import compute_dtype, load_quantized_lora_model, load_tokenizer

    spec = JobSpec.model_validate(demo_spec(max_seq_length=256))
    tokenizer = load_tokenizer(spec.base_model)
    chosen = build_training_data(spec.dataset, tokenizer, 256).samples[:samples]
    return load_quantized_lora_model(spec, compute_dtype(spec.quantization)), tokenizer, chosen


def packed_step(samples: list, pad_token_id: int, row_multiple: int) -> dict[str, Any]:
    """`samples` packed as one step (at most 2 rows, each up to their total length), collated
    (sequence ids kept)."""
    from worker.training.packing import PackedData, collate_packed, plan_steps

    lengths = [len(s.input_ids) for s in samples]
    packed = PackedData(samples, plan_steps(lengths, len(samples), 2, sum(lengths), seed=0))
    return collate_packed([packed[0]], pad_token_id, row_multiple=row_multiple)


def register_worker(name: str, *gpus: dict[str, Any]) -> None:
    """A training worker's registration as `finetune worker` writes it (worker.heartbeat): under
    the job queue, in the class of `gpus` (none: a CPU worker). The GPUs are the one thing a test
    here may make up: there is none on CI."""
    from app.queue import job_queue
    from app.routing import GpuClass
    from app.services import workers

    workers.register(name, job_queue(), list(gpus), GpuClass.of(gpus).signature)
