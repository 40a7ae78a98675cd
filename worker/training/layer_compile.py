"""A job's first steps train eagerly while its decoder layers compile in a thread.

On a big GPU the first compiled step waited for dynamo's trace, Inductor's kernels and
FlexAttention's templates: ~80 s from the job's "training step" event to its first step on an
H100, 62 s with a warm compile cache (issue 30), as long as ~250 of its steps. Instead the job
starts on the eager layers (each recomputed whole, bitsandbytes' own 4-bit matmul, the dense
mask and sdpa, no CUDA graphs: the plan a T4 runs), and a thread compiles the layer meanwhile:
the first layer's inputs at the job's first step are kept (with the attention mask the compiled
plan uses), and before the second step the thread copies that decoder layer and runs the compiled
forward and backward on the copy once, which compiles them (the copy's own gradients, never the
job's). Once it is done the trainer switches, before its next micro-batch, to the compiled layers,
FlexAttention and CUDA graphs; their first call finds the layer compiled (dynamo's guards see the
same classes, shapes' symbols and settings).

A compile that fails in the thread is said, and the switch still happens: the layers then
compile at their first call, as without this module. The thread shares the GPU's default stream
and the interpreter with the training, so the eager steps and the compile each go slower than
alone; nothing else is shared: the copy has its own dropout counters, config and gradients.
"""

from __future__ import annotations

import atexit
import copy
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from types import MethodType
from typing import Any

import torch

from worker.training.nf4 import use_bitsandbytes_matmul, use_plain_4bit_matmul
from worker.training.speed import (
    LayerForwards,
    SpeedPlan,
    checkpointed_layer_forward,
    decoder_layers,
    document_block_mask,
    eager_layer_forwards,
    job_step_graphs,
    set_layer_forwards,
    use_flex_attention,
    use_sdpa_attention,
)
from worker.training.step_graphs import exception_line

log = logging.getLogger(__name__)

Say = Callable[..., None]  # (text, **data): a job event
TRACE_ATTEMPTS = 3


