"""What a base model's `config.json` says about its shape, read without torch: the sizes the
API's memory estimate needs (`app.memory_estimate`) and the rule for `lora.target_modules:
auto`, which the worker applies to the loaded model (`worker.training.model.target_modules`).

Field names differ between architectures (`hidden_size` / `n_embd` / `d_model`, …); `shape`
reads the common spellings, and a multimodal config's text part (`text_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# `lora.target_modules: auto`, by the base's `model_type`: the seed recipe's modules for Phi; the
# attention projections for the Llama family. Other architectures: peft's own default for them,
# else every linear layer (the worker's rule; the estimate assumes the attention projections).
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]
AUTO_TARGET_MODULES: dict[str, list[str]] = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    **{
        kind: ATTENTION_PROJECTIONS
        for kind in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
        )
    },
}

# Architectures whose MLP is two matrices (up, down); the others gate it (gate, up, down).
PLAIN_MLP = {"phi", "gpt2", "gpt_neox", "gptj", "gpt_bigcode", "falcon", "opt", "bloom", "starcoder2"}
PLAIN_MLP_NAMES = {"phi": ("fc1", "fc2"), "gpt_neox": ("dense_h_to_4h", "dense_4h_to_h")}


class UnreadableConfig(ValueError):
    """A config.json that lacks a size the estimate needs."""


def _first(config: dict[str, Any], *names: str) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return None


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool
    # Mixture of experts: experts per layer, and how many each token goes through.
    experts: int = 1
    experts_per_token: int = 1

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by the names LoRA targets them by."""
        h, i, a, kv = self.hidden, self.intermediate, self.attention_width, self.kv_width
        output = "dense" if self.model_type == "phi" else "o_proj"
        dims = {"q_proj": (h, a), "k_proj": (h, kv), "v_proj": (h, kv), output: (a, h)}
        up, down = PLAIN_MLP_NAMES.get(self.model_type, ("up_proj", "down_proj"))
        dims |= {up: (h, i), down: (i, h)}
        if self.gated_mlp:
            dims["gate_proj"] = (h, i)
        return dims

    def quantized_weights(self) -> int:
        """Weights of the decoder layers' linear layers: what bitsandbytes stores in 4 bits."""
        h, i = self.hidden, self.intermediate
        attention = 2 * h * self.attention_width + 2 * h * self.kv_width
        mlp = (3 if self.gated_mlp else 2) * h * i * self.experts
        return self.layers * (attention + mlp)

    def other_weights(self) -> int:
        """Embeddings, the output head, norms and biases: kept unquantized."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms_and_biases = self.layers * (6 * self.hidden + self.intermediate)
        return embeddings + norms_and_biases


def shape(config: dict[str, Any]) -> ModelShape:
    """The sizes in a transformers config.json; UnreadableConfig naming what is missing."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    if text is not None:
        config = {**text, "model_type": text.get("model_type", config.get("model_type"))}
    model_type = str(config.get("model_type") or "")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    vocab = config.get("vocab_size")
    missing = [
        name
        for name, value in (
            ("hidden_size", hidden),
            ("num_hidden_layers", layers),
            ("num_attention_heads", heads),
            ("vocab_size", vocab),
        )
        if not isinstance(value, int) or value <= 0
    ]
    if missing:
        raise UnreadableConfig(f"config.json has no {', '.join(missing)}")
    assert isinstance(hidden, int) and isinstance(heads, int)
    intermediate = _first(config, "moe_intermediate_size", "intermediate_size", "n_inner", "ffn_dim")
    experts = _first(config, "num_local_experts", "num_experts") or 1
    return ModelShape(
        model_type=model_type,
        hidden=hidden,
        intermediate=int(intermediate or 4 * hidden),
        layers=int(layers),  # type: ignore[arg-type]
        heads=heads,
        kv_heads=int(_first(config, "num_key_value_heads", "n_head_kv") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab=int(vocab),  # type: ignore[arg-type]
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        gated_mlp=model_type not in PLAIN_MLP,
        experts=int(experts),
        experts_per_token=int(_first(config, "num_experts_per_tok", "top_k") or 1) if experts > 1 else 1,
    )


def auto_target_modules(model_type: str) -> list[str] | None:
    """What `auto` means for this architecture; None where the worker asks peft (or takes every
    linear layer)."""
    return AUTO_TARGET_MODULES.get(model_type)
