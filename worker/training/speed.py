"""How a training step runs fast on the GPU it has, without changing what it computes.

Each setting here keeps the recipe's meaning (same samples per step, same loss, same
optimizer update); what it changes is how many kernels a step launches and which kernels:

- attention backend per GPU: on Hopper and newer (compute capability ≥ 9) PyTorch's sdpa tries cuDNN
  first, which plans a new graph for every new sequence length and costs ~2 ms of host time
  per call; the memory-efficient kernel (the one a T4 runs anyway, and the one that takes the
  packed path's 4D mask) does not. `choose_attention` switches cuDNN attention off there.
- per-decoder-layer `torch.compile`: each layer's forward and backward become a few fused
  kernels instead of ~300 small ones. Gradient checkpointing stays *outside* the compiled code
  (this module checkpoints each compiled layer itself, non-reentrant), so inductor never sees
  the recomputation (whole-model compile with checkpointing inside fails on torch 2.11: peft
  issue 3020). Row widths are rounded up (`row_multiple`) and the sequence dimension is
  compiled dynamic, so new lengths do not recompile. Their 4-bit layers dequantize and multiply
  with plain torch ops (`worker.training.nf4`, bitsandbytes' own arithmetic) that compile into
  the layer, instead of calling bitsandbytes' custom-op wrapper (~270 µs of host time a call).
- document-masked FlexAttention on Ampere and newer: the packed rows' attention is
  block-diagonal (each sample sees only itself), ~90 % of a 2048-token row's score matrix is
  masked for oasst-sized samples, and the memory-efficient kernel computes all of it against a
  dense additive mask. A `BlockMask` built from the per-token sample numbers lets FlexAttention
  skip the masked blocks; the result is the same attention (tests/test_throughput_speed.py).
- the recipe's `paged_adamw_32bit` runs as torch's fused AdamW on a GPU: the same update
  (AdamW, 32-bit states, same betas, eps, weight decay; tests/test_throughput_speed.py), but
  bitsandbytes' paged optimizer synchronizes the device after every parameter's update (256
  times a step for the default LoRA), which drains the GPU's queue each step; the LoRA states
  (~84 MB for Phi-2) gain nothing from paging. A checkpoint saved with the paged optimizer's
  state resumes into the fused one (`accept_bnb_adam_state`).
- the whole micro-batch as a CUDA graph (`worker.training.step_graphs`), where the layers are
  compiled and one GPU trains: forward, loss and backward (with its recomputation) recorded once
  per micro-batch shape and replayed with one launch, so the step stops waiting on the host's
  ~100 compiled-layer calls. Its dropout draws from a counter-based hash, so that checkpointed
  layers recompute the same masks inside a graph.
- the loss fused with `lm_head` (`worker.training.fused_loss`): a chunk of tokens at a time, so
  the vocabulary-wide float32 logits (three copies of ~0.2 GiB per 1,000 tokens for Phi-2) never
  exist; same loss and gradients.
- recomputation dropped on big cards: when a generous estimate of a full micro-batch's
  activations without checkpointing (twice that with CUDA graphs: their pool and the eager
  first runs each hold one) is under 3/4 of the GPU's free memory, the worker trains without it
  (and says so in the job's events): for Phi-2 an H200 drops it, an 80 GB card drops it without
  graphs only, a 40 GB card and a T4 keep it.

A T4 (compute capability 7.5) runs the eager layers with the rest unless the operator sets
`FINETUNE_COMPILE_PRE_AMPERE=1`: Triton, which compiles the layers, supports 8.0 and newer only
(docs/gpu.md's T4 section has what was measured for it).

Everything is opt-out with `FINETUNE_FAST_PATH=0` in the worker's environment, and nothing
here runs without CUDA (the CPU path, and so the test suite, is the plain eager one unless
a test asks for it).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch

from worker.training.fused_loss import fused_loss_refusal, use_fused_loss
from worker.training.nf4 import use_plain_4bit_matmul
from worker.training.step_graphs import (
    StepGraphs,
    mark_layer_dropouts,
    reset_dropout_calls,
    use_counter_dropout,
)

if TYPE_CHECKING:
    from worker.training.layer_compile import LayerCompile

log = logging.getLogger(__name__)

# Rows of a packed micro-batch are padded to a multiple of this on the GPU: fewer distinct
# shapes for cuBLAS/attention heuristics and the compiled layers, at < 3 % padding.
ROW_MULTIPLE = 64


def _env_flag(name: str, default: str) -> bool:
    """A worker switch: off for 0, false, no, off; unset or empty, `default`."""
    return (os.environ.get(name) or default).lower() not in ("0", "false", "no", "off")


def fast_path_enabled() -> bool:
    return _env_flag("FINETUNE_FAST_PATH", "1")


def compile_pre_ampere() -> bool:
    """The operator's opt-in to compiled layers on a card below `COMPILE_MIN_CAPABILITY` (a T4)."""
    return _env_flag("FINETUNE_COMPILE_PRE_AMPERE", "0")


