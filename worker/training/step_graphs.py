"""A training micro-batch's forward and backward replayed as one CUDA graph.

After compiling the decoder layers (worker.training.speed) the default recipe's step is still
bound by host work on a big GPU: ~100 compiled-layer calls a step, each paying dynamo's guards
(~460 µs), autograd's and checkpointing's Python and its kernel launches, while the GPU idles
three quarters of the step (docs/benchmarks.md). A CUDA graph records the kernels of a whole
micro-batch (forward, loss, backward with its recomputation) once, and replays them with one
launch: the host's share of a replayed micro-batch is copying its tensors in.

- One graph per micro-batch shape (rows × padded width; widths are multiples of the speed
  plan's `row_multiple`, so a job meets a few dozen): a shape's first micro-batch runs eagerly
  (and compiles what it needs), its second is captured, every later one replays. All graphs
  share one memory pool: they run one at a time, so each reuses what the others free.
- The micro-batch is the Trainer's own `training_step` (its loss, loss scaling and backward),
  run on the graph's input tensors. The LoRA gradients accumulate in place into the parameters'
  `.grad` tensors, which the graphs write to: they are made before the first capture and zeroed
  in place after each optimizer step (never set to None).
- Dropout draws its masks from a counter-based hash (`counter_dropout`) of a seed drawn for each
  micro-batch, the module, the call and the element, instead of the CUDA generator: checkpointed
  layers recompute their forward in the backward and must drop the same elements, and
  torch.utils.checkpoint restores the generator's state with calls a capture forbids. Same
  distribution (each element kept with probability 1 − p, scaled by 1 / (1 − p)), other draws.
- A capture that fails (a shape that needs a compile of its own, an op that waits for the GPU)
  leaves that micro-batch to the eager path and is tried again the next time; a shape failing
  twice stays eager, and after `MAX_FAILURES_IN_ALL` failures the whole job does. The pool is
  handed back by a capture that failed in Python, e.g. on a recompile (torch's capture_end never
  does when the capture failed, and every later capture was refused: "beginAllocateToPool:
  already recording"); after a CUDA error inside the capture ("operation failed due to a previous
  error during capture", seen with the dense mask in rows, which no plan captures) it is not yet.
- A capture doesn't wait for the GPU (`_recording`): torch's `torch.cuda.graph` synchronizes and
  empties the allocator's caches before each one, so at each new shape the GPU's queue drained
  and the GPU idled while the host recorded (an H100, the default recipe: 18,421 tok/s at 14.49
  GiB reserved with it, 20,554 at 8.18 without; docs/benchmarks.md, round six). The caches are
  emptied once, before the first capture (the eager first micro-batch's blocks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_FAILURES = 2  # captures of one shape
MAX_FAILURES_IN_ALL = 20

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # the multiplier of a well-mixing 32-bit integer hash (T. Mueller's)
_CALLS_PER_MODULE = 64  # a module's calls within one layer forward get their own streams


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash, on int64 tensors holding values below 2**32 (no overflow)."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    return x ^ (x >> 16)


def counter_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """Inverted dropout whose mask is a function of (seed, stream, element index) alone: called
    again with the same arguments it drops the same elements. `seed` and `stream` are int64
    scalars on x's device."""
    if p >= 1.0:
        return x * 0.0
    key = _mix32((seed ^ _mix32(stream & _MASK32)) & _MASK32)
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape) & _MASK32
    bits = _mix32((_mix32(index ^ key) + key) & _MASK32)
    keep = bits >= round(p * 2**32)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class _CounterDropout(torch.nn.Dropout):
    """An `nn.Dropout` switched to `counter_dropout` (by class, so that every layer's modules
    share one compiled graph: dynamo guards a module's class, but would guard each module's own
    forward function)."""

    dropout_seed: torch.Tensor
    dropout_salt: torch.Tensor
    counter_calls: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        call = self.counter_calls
        self.counter_calls = call + 1
        stream = self.dropout_salt * _CALLS_PER_MODULE + call
        return counter_dropout(x, self.p, self.dropout_seed, stream)


