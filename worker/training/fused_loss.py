"""The causal-LM loss computed a chunk of tokens at a time, without the vocabulary-wide logits.

transformers computes a causal LM's loss from the whole logits tensor: `lm_head` writes
tokens × vocabulary logits (51,200 columns for Phi-2), the loss upcasts them to float32, and
cross-entropy keeps its float32 log-softmax for the backward: three copies of ~0.2 GiB per
1,000 tokens, which a micro-batch of 8,000 tokens turns into gigabytes, held until the backward
(and, with CUDA graphs, held twice: once by the eager first runs, once by the graphs' pool).

`linear_cross_entropy` does what Liger's fused linear cross-entropy does, in plain torch:
for a chunk of tokens at a time it computes the logits (in the autocast dtype, as `lm_head`
would), their float32 log-sum-exp, the loss, and at once the loss's gradient with respect to
the chunk's hidden states, then drops the logits. The backward only scales that stored
gradient. Liger itself isn't used: it reads the count of trained tokens with `.item()`, which a
CUDA graph capture forbids (worker.training.step_graphs), and it has no CPU path to test.

The result is the loss transformers computes (`ForCausalLMLoss`: labels shifted by one, -100
ignored, summed and divided by `num_items_in_batch`, or the mean without it) and the same
gradients, within rounding (tests/test_fused_loss.py). `use_fused_loss` wires it into a model
whose forward is `logits = lm_head(hidden); loss = loss_function(logits, labels, ...)`: its
`lm_head` returns the hidden states unchanged, and its `loss_function` applies the head. The
model's outputs then carry hidden states where logits would be, so it is for training and
evaluation loss only (the Trainer reads nothing else; sampling loads the model anew).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from worker.training.data import IGNORE_INDEX

# float32 logits per chunk: ~256 MiB (1,280 tokens of Phi-2's vocabulary)
CHUNK_BYTES = 256 * 2**20
# model types whose causal-LM forward feeds lm_head's output straight to loss_function, with no
# soft-capping or scaling in between (read in transformers 5.24's modeling files; Gemma 2 and 3
# soft-cap their logits)
FUSABLE_MODEL_TYPES = frozenset(
    {"phi", "phi3", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma"}
)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int):
        """The summed cross-entropy of `targets` (IGNORE_INDEX: no loss) under the logits
        `hidden @ weight.T + bias`, float32; the gradients (hidden states', and the bias's where
        it trains) are computed here."""
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h = hidden.to(dtype)
            # fp16: the probabilities' gradient is scaled up by a power of two (exact) before it
            # is cast, so that small ones don't flush to zero; undone in the backward
            scale = 1024.0 if dtype == torch.float16 else 1.0
            grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, h.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, h.shape[0])
                logits = F.linear(h[start:end], w, b).float()
                target = targets[start:end]
                kept = (target != IGNORE_INDEX).unsqueeze(1)
                index = target.clamp(min=0).unsqueeze(1)
                lse = torch.logsumexp(logits, dim=1, keepdim=True)
                total += ((lse - logits.gather(1, index)) * kept).sum()
                if grad is None and grad_bias is None:
                    continue
                # d(loss)/d(logits) = softmax - one-hot, on kept tokens only
                probabilities = logits.sub_(lse).exp_()
                probabilities.scatter_add_(1, index, -torch.ones_like(lse))
                probabilities.mul_(kept)
                if grad_bias is not None:
                    grad_bias += probabilities.sum(0)
                if grad is not None:
                    grad[start:end] = probabilities.mul_(scale).to(dtype) @ w
        ctx.scale = scale
        ctx.dtypes = hidden.dtype, bias.dtype if bias is not None else None
        ctx.save_for_backward(grad, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad, grad_bias = ctx.saved_tensors
        hidden_dtype, bias_dtype = ctx.dtypes
        grad_hidden = None if grad is None else (grad.float() * (grad_output / ctx.scale)).to(hidden_dtype)
        grad_bias = None if grad_bias is None else (grad_bias * grad_output).to(bias_dtype)
        return grad_hidden, None, grad_bias, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What `lm_head` would compute in: autocast's dtype where autocast is on, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(hidden @ weight.T + bias, labels, ...)`, chunk by chunk."""
    if weight.requires_grad:
        raise ValueError("the fused loss trains no output head's weight: it must be frozen")
    if shift_labels is None:  # tokens < n predict n
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    if ignore_index != IGNORE_INDEX:
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    total = _LinearCrossEntropy.apply(flat, weight, bias, targets, chunk_tokens)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _HiddenStatesHead(torch.nn.Linear):
    """An `lm_head` (class switched in place, same parameters) that hands its input on: the
    fused loss applies it."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


class _FusedLoss:
    """The model's `loss_function` while the fused loss is on (reads the head it replaced)."""

    def __init__(self, head: torch.nn.Linear):
        self.head = head

    def __call__(self, logits, labels, vocab_size: int | None = None, **kwargs: Any) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k in _LOSS_KWARGS}
        return linear_cross_entropy(logits, self.head.weight, self.head.bias, labels, **kwargs)


