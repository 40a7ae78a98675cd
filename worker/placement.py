"""Where the sampler answers: on the GPU when the GPU has room for the model beside what already
runs there (a training, on a shared 16 GB T4), on the CPU otherwise.

The room is the GPU's free memory, within `FINETUNE_GPU_MEMORY_GIB` where that caps what the
service's processes may use together. The need is estimated from the base's config alone (a model
built on the meta device, no weights): linear layers in 4-bit, the rest in the compute dtype,
the KV cache of the prompt and the answer, and headroom for one forward's activations.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from app.memory_estimate import NF4_BYTES_PER_WEIGHT
from app.settings import get_settings
from app.spec import split_revision
from worker.training.hub import fetching

log = logging.getLogger(__name__)

GIB = 1024**3
# One forward's activations beside the weights and the cache, plus the allocator's slack:
# measured for Phi-2 on a 2,000-token prompt, the sampler peaked 0.6 GiB above weights + cache.
HEADROOM_BYTES = int(0.75 * GIB)


def model_config(base_model: str):
    name, revision = split_revision(base_model)
    with fetching("config", base_model):
        return AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=get_settings().trust_remote_code
        )


def weight_bytes(config, dtype: torch.dtype) -> int:
    """The 4-bit model's weights: every linear layer but the output head in NF4 (what
    bitsandbytes quantizes), the rest (embeddings, head, norms, biases) in `dtype`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=get_settings().trust_remote_code)
    head = model.get_output_embeddings()
    quantized = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )
    total = sum(parameter.numel() for parameter in model.parameters())
    element = torch.finfo(dtype).bits // 8
    return int(quantized * NF4_BYTES_PER_WEIGHT + (total - quantized) * element)


def kv_cache_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * tokens * kv_heads * head_dim * (torch.finfo(dtype).bits // 8)


def needed_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    return weight_bytes(config, dtype) + kv_cache_bytes(config, tokens, dtype) + HEADROOM_BYTES


def gpu_room_bytes() -> int:
    """What this process could still take on the GPU: the device's free memory, plus what this
    process's allocator holds (it is this process's to reuse), within FINETUNE_GPU_MEMORY_GIB."""
    free, total = torch.cuda.mem_get_info()
    own = torch.cuda.memory_reserved()
    cap = get_settings().gpu_memory_gib
    limit = min(total, int(cap * GIB)) if cap else total
    used_by_others = total - free - own
    return max(0, min(free + own, limit - used_by_others))


def answer_device(base_model: str, tokens: int, dtype: torch.dtype) -> str:
    """ "cuda" or "cpu" for one answer of `tokens` (prompt and new tokens), as FINETUNE_SAMPLER_DEVICE
    says; "auto" takes the GPU only when the model fits beside what is running there."""
    setting = get_settings().sampler_device
    if setting == "cpu" or not torch.cuda.is_available():
        return "cpu"
    if setting == "cuda":
        return "cuda"
    need, room = needed_bytes(model_config(base_model), tokens, dtype), gpu_room_bytes()
    if need <= room:
        return "cuda"
    log.info(
        "answering on the CPU: the model needs ~%.1f GiB on the GPU, %.1f GiB is free there",
        need / GIB,
        room / GIB,
    )
    return "cpu"