@dataclass
class SpeedPlan:
    """What the worker does to make this job's steps fast, and why (for the job's events)."""

    attention: str = "default"
    # "sdpa": the dense additive 4D mask (worker.training.packing.block_causal_mask);
    # "flex": FlexAttention with a document BlockMask (`document_block_mask`)
    mask: str = "sdpa"
    # a packed step's rows laid end to end as one row (worker.training.packing.collate_packed):
    # no padding between rows, and the compiled layers meet one batch size
    one_row: bool = False
    compile_layers: bool = False
    checkpointing: bool = True
    row_multiple: int = 1
    # paged_adamw_32bit (and adamw_torch) run as torch's fused AdamW (see `optimizer_name`)
    fused_adamw: bool = False
    # the 4-bit layers' dequantize + matmul as torch ops, traced into the compiled layers
    # (worker.training.nf4) instead of bitsandbytes' custom-op wrapper
    plain_4bit: bool = False
    # each micro-batch shape's forward + backward captured once as a CUDA graph and replayed
    # (worker.training.step_graphs), dropout by counter-based hash
    graphs: bool = False
    # the loss computed with lm_head a chunk of tokens at a time (worker.training.fused_loss)
    fused_loss: bool = False
    # checkpointing of compiled layers: None, each layer recomputed whole in the backward (torch's
    # checkpoint around the compiled layer); a fraction, each layer keeps at most that share of
    # the activations it would keep without recomputation and recomputes the rest inside its
    # compiled backward, the compiler choosing the cheapest to recompute
    # (torch._functorch.config.activation_memory_budget)
    recompute_budget: float | None = None
    # the first micro-batches train on eager layers while the compiled ones compile in a thread
    # (worker.training.layer_compile); the compiled plan from the first micro-batch after
    compile_while_training: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def whole_layers_recomputed(self) -> bool:
        """Checkpointing on without a budget: each layer recomputed whole before its backward."""
        return self.checkpointing and self.recompute_budget is None

    def describe(self) -> str:
        parts = [f"attention: {self.attention}"]
        parts.append("decoder layers compiled" if self.compile_layers else "eager")
        if self.compile_layers and self.compile_while_training:
            parts.append("the first steps eager while they compile")
        if self.plain_4bit:
            parts.append("4-bit matmuls compiled into them")
        if self.one_row:
            parts.append("a step's samples in one row")
        if self.graphs:
            parts.append("micro-batches replayed as CUDA graphs (dropout by counter-based hash)")
        if self.fused_loss:
            parts.append("loss fused with lm_head (no full logits)")
        if self.checkpointing and self.recompute_budget is not None:
            parts.append(
                f"gradient checkpointing on: each layer keeps {self.recompute_budget:.0%} of its "
                "activations, recomputes the rest in its compiled backward"
            )
        else:
            parts.append("gradient checkpointing " + ("on" if self.checkpointing else "off"))
        if self.row_multiple > 1:
            parts.append(f"rows padded to a multiple of {self.row_multiple}")
        if self.fused_adamw:
            parts.append("paged_adamw_32bit runs as torch's fused AdamW (same update)")
        return "; ".join(parts + self.notes)


def choose_attention(capability: tuple[int, int]) -> str:
    """Switch sdpa's cuDNN backend off on Hopper and newer (see the module's docstring)."""
    if capability[0] >= 9:
        torch.backends.cuda.enable_cudnn_sdp(False)
        return "memory-efficient sdpa (cuDNN attention off)"
    return "default sdpa"