@dataclass
class CounterDropout:
    """The model's dropout modules switched to `counter_dropout`, and their shared seed."""

    seed: torch.Tensor
    modules: list[_CounterDropout]

    def next_micro_batch(self) -> None:
        """A new seed (from torch's generator, so a job's seed still decides the draws), and
        every module's call count back to 0."""
        self.seed.random_(0, 2**31)
        for module in self.modules:
            module.counter_calls = 0


def use_counter_dropout(model: torch.nn.Module) -> CounterDropout | None:
    """Switch every `nn.Dropout` of the model to `counter_dropout` (None: the model has none);
    the model keeps the result as `model.counter_dropout`."""
    existing = getattr(model, "counter_dropout", None)
    if existing is not None:
        return existing
    modules = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    if not modules:
        return None
    device = next(model.parameters(), torch.empty(0)).device
    seed = torch.zeros((), dtype=torch.int64, device=device)
    for salt, module in enumerate(modules, start=1):
        module.register_buffer("dropout_seed", seed, persistent=False)
        module.register_buffer("dropout_salt", torch.tensor(salt, device=device), persistent=False)
        module.counter_calls = 0
        module.__class__ = _CounterDropout
    holder = CounterDropout(seed, modules)
    setattr(model, "counter_dropout", holder)  # noqa: B010 - an attribute nn.Module doesn't declare
    return holder


def use_torch_dropout(model: torch.nn.Module) -> None:
    """Undo `use_counter_dropout` (the bench measures variants on one loaded model)."""
    holder = getattr(model, "counter_dropout", None)
    if holder is None:
        return
    for module in holder.modules:
        module.__class__ = torch.nn.Dropout
        del module._buffers["dropout_seed"], module._buffers["dropout_salt"]
    delattr(model, "counter_dropout")


def reset_dropout_calls(module: torch.nn.Module) -> None:
    """Before a layer's forward (and its recomputation): its dropouts count their calls from 0."""
    for dropout in getattr(module, "counter_dropouts", ()):
        dropout.counter_calls = 0


def mark_layer_dropouts(layer: torch.nn.Module) -> None:
    layer.counter_dropouts = [m for m in layer.modules() if isinstance(m, _CounterDropout)]


# the graphs

StepFn = Callable[[dict[str, Any], Any], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Any]
    items: torch.Tensor | None
    loss: torch.Tensor

    def replay(self, inputs: dict[str, Any], items: Any) -> torch.Tensor:
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                self.inputs[name].copy_(value, non_blocking=True)
        if self.items is not None:
            self.items.copy_(
                items if isinstance(items, torch.Tensor) else torch.tensor(items), non_blocking=True
            )
        self.graph.replay()
        return self.loss.clone()


