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
from tests.conftest import REPO, demo_spec
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
def test_a_pretrained_llama_trains_its_attention_projections_in_4bit(service_env):
    from worker.tasks import execute_job

    llama = demo_spec(eval_samples=16, max_steps=8, save_steps=4, max_seq_length=128)
    llama["base_model"] = str(REPO / "examples" / "stories260K")
    job = jobs.create_job(JobSpec.model_validate(llama), LOCAL_OWNER)

    execute_job(job.id)

    done = jobs.get_job(job.id, LOCAL_OWNER)
    assert done.status == "succeeded", done.error
    config = json.loads((job_files(job.id).adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ATTENTION)
    evals = [r.eval_loss for r in jobs.list_metrics(job.id, LOCAL_OWNER, None, 100).items if r.eval_loss]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
