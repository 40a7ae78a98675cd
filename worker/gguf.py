"""A merged model folder written as one GGUF file (llama.cpp, Ollama, LM Studio), with
llama.cpp's own `gguf` package: its writer, its names for each architecture's tensors and its
readers of Hugging Face vocabularies. What is ours is the little each architecture needs on top,
as llama.cpp's convert_hf_to_gguf.py does it (that script is not on the package registries):
the hyperparameters it reads and, for Llama, the order of the query and key rows.

Architectures: Phi-2 (`phi`, the recipe's base) and Llama (`llama`, and the many models shaped
like it). Tensors keep the merged model's dtype (float32, float16 or bfloat16); norms and biases
are float32, as llama.cpp expects; quantize afterwards with llama.cpp's `llama-quantize`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

FILE_TYPES = {
    torch.float32: gguf.LlamaFileType.ALL_F32,
    torch.float16: gguf.LlamaFileType.MOSTLY_F16,
    torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16,
}


def write_gguf(model_dir: Path, target: Path) -> None:
    """Write the model in `model_dir` (a transformers folder: config, safetensors, tokenizer)
    as the GGUF file `target`."""
    config = json.loads((model_dir / "config.json").read_text())
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {kind!r}")
    arch, describe, vocabulary, reorder = ARCHITECTURES[kind]
    tensors = dict(_tensors(model_dir))
    dtype = next(t.dtype for name, t in tensors.items() if name.endswith("embed_tokens.weight"))
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_file_type(FILE_TYPES[dtype])
    describe(writer, config)
    vocabulary(writer, model_dir, config)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"no GGUF name for tensor {name!r} of a {kind} model")
        _add(writer, mapped, reorder(name, tensor, config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope(config: dict, key: str, default: float) -> float:
    """A rotary setting: top-level in configs saved by transformers 4, under `rope_parameters`
    in those saved by transformers 5."""
    return float(config.get(key) or (config.get("rope_parameters") or {}).get(key) or default)


def _tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _add(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() <= 1 or tensor.dtype == torch.float32:  # norms and biases: float32
        writer.add_tensor(name, tensor.float().numpy())
    elif tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, marked as such
        bits = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        writer.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, tensor.numpy())


# --- Phi-2 ------------------------------------------------------------------------------------


def _describe_phi(writer: gguf.GGUFWriter, config: dict) -> None:
    heads, width = config["num_attention_heads"], config["hidden_size"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_rope_dimension_count(int(_rope(config, "partial_rotary_factor", 1.0) * width) // heads)
    writer.add_rope_freq_base(_rope(config, "rope_theta", 10000.0))
    writer.add_add_bos_token(False)


def _gpt2_vocabulary(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> None:
    """A byte-level BPE vocabulary, padded to the model's embedding rows as llama.cpp pads it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for index in range(config["vocab_size"]):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = tokenizer.added_tokens_decoder[index].special
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("phi-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer)


# --- Llama ------------------------------------------------------------------------------------


def _describe_llama(writer: gguf.GGUFWriter, config: dict) -> None:
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(_rope(config, "rope_theta", 10000.0))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])


def _llama_vocabulary(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> None:
    """A SentencePiece-style vocabulary read from tokenizer.json (byte fallback, scores)."""
    vocab = gguf.LlamaHfVocab(model_dir)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)


def _llama_rows(name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """llama.cpp applies rotary embeddings to interleaved pairs, Hugging Face to the two halves
    of each head: query and key rows are reordered to match (convert_hf_to_gguf's `permute`)."""
    heads = config["num_attention_heads"]
    if name.endswith("self_attn.k_proj.weight"):
        heads = config.get("num_key_value_heads") or heads
    elif not name.endswith("self_attn.q_proj.weight"):
        return tensor
    pairs = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:])
    return pairs.swapaxes(1, 2).reshape(tensor.shape)


def _as_is(name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    return tensor


Describe = Callable[[gguf.GGUFWriter, dict], None]
Vocabulary = Callable[[gguf.GGUFWriter, Path, dict], None]
Reorder = Callable[[str, torch.Tensor, dict], torch.Tensor]

# model_type → (GGUF architecture, hyperparameters, vocabulary, tensor reordering)
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, Describe, Vocabulary, Reorder]] = {
    "phi": (gguf.MODEL_ARCH.PHI2, _describe_phi, _gpt2_vocabulary, _as_is),
    "llama": (gguf.MODEL_ARCH.LLAMA, _describe_llama, _llama_vocabulary, _llama_rows),
}
