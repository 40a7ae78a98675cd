"""The job spec: `{}` is the seed recipe, every value overridable, bad values named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.spec import JobSpec


def test_empty_spec_is_the_seed_recipe():
    spec = JobSpec.model_validate({})

    assert spec.base_model == "microsoft/phi-2"
    assert (spec.dataset.source, spec.dataset.languages) == ("OpenAssistant/oasst1", ["en"])
    q = spec.quantization
    assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype) == (4, "nf4", True, "float16")
    lora = spec.lora
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32, 0.05)
    assert lora.target_modules == "auto"  # on Phi: q_proj, k_proj, v_proj, dense (test_architectures.py)
    t = spec.training
    assert (t.batch_size, t.gradient_accumulation_steps) == (4, 4)
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio) == (2e-4, "cosine", 0.03)
    assert t.optimizer == "paged_adamw_32bit"
    assert (t.max_seq_length, t.gradient_checkpointing) == (2048, True)
    assert (t.save_steps, t.save_total_limit) == (100, 2)


def test_every_value_is_overridable_and_the_rest_keep_their_defaults():
    spec = JobSpec.model_validate({"lora": {"r": 8}, "training": {"learning_rate": 1e-4, "max_steps": 50}})

    assert (spec.lora.r, spec.lora.alpha) == (8, 32)
    assert (spec.training.learning_rate, spec.training.max_steps, spec.training.batch_size) == (1e-4, 50, 4)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"training": {"learning_rate": 0}}, ("training", "learning_rate")),
        ({"training": {"batch_size": -1}}, ("training", "batch_size")),
        ({"lora": {"dropout": 1.5}}, ("lora", "dropout")),
        ({"lora": {"target_modules": []}}, ("lora", "target_modules")),
        ({"lora": {"target_modules": ["q_proj; rm -rf"]}}, ("lora", "target_modules")),
        ({"quantization": {"bits": 3}}, ("quantization", "bits")),
        ({"training": {"optimizer": "magic"}}, ("training", "optimizer")),
        ({"training": {"bogus": 1}}, ("training", "bogus")),
        ({"surprise": True}, ("surprise",)),
        ({"base_model": "https://evil.example/model"}, ("base_model",)),
        ({"base_model": "./no/such/model/dir"}, ("base_model",)),
        ({"dataset": {"source": "not a name"}}, ("dataset", "source")),
        # found by the fuzz test: too long a file name, a NUL byte, an unknown user (were 500s)
        ({"base_model": "x" * 300}, ("base_model",)),
        ({"dataset": {"source": "a\x00b"}}, ("dataset", "source")),
        ({"base_model": "~no_such_user_here/model"}, ("base_model",)),
    ],
)
def test_bad_values_are_rejected_naming_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(body)

    assert [tuple(err["loc"]) for err in caught.value.errors()] == [field]


def test_hub_ids_may_pin_a_revision_and_local_paths_become_absolute(tmp_path_allowed, monkeypatch):
    tmp_path = tmp_path_allowed
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)

    spec = JobSpec.model_validate({"base_model": "my-model", "dataset": {"source": "org/data@v1.2"}})

    assert spec.base_model == str(tmp_path / "my-model")
    assert spec.dataset.source == "org/data@v1.2"


def test_full_row_packing_is_a_mode_of_packing():
    spec = JobSpec.model_validate({"training": {"packing_mode": "full_rows"}})
    assert spec.training.packing_mode == "full_rows" and JobSpec().training.packing_mode == "per_step"
    with pytest.raises(ValidationError, match="needs training.packing: true"):
        JobSpec.model_validate({"training": {"packing_mode": "full_rows", "packing": False}})


def test_a_local_dataset_is_checked_at_submission(tmp_path_allowed):
    """Issue 15: a path the worker can't read as a dataset got a 201 and failed in the worker."""
    (tmp_path_allowed / "notes.txt").write_text("hello")
    (tmp_path_allowed / "empty").mkdir()
    (tmp_path_allowed / "saved").mkdir()
    (tmp_path_allowed / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (tmp_path_allowed / "files" / "train").mkdir(parents=True)
    (tmp_path_allowed / "files" / "train" / "part-0.parquet").write_bytes(b"PAR1")

    for name, why in (
        ("notes.txt", "notes.txt is not a dataset"),
        ("empty", "folder empty holds no dataset"),
    ):
        with pytest.raises(ValidationError) as refused:
            JobSpec.model_validate({"dataset": {"source": str(tmp_path_allowed / name)}})
        [error] = refused.value.errors()
        assert error["loc"] == ("dataset", "source") and why in error["msg"]
        assert "save_to_disk" in error["msg"]  # and what is accepted
    for name in ("saved", "files"):
        spec = JobSpec.model_validate({"dataset": {"source": str(tmp_path_allowed / name)}})
        assert spec.dataset.source == str(tmp_path_allowed / name)
