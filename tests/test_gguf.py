"""The GGUF export's writer (issue 16): a Llama written by it is read back by transformers' own
GGUF loader (an independent implementation of llama.cpp's conventions) with the same tokens and
logits; a Phi-2 keeps every tensor, the vocabulary and the hyperparameters llama.cpp reads. The
vocabulary is what llama.cpp's converter writes (issue 28): a Llama's SentencePiece scores and
token types, which llama.cpp's tokenizer merges by."""

from __future__ import annotations

import json
import shutil
from hashlib import sha256

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO
from worker.exports import copy_sentencepiece_model
from worker.gguf import write_gguf

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gguf")]  # its exports are made once a file

STORIES = REPO / "examples" / "stories260K"


@pytest.fixture(scope="module")
def stories_gguf(tmp_path_factory):
    """stories260K written once as GGUF: (its folder, the folder holding stories.gguf)."""
    tmp_path = tmp_path_factory.mktemp("gguf")
    model_dir = tmp_path / "stories260K"
    shutil.copytree(STORIES, model_dir)
    write_gguf(model_dir, tmp_path / "stories.gguf")
    return model_dir, tmp_path


def sentencepiece_of(path):
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(path))
    kinds = [
        gguf.TokenType.UNKNOWN
        if processor.is_unknown(i)
        else gguf.TokenType.CONTROL
        if processor.is_control(i)
        else gguf.TokenType.BYTE
        if processor.is_byte(i)
        else gguf.TokenType.NORMAL
        for i in range(processor.vocab_size())
    ]
    pieces = [processor.id_to_piece(i) for i in range(processor.vocab_size())]
    scores = [processor.get_score(i) for i in range(processor.vocab_size())]
    return pieces, scores, kinds


def vocabulary_of(path):
    fields = gguf.GGUFReader(path).fields
    return tuple(fields[f"tokenizer.ggml.{name}"].contents() for name in ("tokens", "scores", "token_type"))


def test_a_llama_written_as_gguf_loads_back_with_the_same_tokens_and_logits(stories_gguf):
    """stories260K: grouped-query attention (8 query, 4 key/value heads), so the reordering of
    query and key rows for llama.cpp's rotary layout is checked on both."""
    model_dir, tmp_path = stories_gguf

    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="stories.gguf").eval()
    text = "Once upon a time, there was a little girl named Lily."
    inputs = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="stories.gguf")(text, return_tensors="pt")
    assert from_gguf["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, original(**inputs).logits)


def test_a_llama_gguf_has_its_sentencepiece_scores_and_token_types(stories_gguf):
    """llama.cpp's tokenizer merges the pair whose piece scores highest: with every score -1000
    (what was written before) it split " little" into " li", "t", "t", "le" (issue 28)."""
    _, tmp_path = stories_gguf
    pieces, scores, kinds = sentencepiece_of(STORIES / "tokenizer.model")
    tokens, written_scores, written_kinds = vocabulary_of(tmp_path / "stories.gguf")
    assert tokens == pieces and len(pieces) == 512
    assert written_scores == pytest.approx(scores, abs=0) and len(set(scores)) > 250
    assert written_kinds == [int(k) for k in kinds]
    assert written_kinds[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]


def test_an_exported_llama_keeps_the_bases_sentencepiece_model(tmp_path):
    """transformers saves the tokenizer without tokenizer.model; the export copies the base's
    (worker/exports.py), so the GGUF of the merged folder has the scores too."""
    merged = tmp_path / "merged"
    merged.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(STORIES / name, merged / name)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    tokenizer.save_pretrained(merged)
    assert not (merged / "tokenizer.model").exists()

    copy_sentencepiece_model(tokenizer, str(STORIES), merged)
    write_gguf(merged, tmp_path / "merged.gguf")

    pieces, scores, kinds = sentencepiece_of(STORIES / "tokenizer.model")
    assert vocabulary_of(tmp_path / "merged.gguf") == (
        pieces,
        pytest.approx(scores, abs=0),
        [int(k) for k in kinds],
    )


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
    kinds = field("tokenizer.ggml.token_type")  # as llama.cpp's converter writes them
    added = tokenizer.get_added_vocab()
    assert kinds[50256] == gguf.TokenType.CONTROL and kinds[50257] == gguf.TokenType.USER_DEFINED
    assert all(kinds[i] == gguf.TokenType.NORMAL for t, i in tokenizer.get_vocab().items() if t not in added)
    assert all(kinds[i] == gguf.TokenType.UNUSED for i in range(len(tokenizer), config["vocab_size"]))
    # llama.cpp names a BPE pre-tokenizer by the hash of the tokens its converter's check text
    # gives (get_vocab_base_pre); this one is microsoft/phi-2's, which it calls "phi-2"
    assert sha256(str(tokenizer.encode(LLAMA_CPP_CHECK_TEXT)).encode()).hexdigest() == PHI2_HASH
    weights = load_file(model_dir / "model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, 2)
    written = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(written) == len(weights)
    for name, tensor in weights.items():
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert np.array_equal(written[mapped].reshape(tensor.shape), tensor.numpy()), name


LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PHI2_HASH = "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085"


def test_an_architecture_it_does_not_know_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="GGUF export supports llama, phi models, not 'mamba'"):
        write_gguf(tmp_path, tmp_path / "x.gguf")
