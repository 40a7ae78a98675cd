"""The GGUF export's writer (issue 16): a Llama written by it is read back by transformers' own
GGUF loader (an independent implementation of llama.cpp's conventions) with the same tokens and
logits; a Phi-2 keeps every tensor, the vocabulary and the hyperparameters llama.cpp reads."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO
from worker.gguf import write_gguf

pytestmark = pytest.mark.slow


def test_a_llama_written_as_gguf_loads_back_with_the_same_tokens_and_logits(tmp_path):
    """stories260K: grouped-query attention (8 query, 4 key/value heads), so the reordering of
    query and key rows for llama.cpp's rotary layout is checked on both."""
    model_dir = tmp_path / "stories260K"
    shutil.copytree(REPO / "examples" / "stories260K", model_dir)
    write_gguf(model_dir, tmp_path / "stories.gguf")

    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="stories.gguf").eval()
    text = "Once upon a time, there was a little girl named Lily."
    inputs = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="stories.gguf")(text, return_tensors="pt")
    assert from_gguf["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, original(**inputs).logits)


def test_phi2_keeps_every_tensor_its_vocabulary_and_hyperparameters(tmp_path):
    model_dir = tmp_path / "tiny-phi2"
    shutil.copytree(REPO / "examples" / "tiny-phi2", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    write_gguf(model_dir, tmp_path / "phi.gguf")

    reader = gguf.GGUFReader(tmp_path / "phi.gguf")

    def field(name: str):
        value = reader.fields[name]
        return value.contents()

    assert field("general.architecture") == "phi2"
    assert (field("phi2.block_count"), field("phi2.embedding_length")) == (2, 128)
    assert field("phi2.rope.dimension_count") == int(0.4 * 128) // 4  # partial rotary, per head
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "phi-2")
    tokens = field("tokenizer.ggml.tokens")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokens) == config["vocab_size"] and tokens[50256] == "<|endoftext|>"
    assert all(tokens[i] == t for t, i in tokenizer.get_vocab().items())
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    weights = load_file(model_dir / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, 2)
    written = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(written) == len(weights)
    for name, tensor in weights.items():
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert np.array_equal(written[mapped].reshape(tensor.shape), tensor.numpy()), name


def test_an_architecture_it_does_not_know_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="GGUF export supports llama, phi models, not 'mamba'"):
        write_gguf(tmp_path, tmp_path / "x.gguf")
