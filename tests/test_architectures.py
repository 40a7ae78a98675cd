"""Any causal LM base (issue 15, in part): LoRA's modules by architecture when the spec says
`auto`, `all-linear`, and names that match no layer refused before training, naming those that
exist. Tiny random models of each architecture, made here from their configs; then a real
pretrained Llama (stories260K) trained through the real 4-bit path."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from app.models import LOCAL_OWNER
from app.services import jobs
from app.spec import JobSpec
from app.storage import job_files
from tests.conftest import REPO, demo_spec, sqlite_only
from worker.training.model import linear_layer_names, target_modules

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "head_dim": 8,
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_model(kind: str):
    config = AutoConfig.for_model(kind, **TINY)
    return AutoModelForCausalLM.from_config(config)


def spec(**lora) -> JobSpec:
    return JobSpec.model_validate({**demo_spec(), "lora": lora})


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("llama", ATTENTION),
        ("mistral", ATTENTION),
        ("qwen2", ATTENTION),
        ("gemma", ATTENTION),
        ("phi", ["q_proj", "k_proj", "v_proj", "dense"]),
    ],
)
def test_auto_picks_each_architectures_modules_and_they_exist(kind, expected):
    model = tiny_model(kind)
    assert target_modules(spec(), model) == expected
    assert set(expected) <= linear_layer_names(model)


def test_all_linear_and_names_that_match_no_layer():
    model = tiny_model("llama")
    assert target_modules(spec(target_modules="all-linear"), model) == "all-linear"
    assert target_modules(spec(target_modules=["q_proj", "gate_proj"]), model) == ["q_proj", "gate_proj"]
    with pytest.raises(ValueError) as refused:
        target_modules(spec(target_modules=["q_proj", "dense"]), model)
    assert "['dense'] match no layer of this llama model" in str(refused.value)
    assert "'down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'" in str(refused.value)
    assert "lm_head" not in str(refused.value)


@pytest.mark.slow
@sqlite_only  # its subject is the model and the 4-bit path, not the database (CI's time is finite)
def test_a_pretrained_llama_trains_its_attention_projections_in_4bit(service_env):
    from worker.tasks import execute_job

    # a pretrained model's learning rate: the demo's 0.03 (made for the random tiny Phi) throws
    # stories260K's eval loss from ~3.5 to ~5, after which it wanders
    llama = demo_spec(eval_samples=16, max_steps=8, save_steps=4, max_seq_length=128, learning_rate=3e-3)
    llama["base_model"] = str(REPO / "examples" / "stories260K")
    job = jobs.create_job(JobSpec.model_validate(llama), LOCAL_OWNER)

    execute_job(job.id)

    done = jobs.get_job(job.id, LOCAL_OWNER)
    assert done.status == "succeeded", done.error
    config = json.loads((job_files(job.id).adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ATTENTION)
    evals = [r.eval_loss for r in jobs.list_metrics(job.id, LOCAL_OWNER, None, 100).items if r.eval_loss]
    assert len(evals) == 2 and evals[-1] < evals[0], evals


@pytest.mark.parametrize("model", ["stories260K", "tiny-phi2"])
def test_a_sampled_prompt_is_the_trained_samples_beginning_token_for_token(model):
    """Issue 15: with a SentencePiece tokenizer (Llama's), training tokenized segment by segment
    without BOS and the sampler the whole text with BOS: every Llama-family adapter was sampled
    on another prompt shape than it learned. Now both go through the same function."""
    from transformers import AutoTokenizer

    from app.conversations import Turn
    from worker.sampling import conversation
    from worker.training.data import prompt_ids, tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / model)
    messages = [
        {"role": "system", "content": "You tell short stories."},
        {"role": "user", "content": "Tell me about a cat."},
        {"role": "assistant", "content": "Once upon a time, there was a cat."},
        {"role": "user", "content": "And then?"},
    ]
    turns = [*conversation(messages), Turn("Assistant", "It slept in the sun.", True)]
    trained, _ = tokenize_conversation(turns, tokenizer, 512, "assistant")
    sampled = prompt_ids(conversation(messages), tokenizer)

    assert trained.input_ids[: len(sampled)] == sampled
    reply = [t for t, label in zip(trained.input_ids, trained.labels, strict=True) if label != -100]
    assert trained.input_ids[len(sampled) :] == reply  # what follows the prompt is the reply
    assert tokenizer.decode(reply, skip_special_tokens=True).strip() == "It slept in the sun."
    if model == "stories260K":
        assert sampled[0] == trained.input_ids[0] == tokenizer.bos_token_id  # Llama starts with BOS
    # no stray prefix-space tokens: both decode to exactly the text (SentencePiece once added a
    # `▁` before each newline and each reply)
    text = "System: You tell short stories.\nHuman: Tell me about a cat.\nAssistant: Once upon a time, "
    text += "there was a cat." + tokenizer.eos_token + "\nHuman: And then?\nAssistant: "
    after_bos = 1 if model == "stories260K" else 0
    prompt = text if model == "tiny-phi2" else text.removesuffix(" ")  # Llama's reply starts `▁It`
    assert tokenizer.decode(sampled[after_bos:]) == prompt
    assert (
        tokenizer.decode(trained.input_ids[after_bos:]) == text + "It slept in the sun." + tokenizer.eos_token
    )
    if model == "stories260K":
        # the tokens a whole-text tokenization gives (up to EOS, after which SentencePiece's
        # legacy mode adds a `▁` of its own)
        first_turns = prompt[: prompt.index(tokenizer.eos_token) + len(tokenizer.eos_token)]
        whole = tokenizer(first_turns, add_special_tokens=False)["input_ids"]
        assert sampled[1 : 1 + len(whole)] == whole