class StepGraphs:
    """Runs a Trainer's micro-batches (`step(model, inputs, items, run)`, `run` being the
    Trainer's own training_step) as CUDA graphs, one per input shape; see the module's doc."""

    def __init__(self, capture_at_first_sight: bool = False) -> None:
        # False: every shape's first micro-batch runs eagerly, its second is captured. True: only
        # the job's first micro-batch runs eagerly (it compiles the layers and initializes what
        # runs lazily), and a new shape is captured the first time it comes; the eager runs'
        # activations then never sit in the allocator's cache beside the graphs' pool.
        self.capture_at_first_sight = capture_at_first_sight
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: set[tuple] = set()
        self.failed: dict[tuple, int] = {}
        self.failure_lines: dict[str, int] = {}  # each failure's first line, and how often
        self.pool: Any = None  # the graphs' shared memory pool, and the stream they are captured on
        self.stream: Any = None
        self.calls = self.replays = self.failures = 0
        self.stopped: str | None = None

    def step(self, model: torch.nn.Module, inputs: dict[str, Any], items: Any, run: StepFn) -> torch.Tensor:
        """A shape's first micro-batch runs eagerly: it compiles what the shape needs (a compile,
        or a new kernel's autotuning, can't run inside a capture). Its second is captured, and
        every later one replayed (`capture_at_first_sight`: only the job's first runs eagerly).
        A capture that fails runs its micro-batch eagerly and is tried again the next time; a
        shape failing `MAX_FAILURES` times stays eager."""
        self.calls += 1
        key = _shape_key(inputs, items)
        known = key in self.seen or (self.capture_at_first_sight and bool(self.seen))
        if self.stopped is None and known:
            captured = self.graphs.get(key)
            if captured is None and self.failed.get(key, 0) < MAX_FAILURES:
                captured = self._capture(key, model, inputs, items, run)
            if captured is not None:
                self.replays += 1
                return captured.replay(inputs, items)
        self.seen.add(key)
        return run(inputs, items)

    def _capture(self, key: tuple, model: torch.nn.Module, inputs: dict[str, Any], items: Any, run: StepFn):
        _hold_gradients(model)
        device = next(p.device for p in model.parameters() if p.requires_grad)
        if self.pool is None:  # the first capture: the eager first micro-batch's cached blocks go
            torch.cuda.empty_cache()
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)
        static = {k: v.to(device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        static_items = None
        if items is not None:
            static_items = torch.as_tensor(items).to(device, copy=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with _recording(graph, self.pool, self.stream):
                loss = run(static, static_items)
        except Exception as exc:  # noqa: BLE001 - any failure leaves this micro-batch to the eager path
            del graph
            _release_generator(device)
            _release_pool(device, self.pool)
            self.failures += 1
            self.failed[key] = self.failed.get(key, 0) + 1
            first_line = exception_line(exc)
            self.failure_lines[first_line] = self.failure_lines.get(first_line, 0) + 1
            log.info("CUDA graph capture failed (%s); runs eagerly", first_line)
            if self.failures >= MAX_FAILURES_IN_ALL:
                self.stopped = f"{self.failures} captures failed, the last: {first_line}"
            return None
        captured = _Captured(graph, static, static_items, loss)
        self.graphs[key] = captured
        return captured

    def describe(self) -> str:
        text = (
            f"CUDA graphs: {self.replays} of {self.calls} micro-batches replayed "
            f"from {len(self.graphs)} captured shapes"
        )
        if self.stopped:
            text += f"; stopped capturing ({self.stopped})"
        elif self.failure_lines:
            most = max(self.failure_lines, key=self.failure_lines.__getitem__)
            text += f"; {self.failures} capture(s) failed, most often: {most}"
        return text

    def stats(self) -> dict[str, Any]:
        return {
            "micro_batches": self.calls,
            "replayed": self.replays,
            "shapes": len(self.graphs),
            "failed_captures": self.failures,
            "failures": dict(self.failure_lines),
        }


def exception_line(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters of it), for an event or a log."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


@contextmanager
def _recording(graph: torch.cuda.CUDAGraph, pool: Any, stream: torch.cuda.Stream) -> Iterator[None]:
    """`torch.cuda.graph` without its synchronize and cache emptying before the capture (see the
    module's doc): the GPU goes on with the queued micro-batches while the host records this one."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()
    torch.cuda.current_stream(stream.device).wait_stream(stream)


def _release_pool(device: torch.device, pool: Any) -> None:
    """After a failed capture the allocator still sends this thread's allocations to the pool
    (capture_end raised before it ended that): end it, so that the next capture may begin."""
    try:
        torch._C._cuda_endAllocateToPool(device.index or 0, pool)
    except RuntimeError:  # nothing was being recorded to it
        pass


def _release_generator(device: torch.device) -> None:
    """After a failed capture the device's default generator still believes it is capturing
    (the capture's end never ran) and refuses to draw: give it a fresh state that continues
    where it stood."""
    generator = torch.cuda.default_generators[device.index or 0]
    fresh = torch.Generator(device=device)
    fresh.set_state(generator.get_state())
    generator.graphsafe_set_state(fresh)


def _shape_key(inputs: dict[str, Any], items: Any) -> tuple:
    tensors = tuple(
        (name, tuple(value.shape), value.dtype)
        for name, value in sorted(inputs.items())
        if isinstance(value, torch.Tensor)
    )
    return tensors + (items is None,)


def _hold_gradients(model: torch.nn.Module) -> None:
    """The trainable parameters' gradients exist (zeros) before a capture, and the model zeroes
    them in place from now on: the graphs accumulate into these very tensors."""
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    if not getattr(model, "holds_gradients", False):
        setattr(model, "zero_grad", partial(type(model).zero_grad, model, set_to_none=False))  # noqa: B010
        setattr(model, "holds_gradients", True)  # noqa: B010