def activation_bytes_without_checkpointing(config: Any, tokens: int) -> int:
    """A generous estimate of a micro-batch's activations kept for backward without
    recomputation (Phi-2, 4 × 2048 tokens: 50 GiB estimated; 28.8 GiB allocated and 30.9 GiB
    reserved measured on an H200, compiled layers, FlexAttention)."""
    layers = getattr(config, "num_hidden_layers", 32)
    hidden = getattr(config, "hidden_size", 2560)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    per_token_layer = 2 * (24 * hidden + 4 * intermediate)
    return tokens * layers * per_token_layer


# Layers are compiled on compute capability 8.0 and newer, where it was measured and where Triton
# supports the card (Triton 3.3 and later: 8.0+; below, its matmuls lost their tensor-core path).
# A T4 (7.5) stays eager unless `FINETUNE_COMPILE_PRE_AMPERE=1`; then it compiles from
# PRE_AMPERE_MIN_CAPABILITY on, in rows without CUDA graphs (measured as a T4 on an H100,
# 2026-12-07: 8,521 tok/s at 10.4 GiB reserved against the eager 3,277; docs/gpu.md).
COMPILE_MIN_CAPABILITY = (8, 0)
PRE_AMPERE_MIN_CAPABILITY = (7, 5)
# With checkpointing on, compiled layers keep a tenth of their activations and recompute the rest
# in their compiled backward: measured on an H100 (2026-12-07, `python3 bench/throughput.py`, the
# default recipe in one row): 20,554 tok/s at 8.18 GiB reserved, against 12,974 at 6.35 GiB with
# whole layers recomputed (None) and 23,012 at 20.7 GiB without recomputation.
RECOMPUTE_BUDGET: float | None = 0.1
# CUDA graphs capture a micro-batch shape the first time it comes: measured on an H100 (2026-12-07,
# bench/throughput.py round six, the default recipe), 14,712 tok/s at 7.16 GiB reserved against
# 11,285 at 9.76 GiB capturing at second sight (the eager first runs' activations no longer beside
# the graphs' pool). With rows, most first captures with a budget failed (a step of one row after
# steps of two compiled again, inside the capture); in one row all succeed (71 of 72 replayed).
CAPTURE_AT_FIRST_SIGHT = True
# A job's first steps train eagerly while its layers compile (worker.training.layer_compile): one
# process, packed rows (DPO jobs compile at their first step: `load_model` turns this off).
COMPILE_WHILE_TRAINING = True


def plan_speed(
    config: Any,
    micro_batch_tokens: int,
    checkpointing: bool,
    *,
    compile_layers: bool | None = None,
    drop_checkpointing: bool | None = None,
    flex: bool | None = None,
    packed: bool = True,
    plain_4bit: bool = True,
    graphs: bool | None = None,
    processes: int = 1,
    recompute_budget: float | None = RECOMPUTE_BUDGET,
    gpu: tuple[tuple[int, int], int] | None = None,
) -> SpeedPlan:
    """Decide, for this GPU and this job, what `apply_speed_plan` will do.

    `compile_layers` / `drop_checkpointing` None: decide (fast path on CUDA); True/False: force
    (the bench uses these to measure each change alone). `gpu`: (compute capability, free bytes)
    of the card to plan for (default: this process's CUDA device; tests plan a T4's without one).
    `recompute_budget`: see `SpeedPlan.recompute_budget` (None: whole layers checkpointed)."""
    plan = SpeedPlan(checkpointing=checkpointing)
    if gpu is None:
        if not torch.cuda.is_available():
            return plan
        gpu = torch.cuda.get_device_capability(), torch.cuda.mem_get_info()[0]
    if not fast_path_enabled():
        return plan
    capability, free = gpu
    plan.attention = choose_attention(capability)
    plan.fused_adamw = True
    plan.fused_loss = True
    if compile_layers is None:
        compile_layers = capability >= COMPILE_MIN_CAPABILITY or (
            capability >= PRE_AMPERE_MIN_CAPABILITY and compile_pre_ampere()
        )
    plan.compile_layers = compile_layers
    plan.plain_4bit = compile_layers and plain_4bit
    if compile_layers:  # fewer distinct shapes for the compiled layers; an eager GPU-bound T4 pads nothing
        plan.row_multiple = ROW_MULTIPLE
    if flex is None:  # the padded (unpacked) path keeps its 2D mask and sdpa
        flex = packed and plan.compile_layers and flex_attention_available(capability)
    if flex:
        plan.mask, plan.attention = "flex", "FlexAttention, document block mask"
        plan.row_multiple = FLEX_BLOCK
    # compiled layers meet one batch size (a step of one row after steps of two compiled them again,
    # mid-job); FlexAttention skips the blocks no sample sees, so one long row costs what its rows
    # did. The dense mask computes every block: one row of 4 × 2048 tokens trained slower than the
    # eager rows and reserved 16.7 GiB (as a T4 on an H100, 2026-12-07), so it keeps its rows.
    block_mask = plan.mask == "flex"
    plan.one_row = packed and plan.compile_layers and block_mask
    # CUDA graphs with the block mask only: with the dense mask (a T4 that compiles) captures failed
    # and the graphs' pool took the reserve to 14 GiB of a T4's 15 (as a T4, 2026-12-07)
    if graphs is None:  # packed rows come in a few shapes; data-parallel ranks keep DDP's hooks
        graphs = (
            compile_layers and packed and block_mask and processes == 1 and not _attention_dropout(config)
        )
    plan.graphs = graphs
    plan.compile_while_training = compile_layers and packed and processes == 1 and COMPILE_WHILE_TRAINING
    if checkpointing:
        need = activation_bytes_without_checkpointing(config, micro_batch_tokens)
        if plan.graphs:  # the graphs' pool and the eager first runs each hold a micro-batch's
            need *= 2  # activations (45 GiB reserved against 22 eager on an H200, Phi-2)
        roomy = need < 0.75 * free
        if drop_checkpointing is None:
            drop = roomy
        else:
            drop = drop_checkpointing
        if drop:
            plan.checkpointing = False
            plan.notes.append(
                f"recomputation dropped: {free / 2**30:.0f} GiB free, "
                f"activations need ~{need / 2**30:.0f} GiB"
            )
        elif plan.compile_layers and recompute_budget is not None:
            plan.recompute_budget = recompute_budget
    return plan