def _causal_lm(model: torch.nn.Module) -> Any:
    """The transformers model that owns `lm_head` (under peft's and DDP's wrappers)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and hasattr(module, "lm_head"):
            return module
    return None


def fused_loss_refusal(model: torch.nn.Module) -> str | None:
    """Why the fused loss can't stand in for this model's (None: it can)."""
    causal_lm = _causal_lm(model)
    if causal_lm is None:
        return "no lm_head"
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type not in FUSABLE_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose logits go straight to the loss"
    head = causal_lm.lm_head
    if type(head) not in (torch.nn.Linear, _HiddenStatesHead):
        return f"lm_head is a {type(head).__name__} (an adapter on it?)"
    if head.weight.requires_grad:
        return "lm_head's weight is trained"
    return None


def use_fused_loss(model: torch.nn.Module) -> bool:
    """Compute the model's training loss with `linear_cross_entropy` (False, and nothing
    changed, where `fused_loss_refusal` says it can't)."""
    if fused_loss_refusal(model) is not None:
        return False
    causal_lm = _causal_lm(model)
    head = causal_lm.lm_head
    head.__class__ = _HiddenStatesHead
    causal_lm.loss_function = _FusedLoss(head)
    return True


def use_hidden_states_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """Make the model's forward return its last hidden states where the logits would be, and
    return the head that would have made them (for `linear_log_probs`); None, and nothing
    changed, where `fused_loss_refusal` says the head can't be taken out of the forward."""
    if fused_loss_refusal(model) is not None:
        return None
    head = _causal_lm(model).lm_head
    head.__class__ = _HiddenStatesHead
    return head


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int):
        """float32 log-probabilities of `targets` under the logits `hidden @ weight.T + bias`, a
        chunk of tokens at a time; only each token's log-sum-exp is kept for the backward."""
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            h = hidden.to(dtype)
            out = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty(h.shape[0], 1, dtype=torch.float32, device=hidden.device)
            index = targets.unsqueeze(1)
            for start in range(0, h.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, h.shape[0])
                logits = F.linear(h[start:end], w, b).float()
                lse[start:end] = torch.logsumexp(logits, dim=1, keepdim=True)
                out[start:end] = (logits.gather(1, index[start:end]) - lse[start:end]).squeeze(1)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        """The logits are computed again, a chunk at a time: d(log p_target)/d(logits) is
        one-hot − softmax, scaled by each token's incoming gradient."""
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk_tokens = ctx.dtype, ctx.chunk_tokens
        want_hidden, _, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            index = targets.unsqueeze(1)
            for start in range(0, hidden.shape[0], chunk_tokens):
                end = min(start + chunk_tokens, hidden.shape[0])
                logits = F.linear(hidden[start:end].to(dtype), w, b).float()
                scale = grad_output[start:end].float().unsqueeze(1)
                grad_logits = logits.sub_(lse[start:end]).exp_().mul_(-scale)
                grad_logits.scatter_add_(1, index[start:end], scale)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
                if grad_hidden is not None:
                    grad_hidden[start:end] = (grad_logits.to(dtype) @ w).to(hidden.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, None, grad_bias, None, None


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """`log_softmax(hidden @ weight.T + bias)[i, targets[i]]` for each row of `hidden` (tokens ×
    hidden size), in float32, without the vocabulary-wide logits of more than a chunk of tokens;
    differentiable with respect to the hidden states (and the bias where it trains)."""
    if weight.requires_grad:
        raise ValueError("the fused log-probabilities train no output head's weight: it must be frozen")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearLogProbs.apply(hidden, weight, bias, targets, chunk_tokens)


def use_model_loss(model: torch.nn.Module) -> None:
    """Undo `use_fused_loss` (the bench measures variants on one loaded model)."""
    causal_lm = _causal_lm(model)
    if causal_lm is None or type(causal_lm.lm_head) is not _HiddenStatesHead:
        return
    causal_lm.lm_head.__class__ = torch.nn.Linear
    causal_lm.__dict__.pop("_loss_function", None)
