"""A merged model folder written as one GGUF file (llama.cpp, Ollama, LM Studio), with
llama.cpp's own `gguf` package: its writer, its names for each architecture's tensors and its
readers of Hugging Face vocabularies. What is ours is the little each architecture needs on top,
as llama.cpp's convert_hf_to_gguf.py does it (that script is not on the package registries):
the hyperparameters it reads, the vocabulary as it writes it (for Llama, SentencePiece's own
scores and token types) and, for Llama, the order of the query and key rows.

Architectures: Phi-2 (`phi`, the recipe's base) and Llama (`llama`, and the many models shaped
like it). Tensors keep the merged model's dtype (float32, float16 or bfloat16); norms and biases
are float32, as llama.cpp expects; quantize afterwards with llama.cpp's `llama-quantize`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

log = logging.getLogger(__name__)

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
    """A byte-level BPE vocabulary as convert_hf_to_gguf's `_set_vocab_gpt2` writes it: padded to
    the model's embedding rows, added tokens CONTROL when special (or shaped like `<|...|>`), else
    USER_DEFINED, and the pre-tokenizer `phi-2` (the one whose tokens of llama.cpp's check text
    Phi-2's tokenizer gives; tests/test_gguf.py checks the hash)."""
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
            entry = tokenizer.added_tokens_decoder[index]
            if not entry.normalized:  # llama.cpp expects added tokens as the normalizer leaves them
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if entry.special or _looks_special(token):
                tokens.append(token)
                types.append(gguf.TokenType.CONTROL)
            else:
                tokens.append(token.replace("\u2581", " "))
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("phi-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer)


def _looks_special(token: str) -> bool:
    """Added tokens some models leave unmarked that llama.cpp's converter makes CONTROL all the same
    (`does_token_look_special`)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


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
    """A SentencePiece vocabulary as convert_hf_to_gguf's `_set_vocab_sentencepiece` writes it,
    from tokenizer.model: llama.cpp's tokenizer merges pieces by these scores, so without them it
    splits words the model never saw split (issue 28). A folder with only tokenizer.json gets
    what that script then writes (`LlamaHfVocab`: every score -1000), with a warning."""
    sentencepiece_model = model_dir / "tokenizer.model"
    if sentencepiece_model.is_file():
        tokens, scores, types = _sentencepiece_vocabulary(sentencepiece_model, model_dir, config)
    else:
        log.warning(
            "%s has no tokenizer.model: its GGUF's token scores are all -1000, and llama.cpp will "
            "split some words differently from the model's own tokenizer",
            model_dir,
        )
        tokens, scores, types = (
            list(column) for column in zip(*gguf.LlamaHfVocab(model_dir).all_tokens(), strict=True)
        )
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():
        prefix = json.loads(tokenizer_config.read_text()).get("add_prefix_space")
        if prefix is not None:
            writer.add_add_space_prefix(prefix)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer)


def _sentencepiece_vocabulary(
    path: Path, model_dir: Path, config: dict
) -> tuple[list[str], list[float], list[int]]:
    """Each piece with its score and kind, rows the model has beyond them `[PAD<i>]`, and the
    tokens added on top (tokenizer.json, or an older save's tokenizer_config.json) as llama.cpp
    reads them: score -1000, CONTROL when special, else USER_DEFINED. An added token that is the
    piece already at its id (`<s>`, `</s>`, `<unk>` in transformers' saves) keeps the piece's."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(path))
    size = config.get("vocab_size") or processor.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    for i in range(min(size, processor.vocab_size())):
        tokens[i] = processor.id_to_piece(i)
        scores[i] = processor.get_score(i)
        types[i] = int(_piece_type(processor, i))
    for i, (token, special) in _added_tokens(model_dir).items():
        if i >= size or (i < processor.vocab_size() and token == tokens[i]):
            continue
        if special or _looks_special(token):
            tokens[i], types[i] = token, int(gguf.TokenType.CONTROL)
        else:  # written pre-normalized, as the converter writes them
            tokens[i], types[i] = token.replace("\u2581", " "), int(gguf.TokenType.USER_DEFINED)
        scores[i] = -1000.0
    return tokens, scores, types


def _piece_type(processor, i: int) -> gguf.TokenType:
    if processor.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(i):
        return gguf.TokenType.CONTROL
    if processor.is_unused(i):
        return gguf.TokenType.UNUSED
    if processor.is_byte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id → (text, special) for each token added to the tokenizer."""
    added: dict[int, tuple[str, bool]] = {}
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        for i, entry in json.loads(config.read_text()).get("added_tokens_decoder", {}).items():
            added[int(i)] = entry["content"], bool(entry.get("special"))
    fast = model_dir / "tokenizer.json"
    if fast.is_file():
        for entry in json.loads(fast.read_text()).get("added_tokens", []):
            added[entry["id"]] = entry["content"], bool(entry.get("special"))
    return added


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
