"""DPO on the real tiny Phi through the real 4-bit LoRA path: the packed step computes what TRL
1.16's DPOTrainer computes for the same model, pairs and beta, and pairs pack as promised."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from app.conversations import flatten_trees
from app.preferences import ranked_pairs_from_rows
from app.spec import DpoHyperparameters, JobSpec
from tests.conftest import REPO, demo_spec
from worker.training.data import IGNORE_INDEX
from worker.training.dpo import FIGURES as FIGURE_NAMES
from worker.training.dpo import FigureSums, collate_micro_batch, pack_pairs, plan_pair_steps, score_pairs
from worker.training.preference_data import tokenize_pair

TREES = REPO / "examples/data/oasst1/en-100-trees.jsonl"


def oasst_pairs(tokenizer, count: int, max_length: int = 256) -> list:
    """The first `count` rank pairs of the tree export whose sides fit `max_length` untruncated."""
    trees = [json.loads(line) for line in TREES.read_text().splitlines()]
    chosen = []
    for pair in ranked_pairs_from_rows(flatten_trees(trees), ["en"]).pairs:
        tokenized, truncated = tokenize_pair(pair, tokenizer, max_length, "human_assistant")
        if not truncated:
            chosen.append(tokenized)
        if len(chosen) == count:
            return chosen
    raise AssertionError("too few short pairs")


def completion_start(sample) -> int:
    return next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)


def test_pair_steps_keep_both_sides_of_a_pair_in_one_micro_batch():
    lengths = [(700, 300), (1500, 2048), (10, 20), (2048, 2048), (900, 1200)] * 7
    steps = plan_pair_steps(lengths, pairs_per_step=8, rows_per_micro_batch=2, row_length=2048, seed=3)
    assert [step.pairs for step in steps] == [8, 8, 8, 8, 3]
    seen = []
    for step in steps:
        for micro in step.micro_batches:
            assert len(micro) <= 2
            assert all(sum(lengths[p][s] for p, s in row) <= 2048 for row in micro)
            units = sorted(pu for row in micro for pu in row)
            pairs = {p for p, _ in units}
            assert units == sorted((p, u) for p in pairs for u in (0, 1))  # both units, once each
            seen += pairs
    assert sorted(seen) == list(range(len(lengths)))


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_a_packed_dpo_step_equals_trls_dpo_trainer(tmp_path):
    """For each loss type (sigmoid, ipo, hinge): loss, every trained gradient and the implicit
    rewards of a packed step of three oasst1 rank pairs, each prompt computed once for both sides
    or each side on its own, equal TRL 1.16's DPOTrainer's on the same 4-bit LoRA model
    (reference: the adapter switched off), to 1e-5."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from worker.training.fused_loss import use_hidden_states_head
    from worker.training.model import (
        compute_dtype,
        keep_4bit_layers_trainable,
        load_quantized_model,
        load_tokenizer,
        target_modules,
    )

    spec = JobSpec.model_validate(demo_spec(max_seq_length=256))
    tokenizer = load_tokenizer(spec.base_model)
    base = load_quantized_model(spec, compute_dtype(spec.quantization))
    keep_4bit_layers_trainable(base)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="all", task_type="CAUSAL_LM")
    lora.target_modules = target_modules(spec, base)
    beta = 0.1  # the default
    pairs = oasst_pairs(tokenizer, 3, max_length=160)
    config = DPOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        loss_type=["sigmoid"],  # each loss type in turn below
        max_length=None,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=3,
        gradient_checkpointing=False,
        bf16=False,  # the demo computes in float32, as our side does on a CPU
    )
    placeholder = Dataset.from_list([{"prompt": "Hi", "chosen": " there", "rejected": " no"}])
    # TRL wraps the base with the LoRA config: its reference is the adapter switched off
    trl = DPOTrainer(
        model=base, args=config, train_dataset=placeholder, processing_class=tokenizer, peft_config=lora
    )
    model = trl.model
    model.eval()  # no LoRA dropout on either side, so both see the same function
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for parameter in trained.values():  # TRL casts a 4-bit model's trained weights to bf16; the demo is fp32
        parameter.data = parameter.data.float()
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from its reference (a new adapter's B is zero)
        for name, parameter in trained.items():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    assert any("lm_head.bias" in name for name in trained)  # the demo trains biases: the head's too

    # TRL: its own collator on the same token ids (prompt, then each completion)
    examples = []
    for pair in pairs:
        start = completion_start(pair.chosen)
        assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
        examples.append(
            {
                "prompt_ids": pair.chosen.input_ids[:start],
                "chosen_ids": pair.chosen.input_ids[start:],
                "rejected_ids": pair.rejected.input_ids[start:],
            }
        )
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    head = use_hidden_states_head(model)  # TRL's fused forward reads the head's weight, not its forward
    assert head is not None
    # the service: the three pairs packed with each prompt once (rows of 1,024 hold a whole pair),
    # and each side on its own (rows as long as the longest side: no pair fits one)
    shared = pack_pairs(pairs, pairs_per_step=3, rows_per_micro_batch=2, row_length=1024, seed=0)
    longest = max(len(s.input_ids) for pair in pairs for s in (pair.chosen, pair.rejected))
    apart = pack_pairs(pairs, pairs_per_step=3, rows_per_micro_batch=2, row_length=longest, seed=0)
    assert shared.shared_share == 1 and apart.shared_share == 0
    for packed in (shared, apart):  # the planner's lengths are the pieces' the collator packs
        assert all(
            len(packed.piece(p, u).input_ids) == packed.lengths[p][u]
            for p in range(len(pairs))
            for u in range(len(packed.units[p]))
        )
    assert len(shared.steps[0].micro_batches) == 1 < len(apart.steps[0].micro_batches)

    for loss_type in ("sigmoid", "ipo", "hinge"):
        trl.loss_types, trl._metrics["eval"] = [loss_type], defaultdict(list)
        trl_loss = trl.compute_loss(model, batch)
        trl_loss.backward()
        expected = {name: p.grad.clone() for name, p in trained.items()}
        metrics = {name: values[-1] for name, values in trl._metrics["eval"].items()}  # eval mode
        model.zero_grad()

        settings = DpoHyperparameters(beta=beta, loss_type=loss_type)
        for packed in (shared, apart):
            figures = FigureSums()
            loss = 0
            for rows in packed[0]["micro_batches"]:
                micro = collate_micro_batch(rows, tokenizer.pad_token_id, 1)
                scored = score_pairs(model, micro, settings, head, reference_adapter=None)
                part = scored.losses.sum() / 3
                part.backward()
                loss += part.item()
                figures.add(
                    scored.losses.sum(), scored.chosen_rewards, scored.rejected_rewards, *scored.logps
                )

            assert abs(loss - trl_loss.item()) < 1e-5, loss_type
            for name, grad in expected.items():
                assert torch.allclose(trained[name].grad, grad, atol=1e-5, rtol=1e-4), (loss_type, name)
            model.zero_grad()
            means = figures.means()
            for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
                assert means[name] == pytest.approx(metrics[name], abs=1e-5), name
            for name in ("logps/chosen", "logps/rejected"):  # float32 sums of ~700: a few ulps apart
                assert means[name] == pytest.approx(metrics[name], rel=1e-6, abs=1e-4), name
            assert abs(means["rewards/chosen"]) > 1e-3 and abs(means["rewards/rejected"]) > 1e-3  # not 0


def dpo_spec(**changes) -> dict:
    """A short DPO job on the tiny Phi: oasst1 rank pairs from the tree export."""
    spec = demo_spec(
        max_steps=3, save_steps=3, max_seq_length=128, batch_size=2, gradient_accumulation_steps=2
    )
    spec["method"] = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    spec["dataset"] = {
        "source": str(TREES),
        "max_samples": 12,
        "validation_source": str(TREES),
        "max_eval_samples": 2,
    }
    return {**spec, **changes}


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_a_dpo_job_trains_on_oasst1_rank_pairs_and_logs_its_figures(service_env):
    from app.models import LOCAL_OWNER
    from app.services import jobs
    from worker.tasks import execute_job

    job = jobs.create_job(JobSpec.model_validate(dpo_spec()), LOCAL_OWNER)
    execute_job(job.id)

    done = jobs.get_job(job.id, LOCAL_OWNER)
    assert done.status == "succeeded", done.error
    events = [e.message for e in jobs.list_events(job.id, LOCAL_OWNER, None, 100).items]
    assert "data ready: 12 preference pairs, 2 validation pairs" in events
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 100).items
    assert [r.step for r in rows] == [1, 2, 3]
    # step 1 compares the policy with itself: every reward 0, the loss log 2
    first = rows[0].figures
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0 and rows[0].loss == pytest.approx(
        0.6931, 1e-3
    )
    assert all(set(FIGURE_NAMES) <= set(r.figures) for r in rows)
    assert {f"eval_{name}" for name in FIGURE_NAMES} <= set(rows[-1].figures) and rows[-1].eval_loss
    assert any(r.figures["rewards/chosen"] != 0 for r in rows[1:])  # the policy moved


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_a_dpo_job_continues_from_a_supervised_adapter_which_stays_its_reference(service_env, tmp_path):
    """DPO from an SFT job's final adapter: it starts from those weights (step 1's rewards are 0
    against the frozen copy), and its adapter loads on the base with stock peft, alone."""
    import zipfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from app.models import LOCAL_OWNER
    from app.services import jobs
    from worker.tasks import execute_job

    supervised = demo_spec(max_steps=2, save_steps=2, max_seq_length=128, eval_samples=2)
    supervised["lora"] = {"bias": "none", "r": 4, "dropout": 0}  # step 1's policy is then its reference
    first = jobs.create_job(JobSpec.model_validate(supervised), LOCAL_OWNER)
    execute_job(first.id)
    assert jobs.get_job(first.id, LOCAL_OWNER).status == "succeeded"

    spec = dpo_spec(init_from={"job": first.id})
    spec["dataset"].pop("validation_source")  # evaluation is the other test's
    spec.pop("base_model"), spec.pop("lora"), spec.pop("quantization")  # they come from the first job
    job = jobs.create_job(JobSpec.model_validate(spec), LOCAL_OWNER)
    assert job.spec["lora"]["r"] == 4
    execute_job(job.id)

    done = jobs.get_job(job.id, LOCAL_OWNER)
    assert done.status == "succeeded", done.error
    events = " ".join(e.message for e in jobs.list_events(job.id, LOCAL_OWNER, None, 100).items)
    assert f"training continues from {first.id} (adapter)" in events
    assert "reference: the adapter it continues from, frozen" in events
    rows = jobs.list_metrics(job.id, LOCAL_OWNER, None, 100).items
    assert rows[0].figures["rewards/chosen"] == 0 and rows[-1].figures["rewards/chosen"] != 0

    folder = tmp_path / "adapter"
    with zipfile.ZipFile(jobs.adapter_zip(job.id, LOCAL_OWNER).path) as archive:
        archive.extractall(folder)
        assert not [n for n in archive.namelist() if "reference" in n]  # the trained adapter only
    base = AutoModelForCausalLM.from_pretrained(str(REPO / "examples/tiny-phi2"))
    model = PeftModel.from_pretrained(base, str(folder / "adapter"))
    before = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(REPO / "examples/tiny-phi2")),
        _unzipped(first.id, tmp_path),
    )
    moved = [
        name
        for (name, p), (_, q) in zip(model.named_parameters(), before.named_parameters(), strict=True)
        if "lora_B" in name and not torch.equal(p, q)
    ]
    assert moved  # DPO trained the SFT adapter further


def _unzipped(job_id: str, tmp_path) -> str:
    import zipfile

    from app.models import LOCAL_OWNER
    from app.services import jobs

    folder = tmp_path / job_id
    with zipfile.ZipFile(jobs.adapter_zip(job_id, LOCAL_OWNER).path) as archive:
        archive.extractall(folder)
    return str(folder / "adapter")