def for_dpo(plan: SpeedPlan) -> SpeedPlan:
    """What a DPO job's step (worker.training.dpo) keeps of the plan: its two forwards a step
    compile at the first (no eager steps beside the compile), it scores completion tokens with the
    head itself (no fused loss), its pairs' rows are its own collator's (no one row), and layers
    recomputed whole, as measured for it (docs/benchmarks.md, DPO: 6.85 GiB reserved on an H100;
    a budget is not measured there). Plan it with `graphs=False`: a DPO step is no Trainer graph."""
    plan.fused_loss = False
    plan.compile_while_training = False
    plan.one_row = False
    plan.recompute_budget = None
    if plan.mask != "flex":  # a T4's opt-in compile: whole compiled layers in fp16 with the dense
        # mask failed torch's checkpoint check (45 tensors saved, 43 recomputed): eager layers
        plan.compile_layers = plan.plain_4bit = False
        plan.row_multiple = 1
    return plan


def job_step_graphs() -> StepGraphs:
    """The CUDA graphs a job whose plan has `graphs` replays its micro-batches with."""
    return StepGraphs(capture_at_first_sight=CAPTURE_AT_FIRST_SIGHT)


FLEX_BLOCK = 128  # FlexAttention's block size: rows padded to a multiple of it


def _attention_dropout(config: Any) -> bool:
    """Dropout inside the attention kernel draws from torch's generator, which the graphs'
    recomputation can't replay (worker.training.step_graphs)."""
    return any(float(getattr(config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "attn_pdrop"))


def flex_attention_available(capability: tuple[int, int]) -> bool:
    """FlexAttention's Triton kernels, on a GPU of compute capability 8.0 or newer (a T4 keeps
    the memory-efficient sdpa kernel: see docs/gpu.md's T4 section)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:  # pragma: no cover - old torch
        return False
    return capability >= (8, 0)


def _base_model(model: torch.nn.Module) -> Any:
    """The transformers model under a PEFT wrapper, or `model` itself; used by duck typing (torch
    types a Module's other attributes as Tensor | Module)."""
    wrapper: Any = model
    return wrapper.get_base_model() if hasattr(wrapper, "get_base_model") else model


def use_flex_attention(model: torch.nn.Module) -> None:
    """Switch the model's attention to transformers' FlexAttention path (it takes a BlockMask
    as the attention mask as it is)."""
    base = _base_model(model)
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("flex_attention")
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = "flex_attention"


def use_sdpa_attention(model: torch.nn.Module) -> None:
    base = _base_model(model)
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation("sdpa")
    else:  # pragma: no cover - older transformers
        base.config._attn_implementation = "sdpa"


def document_block_mask(sequence_ids: torch.Tensor, branch_ids: torch.Tensor | None = None):
    """FlexAttention's BlockMask for packed rows: a token sees earlier tokens of its own sample
    (padding, sample number 0, sees earlier padding), and with `branch_ids` only the prompt
    (branch 0) and its own branch, as `block_causal_mask` does."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, width = sequence_ids.shape
    docs = sequence_ids

    def same_sample_causal(b, h, q, kv):
        return (docs[b, q] == docs[b, kv]) & (q >= kv)

    mask_mod = same_sample_causal
    if branch_ids is not None:
        branches = branch_ids

        def same_sample_branch_causal(b, h, q, kv):
            seen = (branches[b, kv] == 0) | (branches[b, kv] == branches[b, q])
            return same_sample_causal(b, h, q, kv) & seen

        mask_mod = same_sample_branch_causal
    return create_block_mask(mask_mod, batch, None, width, width, device=docs.device)


# the spec's optimizer names that torch's fused AdamW computes exactly (32-bit AdamW states)
SAME_AS_FUSED_ADAMW = ("paged_adamw_32bit", "adamw_torch")


def optimizer_name(spec_name: str, plan: SpeedPlan | None) -> str:
    if plan is not None and plan.fused_adamw and spec_name in SAME_AS_FUSED_ADAMW:
        return "adamw_torch_fused"
    return spec_name


BNB_NESTED = "__bnb_optimizer_quant_state__"


def bnb_adam_state_to_torch(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A bitsandbytes 32-bit Adam state dict (`state1`/`state2`, an int step) as torch AdamW's
    (`exp_avg`/`exp_avg_sq`, a tensor step); param groups keep this optimizer's own flags
    (fused, foreach, …) and take the saved hyperparameters. Anything else passes as it is."""
    states = state_dict.get("state", {})

    def moments(s: dict) -> dict:  # bitsandbytes ≥ 0.48 nests them under a private key
        return s.get(BNB_NESTED, s)

    if not any("state1" in moments(s) for s in states.values()):
        return state_dict
    converted = {}
    for key, s in states.items():
        inner = moments(s)
        if "state1" not in inner or "state2" not in inner:
            converted[key] = s
            continue
        converted[key] = {
            "step": torch.tensor(float(s["step"]), dtype=torch.float32),
            "exp_avg": inner["state1"].float(),
            "exp_avg_sq": inner["state2"].float(),
        }
    groups = []
    for saved, current in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        group = {k: v for k, v in current.items() if k != "params"}
        for key in ("lr", "betas", "eps", "weight_decay", "initial_lr"):
            if key in saved:
                group[key] = saved[key]
        group["params"] = saved["params"]
        groups.append(group)
    return {"state": converted, "param_groups": groups}


def accept_bnb_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Let a torch AdamW load a checkpoint written by bitsandbytes' (paged) 32-bit AdamW, so
    that a job paused before the switch resumes with its Adam moments."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, if any
    if not isinstance(inner, torch.optim.AdamW) or getattr(inner, "_accepts_bnb_state", False):
        return
    load = inner.load_state_dict

    def load_state_dict(state_dict):
        return load(bnb_adam_state_to_torch(state_dict, inner))

    patched: Any = inner  # this one instance's methods and attributes are replaced on purpose
    patched.load_state_dict = load_state_dict
    patched._accepts_bnb_state = True


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (transformers' GradientCheckpointingLayer subclasses)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


LayerForwards = dict[type, Any]  # a decoder layer class → the function its layers' forward runs


def compile_decoder_layers(
    model: torch.nn.Module,
    checkpointing: bool,
    backend: str = "inductor",
    dynamic: bool | None = True,
    preserve_rng_state: bool = True,
) -> int:
    """Compile every decoder layer's own forward once (one compiled function shared by all
    layers: parameters are inputs), and checkpoint each compiled layer from the outside
    (`preserve_rng_state=False` where dropout does not draw from torch's generator: CUDA graphs).
    How many layers."""
    compiled = compiled_layer_forwards(model, backend, dynamic)
    set_layer_forwards(model, compiled, checkpointing, preserve_rng_state)
    return len(decoder_layers(model))


def compiled_layer_forwards(
    model: torch.nn.Module, backend: str = "inductor", dynamic: bool | None = True
) -> LayerForwards:
    """The decoder layers' compiled forwards (compiled at their first call), and the model made
    ready for them: transformers' own checkpointing (in `__call__` in 5.17, around `forward` in
    5.24) is switched off so it never wraps compiled code (the caller must also pass
    `gradient_checkpointing=False` to the Trainer: it would switch it back on), and no KV cache."""
    layers = decoder_layers(model)
    if not layers:
        return {}
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # A layer's floats (norm eps, dropout p, LoRA scaling) never change: traced as symbols (what
    # dynamic=True does by default), one fails to become a tensor and dynamo traces the whole
    # layer a second time, at every job's first step (~2 s of ~4 on a warm cache, on a CPU)
    torch._dynamo.config.specialize_float = True
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 512
        )
    base = _base_model(model)
    if getattr(base, "is_gradient_checkpointing", False):
        base.gradient_checkpointing_disable()
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if hasattr(config, "use_cache"):
            config.use_cache = False  # no KV cache updates inside compiled code
    return {
        cls: torch.compile(inspect.unwrap(cls.forward), backend=backend, dynamic=dynamic)
        for cls in {type(layer) for layer in layers}
    }


def eager_layer_forwards(model: torch.nn.Module) -> LayerForwards:
    return {cls: inspect.unwrap(cls.forward) for cls in {type(layer) for layer in decoder_layers(model)}}


def set_layer_forwards(
    model: torch.nn.Module, forwards: LayerForwards, checkpointing: bool, preserve_rng_state: bool
) -> None:
    """Every decoder layer runs `forwards[its class]` (compiled or the class's own), checkpointed
    from outside when `checkpointing` (see `compile_decoder_layers`)."""
    for layer in decoder_layers(model):
        mark_layer_dropouts(layer)
        wrapped = checkpointed_layer_forward(forwards[type(layer)], checkpointing, preserve_rng_state)
        layer.forward = MethodType(wrapped, layer)


def restore_decoder_layers(model: torch.nn.Module) -> None:
    """Undo `compile_decoder_layers` (the class's own forward again); the bench measures
    variants one after another on one loaded model."""
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)
        layer.__dict__.pop("counter_dropouts", None)


def checkpointed_layer_forward(compiled_forward, checkpointing: bool, preserve_rng_state: bool):
    from torch.utils.checkpoint import checkpoint

    def run(self, *args, **kwargs):  # the forward, and its recomputation, drop the same elements
        reset_dropout_calls(self)
        return compiled_forward(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        kwargs.pop("past_key_values", None)
        kwargs.pop("use_cache", None)
        if checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                run, self, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, **kwargs
            )
        return run(self, *args, **kwargs)

    return forward


def apply_speed_plan(model: torch.nn.Module, plan: SpeedPlan) -> LayerCompile | None:
    """Applies the plan; with `compile_while_training`, the `LayerCompile` the trainer switches with."""
    if plan.fused_loss:
        refusal = fused_loss_refusal(model)
        if refusal is None:
            use_fused_loss(model)
        else:
            plan.fused_loss = False
            plan.notes.append(f"loss not fused ({refusal})")
    if plan.plain_4bit:
        use_plain_4bit_matmul(model)
    if plan.mask == "flex":
        use_flex_attention(model)
    if plan.graphs:
        use_counter_dropout(model)
    if plan.compile_layers:
        import torch._dynamo
        import torch._functorch.config

        # read when a layer's forward and backward are split, at its first compile; dynamo's guards
        # don't check it, so layers compiled under another budget (an earlier job of this worker
        # process) are dropped first
        budget = plan.recompute_budget if plan.checkpointing and plan.recompute_budget is not None else 1.0
        if torch._functorch.config.activation_memory_budget != budget:
            torch._dynamo.reset()
            torch._functorch.config.activation_memory_budget = budget
        if plan.compile_while_training:
            from worker.training.layer_compile import LayerCompile

            return LayerCompile(model, plan, compiled_layer_forwards(model))
        compile_decoder_layers(model, plan.whole_layers_recomputed, preserve_rng_state=not plan.graphs)
    elif not plan.checkpointing:
        base = _base_model(model)
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
    return None
