"""How much GPU memory a job spec needs, from its base's config.json alone (no torch, no weights):
the pre-flight check (`app.services.preflight`) compares it with the registered workers' GPUs
before a job is queued, and `finetune doctor SPEC` prints it.

The peak is that of the worker's step at its largest micro-batch (`batch_size` rows of
`max_seq_length` tokens), on the path a T4 takes (eager layers, a dense packed mask); bigger
cards take a faster path only where their free memory allows it. Parts:

- the base's decoder linear layers in 4-bit NF4, and everything else (embeddings, output head,
  norms, biases) in float32: `prepare_model_for_kbit_training` upcasts them;
- LoRA's weights, gradients and AdamW's two moments, all float32;
- activations: with gradient checkpointing each decoder layer keeps its float32 input and one
  layer at a time is recomputed; without, every layer keeps what its backward needs;
- the float32 logits over the vocabulary and the loss's copies of them, alive at once;
- the dense attention mask of packed rows.

A DPO job (`method.type: dpo`) packs a step's pairs, both sides, into micro-batches of the same
size, so the parts above hold, except that it scores only completion tokens, a chunk of logits at
a time (worker.training.dpo: no vocabulary-wide logits). Beside that it runs a forward of the
reference without gradients over each micro-batch, which holds about one decoder layer's
activations and the last hidden states it returns. That forward runs before the policy's; it is
counted beyond the policy's own transient (the log-probs or a layer's recomputation), as if the
kept activations were still there: an upper bound by little more than its hidden states. A job
whose reference is the adapter it continues from (`init_from`) also holds that adapter, frozen.

The per-layer activation coefficients were fitted to peaks measured on a GPU
(`bench/memory_peaks.py`, docs/gpu.md gives the comparison). What a process needs beyond its
peak allocation: the allocator's fragmentation and the CUDA context.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.architectures import ATTENTION_PROJECTIONS, ModelShape, auto_target_modules
from app.spec import JobSpec

GIB = 2**30
# NF4 stores half a byte per weight plus one absmax per 64 weights (a byte with double
# quantization, and a float per 256 blocks on top).
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
FLOAT32 = 4
# LoRA's float32 weight, its gradient and AdamW's two moments.
LORA_BYTES_PER_PARAMETER = 4 * FLOAT32
# Bytes one decoder layer keeps for its backward, per token: per unit of the hidden size and per
# unit of the MLP's width. Fitted to the runs without checkpointing in
# bench/results/memory-peaks-h200.json (Phi-2's GELU MLP and a Llama's gated one).
LAYER_BYTES_PER_HIDDEN = 8.0
LAYER_BYTES_PER_INTERMEDIATE = 20.0
# The logits, their log-softmax and its gradient, all float32, alive together in the backward.
LOSS_COPIES_OF_LOGITS = 3
# A DPO job's log-probabilities: float32 logits for this many bytes of completion tokens at a time
# (worker.training.fused_loss.CHUNK_BYTES), with the loss's copies of them.
LOG_PROB_CHUNK_BYTES = 256 * 2**20
# Beyond the peak allocation: the caching allocator's fragmentation (measured: reserved was
# 1.03-1.33× the peak allocation, highest with checkpointing), and the CUDA context with the
# kernels' libraries (0.735 GiB measured on an H200, outside PyTorch's allocator).
FRAGMENTATION = 0.25
CUDA_CONTEXT_BYTES = int(0.75 * GIB)


@dataclass(frozen=True)
class MemoryEstimate:
    rows: int
    tokens: int  # in the largest micro-batch
    parts: dict[str, int]  # bytes, by what they hold
    peak_bytes: int  # what PyTorch's allocator holds at the step's peak
    needs_bytes: int  # the GPU memory the job needs: the peak, fragmentation and the CUDA context

    def describe(self) -> str:
        return (
            f"~{self.needs_bytes / GIB:.1f} GiB of GPU memory at its largest micro-batch "
            f"({self.rows} × {self.tokens // self.rows} tokens)"
        )


def lora_modules(spec: JobSpec, shape: ModelShape) -> list[str]:
    """The decoder layers' linear layers LoRA adapts, as the worker will resolve them."""
    wanted = spec.lora.target_modules
    dims = shape.linear_dims()
    if wanted == "all-linear":
        return list(dims)
    if wanted == "auto":
        return auto_target_modules(shape.model_type) or ATTENTION_PROJECTIONS
    return list(wanted)