class LayerCompile:
    """The model's layers eager until `compiled` is compiled in a thread (see the module's doc).

    The trainer gives it each micro-batch's per-token sample numbers (`sequence_ids`, for the
    BlockMask of the copy's compile), asks `ready()` before each micro-batch and then calls
    `switch(trainer)` once; `close()` when the training ends."""

    def __init__(self, model: torch.nn.Module, plan: SpeedPlan, compiled: LayerForwards) -> None:
        self.model = model
        self.plan = plan
        self.compiled = compiled
        self.flex = plan.mask == "flex"
        # dropout by counter (CUDA graphs) draws nothing from torch's generator
        self.preserve_rng_state = not plan.graphs
        # the eager layers: each recomputed whole when the plan recomputes anything
        set_layer_forwards(model, eager_layer_forwards(model), plan.checkpointing, self.preserve_rng_state)
        if self.flex:
            use_sdpa_attention(model)
        # eager, bitsandbytes' own 4-bit matmul (its kernel, not the torch ops the compile fuses)
        if plan.plain_4bit:
            use_bitsandbytes_matmul(model)
        bypass_hub_kernel_routing(model)
        self.sequence_ids: torch.Tensor | None = None
        self.eager_micro_batches = 0
        self.compile_seconds: float | None = None
        self.error: str | None = None
        self.switched = False
        self.say: Say = lambda text, **data: log.info(text)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: tuple | None = None  # the first call's layer and inputs, until `ready`
        self._hook = decoder_layers(model)[0].register_forward_pre_hook(self._first_call, with_kwargs=True)

    # the first layer call's inputs kept; before the next micro-batch, the layer copied and compiled

    def _first_call(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The first training call's inputs kept (detached copies); the compile starts before the
        next micro-batch (`ready`), so that the job's first step runs alone (measured on an H100:
        15.7 s for an eager first micro-batch beside the compile's trace) and the layer is copied
        as its first call left it (bitsandbytes' 4-bit layers cast their bias to the input's dtype
        then: a copy taken before compiled a graph the model's layers no longer matched)."""
        if not (layer.training and torch.is_grad_enabled()):
            return  # an evaluation's forward: wait for a training one
        self._hook.remove()
        self._guarded(self._keep_inputs, layer, args, kwargs)

    def _guarded(self, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 - never the job's step: the layers compile inline then
            self.error = exception_line(exc)
            log.warning("starting the decoder layer's compile beside the training failed", exc_info=True)
            self.compile_seconds = 0.0
            self._pending = None
            self._done.set()

    def _keep_inputs(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        args, kwargs = _detached(args), _detached(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = args[1:]
        if self.flex:
            if self.sequence_ids is None:
                raise RuntimeError("LayerCompile needs the micro-batch's sequence_ids before its forward")
            kwargs["attention_mask"] = document_block_mask(self.sequence_ids)
        device = hidden.device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        self._pending = (layer, hidden, args, kwargs, autocast)

    def _start(self) -> None:
        assert self._pending is not None
        layer, hidden, args, kwargs, autocast = self._pending
        self._pending = None
        copied = copy.deepcopy(layer)
        if self.flex:
            use_flex_attention_on(copied)
        if self.plan.plain_4bit:
            use_plain_4bit_matmul(copied)
        self._thread = threading.Thread(
            target=self._compile,
            args=(copied, hidden, args, kwargs, autocast),
            name="layer-compile",
            daemon=True,  # a job that ends first doesn't wait for it (see `close`)
        )
        self._thread.start()

    def _compile(
        self, layer: torch.nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, autocast
    ) -> None:
        started = time.perf_counter()
        forward = checkpointed_layer_forward(
            self.compiled[type(layer)], self.plan.whole_layers_recomputed, preserve_rng_state=False
        )
        device, enabled, dtype = autocast
        try:
            # the first layer's input, and every later layer's (which needs its gradient)
            for needs_grad in sorted({hidden.requires_grad, True}):
                for attempt in range(1, TRACE_ATTEMPTS + 1):
                    x = hidden.detach().requires_grad_(needs_grad)
                    try:
                        with torch.autocast(device, dtype=dtype) if enabled else nullcontext():
                            out = forward(layer, x, *args, **kwargs)
                        break
                    except Exception as exc:
                        # dynamo traced again (after a graph break) and the training's thread had
                        # changed what the first trace read: trace once more
                        if type(exc).__name__ != "SpeculationLogDivergence" or attempt == TRACE_ATTEMPTS:
                            raise
                out = out[0] if isinstance(out, tuple) else out
                out.backward(torch.ones_like(out))  # into the copy's gradients only
            if hidden.is_cuda:
                torch.cuda.synchronize(hidden.device)
        except Exception as exc:  # noqa: BLE001 - said at the switch; the layers compile inline then
            self.error = exception_line(exc)
            log.warning("compiling the decoder layer in the background failed", exc_info=True)
        finally:
            self.compile_seconds = time.perf_counter() - started
            self._done.set()

    # the switch, between two micro-batches

    def ready(self) -> bool:
        """Before each micro-batch: whether to switch now (and, before the second, the compile starts)."""
        if self._pending is not None:
            self._guarded(self._start)
            return False
        return not self.switched and self._done.is_set()

    def switch(self, trainer: Any) -> None:
        """The compiled layers, FlexAttention and CUDA graphs from the trainer's next micro-batch."""
        self.switched = True
        if self.plan.plain_4bit:
            use_plain_4bit_matmul(self.model)
        whole_layers = self.plan.whole_layers_recomputed
        set_layer_forwards(self.model, self.compiled, whole_layers, self.preserve_rng_state)
        if self.flex:
            use_flex_attention(self.model)
            trainer.mask_kind = "flex"
        if self.plan.graphs:
            trainer.step_graphs = job_step_graphs()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the eager micro-batches' cached blocks
        seconds = round(self.compile_seconds or 0.0, 1)
        data = {
            "compile_seconds": seconds,
            "eager_micro_batches": self.eager_micro_batches,
            "compile_error": self.error,
        }
        if self.error is None:
            self.say(
                f"decoder layers compiled in {seconds} s while {self.eager_micro_batches} micro-batch(es) "
                "trained eagerly; compiled from the next one on",
                **data,
            )
        else:
            self.say(
                f"compiling the decoder layers beside the eager steps failed ({self.error}); "
                "they compile at their next call instead",
                **data,
            )

    def close(self) -> None:
        """The training ended; unless it switched, says why its micro-batches all trained eagerly
        (a job's events always tell whether its layers were compiled). A compile still running is
        left to finish while the job saves its adapter; the process waits for it before it exits
        (Inductor's compile workers end then)."""
        self._hook.remove()
        if self.switched:
            return
        thread, eager = self._thread, self.eager_micro_batches
        data: dict[str, Any] = {"eager_micro_batches": eager, "compile_error": self.error}
        if thread is not None and thread.is_alive():
            why = "its decoder layers compiled"
            atexit.register(thread.join)
        elif not self._done.is_set():  # one micro-batch: the compile never started
            why = "its decoder layers began compiling"
        elif self.error is not None:
            why = f"it used its compiled decoder layers (their compile failed: {self.error})"
        else:  # compiled between the last micro-batch and the end
            data["compile_seconds"] = round(self.compile_seconds or 0.0, 1)
            why = f"it used its decoder layers, compiled in {data['compile_seconds']} s"
        self.say(f"the training ended before {why}: all {eager} micro-batch(es) trained eagerly", **data)


def bypass_hub_kernel_routing(model: torch.nn.Module) -> int:
    """Modules whose class forward the `kernels` package wraps (transformers' attention, for hub
    kernels such as a rotary embedding's) run the class's own forward; how many.

    The wrapper routes the decorated functions to hub kernels, which never load here (no
    `kernelize`); but it keeps its routing table, while compiling, in one variable for the whole
    process, which the eager training's calls in another thread would change under the compile's
    trace. Without the wrapper the functions run as written (what the wrapper falls back to)."""
    bypassed = 0
    for module in model.modules():
        forward = type(module).forward
        inner = getattr(forward, "__wrapped__", None)
        code = getattr(forward, "__code__", None)  # the wrapper's own (functools.wraps copies the rest)
        if inner is None or code is None or "forward" in vars(module) or "kernels" not in code.co_filename:
            continue
        module.forward = MethodType(inner, module)
        bypassed += 1
    return bypassed


def use_flex_attention_on(layer: torch.nn.Module) -> None:
    """The copied layer's own config (deep-copied with it) set to FlexAttention, as the model's
    will be at the switch; the model's layers keep sdpa until then."""
    configs = {id(m.config): m.config for m in layer.modules() if hasattr(m, "config")}
    for config in configs.values():
        config._attn_implementation = "flex_attention"


def _detached(value: Any) -> Any:
    """A layer call's arguments, tensors detached and copied (the eager step goes on with its own)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value