def lora_parameters(spec: JobSpec, shape: ModelShape) -> int:
    dims = shape.linear_dims()
    per_layer = 0
    for name in lora_modules(spec, shape):
        fan_in, fan_out = dims.get(name, (shape.hidden, shape.hidden))
        per_layer += spec.lora.r * (fan_in + fan_out)
    return shape.layers * per_layer


def layer_activation_bytes(shape: ModelShape, tokens: int) -> int:
    """What one decoder layer keeps for its backward."""
    per_token = (
        LAYER_BYTES_PER_HIDDEN * shape.hidden
        + LAYER_BYTES_PER_INTERMEDIATE * shape.intermediate * shape.experts_per_token
    )
    return int(tokens * per_token)


def chunked_log_prob_bytes(shape: ModelShape, tokens: int) -> int:
    """A DPO micro-batch's completion log-probs: the completion tokens' hidden states (at most
    every token's), and one chunk of their float32 logits with the loss's copies."""
    chunk = min(tokens, max(1, LOG_PROB_CHUNK_BYTES // (shape.vocab * FLOAT32)))
    return tokens * shape.hidden * FLOAT32 + LOSS_COPIES_OF_LOGITS * chunk * shape.vocab * FLOAT32


def estimate(spec: JobSpec, shape: ModelShape) -> MemoryEstimate:
    training = spec.training
    rows, length = training.batch_size, training.max_seq_length
    tokens = rows * length
    layer = layer_activation_bytes(shape, tokens)
    dpo = spec.dpo
    if dpo is None:
        loss_name = "logits and loss, or one layer's recomputation"
        loss = LOSS_COPIES_OF_LOGITS * tokens * shape.vocab * FLOAT32
    else:
        loss_name = "completion log-probs a chunk at a time, or one layer's recomputation"
        loss = chunked_log_prob_bytes(shape, tokens)
    if training.gradient_checkpointing:
        # every layer's input is kept; the loss's peak comes before any layer is recomputed
        kept = shape.layers * tokens * shape.hidden * FLOAT32
        activations, transient = kept, max(loss, layer)
    else:
        activations, transient = shape.layers * layer, loss
    lora = lora_parameters(spec, shape)
    parts = {
        "4-bit weights": int(shape.quantized_weights() * NF4_BYTES_PER_WEIGHT),
        "float32 embeddings, head, norms and biases": shape.other_weights() * FLOAT32,
        "LoRA weights, gradients and optimizer state": lora * LORA_BYTES_PER_PARAMETER,
        "activations kept for the backward": activations,
        loss_name: transient,
        "packed attention mask": rows * length * length * FLOAT32 if training.packing else 0,
    }
    if dpo is not None:
        reference_forward = layer + tokens * shape.hidden * FLOAT32
        parts["DPO reference forward without gradients (one layer and its hidden states)"] = max(
            0, reference_forward - transient
        )
        if dpo.reference == "init" or (dpo.reference == "auto" and spec.init_from is not None):
            parts["DPO reference: the frozen adapter init_from names"] = lora * FLOAT32
    peak = sum(parts.values())
    return MemoryEstimate(
        rows=rows,
        tokens=tokens,
        parts=parts,
        peak_bytes=peak,
        needs_bytes=int(peak * (1 + FRAGMENTATION)) + CUDA_CONTEXT_BYTES,
    )
