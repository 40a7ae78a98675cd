"""The throughput settings keep what a step computes: full-row packing places every sample once,
rows padded to a multiple change no loss, and decoder layers compiled (and checkpointed from
outside the compiled code) give the eager loss and gradients, on the real tiny Phi through the
real 4-bit LoRA path."""

from __future__ import annotations

import copy
import dataclasses
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from app.spec import JobSpec
from tests.conftest import demo_spec
from tests.helpers import assert_same_step, demo_lora_model, lora_step, packed_step, without_dropout
from worker.training.data import IGNORE_INDEX
from worker.training.nf4 import dequantize_4bit, use_bitsandbytes_matmul, use_plain_4bit_matmul
from worker.training.packing import PackedData, block_causal_mask, collate_packed, plan_full_rows, plan_steps
from worker.training.speed import (
    RECOMPUTE_BUDGET,
    ROW_MULTIPLE,
    compile_decoder_layers,
    decoder_layers,
    for_dpo,
    plan_speed,
    restore_decoder_layers,
)


def test_full_rows_place_every_sample_once_in_nearly_full_rows():
    rng = random.Random(0)
    lengths = [max(4, min(2048, int(rng.lognormvariate(4.3, 1.0)))) for _ in range(3000)]
    items = plan_full_rows(lengths, rows_per_item=4, row_length=2048, seed=3)

    placed = sorted(i for item in items for row in item.rows for i in row)
    assert placed == list(range(3000))
    rows = [row for item in items for row in item.rows]
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    assert all(len(item.rows) == 4 for item in items[:-1])
    fill = sum(lengths) / (2048 * len(rows))
    assert fill > 0.95, fill
    # seeded: the same plan again, another seed another plan
    assert [s.rows for s in plan_full_rows(lengths, 4, 2048, seed=3)] == [s.rows for s in items]
    assert [s.rows for s in plan_full_rows(lengths, 4, 2048, seed=4)] != [s.rows for s in items]


def test_rows_padded_to_a_multiple_carry_no_loss_and_see_no_sample():
    from worker.training.data import TokenizedSample

    samples = [TokenizedSample([1, 2, 3], [1, 2, 3]), TokenizedSample([4, 5], [4, 5])]
    item = PackedData(samples, plan_steps([3, 2], 2, 1, 8, 0))[0]
    plain = collate_packed([item], pad_token_id=0)
    padded = collate_packed([item], pad_token_id=0, row_multiple=64)
    assert plain["input_ids"].shape == (1, 5) and padded["input_ids"].shape == (1, 64)
    for key, tensor in plain.items():
        assert torch.equal(padded[key][:, :5], tensor)
    assert (padded["labels"][:, 5:] == IGNORE_INDEX).all() and (padded["sequence_ids"][:, 5:] == 0).all()
    mask = block_causal_mask(padded["sequence_ids"], torch.float32)[0, 0]
    assert (mask[:5, 5:] < 0).all()  # no real token sees padding


def test_the_plan_is_the_eager_recipe_without_cuda():
    plan = plan_speed(object(), 4 * 2048, checkpointing=True)
    assert (plan.compile_layers, plan.checkpointing, plan.row_multiple) == (False, True, 1)


PHI2 = AutoConfig.from_pretrained(Path(__file__).parent.parent / "bench" / "phi-2-config.json")
GIB = 2**30


def test_the_plan_for_a_t4_is_the_one_measured():
    """What the default recipe runs on a T4 (compute capability 7.5, the card's 15 GiB free),
    field by field as docs/gpu.md and docs/benchmarks.md (round six) measured it: a change here
    must be measured (bench/throughput.py --only "service fp16, T4 plan") and this test updated."""
    plan = plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((7, 5), 15 * GIB))
    assert dataclasses.asdict(plan) == {
        "attention": "default sdpa",  # the memory-efficient kernel: a T4 has no flash nor cuDNN
        "mask": "sdpa",  # dense packed mask: FlexAttention's kernels need compute capability 8.0
        "one_row": False,  # a dense mask over one long row would cost the square of its length
        "compile_layers": False,
        "checkpointing": True,
        "row_multiple": 1,
        "fused_adamw": True,
        "plain_4bit": False,
        "graphs": False,
        "fused_loss": True,
        "recompute_budget": None,
        "compile_while_training": False,  # nothing compiles
        "notes": [],
    }


def test_a_t4_compiles_its_layers_in_rows_without_graphs_only_when_the_operator_opts_in(monkeypatch):
    """FINETUNE_COMPILE_PRE_AMPERE=1: the plan measured as a T4 (docs/gpu.md): compiled layers
    with their 4-bit matmuls, the dense mask in rows (one row of 4 × 2048 under it was slower and
    too big), no CUDA graphs (captures failed, 14 GiB reserved), a tenth of the activations kept;
    the first steps eager while the layers compile. A DPO job there keeps eager layers."""
    monkeypatch.setenv("FINETUNE_COMPILE_PRE_AMPERE", "1")
    plan = plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((7, 5), 15 * GIB))
    assert (plan.compile_layers, plan.plain_4bit, plan.mask, plan.attention) == (
        True,
        True,
        "sdpa",
        "default sdpa",
    )
    assert (plan.one_row, plan.graphs, plan.row_multiple) == (False, False, ROW_MULTIPLE)
    assert (plan.checkpointing, plan.recompute_budget, plan.compile_while_training) == (
        True,
        RECOMPUTE_BUDGET,
        True,
    )
    dpo = for_dpo(plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((7, 5), 15 * GIB), graphs=False))
    assert (dpo.compile_layers, dpo.plain_4bit, dpo.row_multiple, dpo.checkpointing) == (
        False,
        False,
        1,
        True,
    )
    # older cards than a T4 never compile; without the opt-in a T4 keeps the plan pinned above
    assert not plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((7, 0), 15 * GIB)).compile_layers
    monkeypatch.setenv("FINETUNE_COMPILE_PRE_AMPERE", "0")
    assert not plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((7, 5), 15 * GIB)).compile_layers


def test_the_plan_for_an_h100_keeps_recomputation_within_its_budget():
    plan = plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((9, 0), 78 * GIB))
    assert (plan.mask, plan.compile_layers, plan.graphs, plan.fused_loss) == ("flex", True, True, True)
    assert plan.one_row  # a step's rows end to end: one batch size for the compiled layers
    assert (plan.checkpointing, plan.recompute_budget) == (True, RECOMPUTE_BUDGET)
    assert plan.compile_while_training  # worker.training.layer_compile
    budgeted = plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((9, 0), 78 * GIB), recompute_budget=0.3)
    assert (budgeted.checkpointing, budgeted.recompute_budget) == (True, 0.3)
    assert "each layer keeps 30% of its activations" in budgeted.describe()
    # a card with room for every activation twice (graphs) drops recomputation
    roomy = plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((9, 0), 139 * GIB))
    assert (roomy.checkpointing, roomy.recompute_budget) == (False, None)
    # a job that turns checkpointing off gets none
    off = plan_speed(PHI2, 4 * 2048, checkpointing=False, gpu=((9, 0), 78 * GIB))
    assert (off.checkpointing, off.recompute_budget) == (False, None)
    # a DPO job keeps the plan measured for it: layers recomputed whole where recomputation stays
    # (an 80 GB card drops it for DPO: no CUDA graphs), its own rows, no fused loss
    dpo = for_dpo(plan_speed(PHI2, 4 * 2048, checkpointing=True, gpu=((8, 0), 40 * GIB), graphs=False))
    assert dpo.whole_layers_recomputed and dpo.compile_layers and not dpo.graphs
    assert not (dpo.one_row or dpo.fused_loss or dpo.compile_while_training)


@pytest.mark.parametrize(
    ("shape", "double_quant"), [((160, 64), True), ((96, 40), True), ((300, 70), False), ((512, 1024), True)]
)
def test_the_plain_4bit_dequantization_is_bitsandbytes_own_bit_for_bit(shape, double_quant):
    """worker.training.nf4 (what compiled layers multiply with) against bitsandbytes' own
    dequantization, with double quantization and with blocks cut short by the weight's size."""
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
    )
    expected = bnb_functional.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_4bit(packed, state, torch.float32), expected)
    assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
@pytest.mark.parametrize(("checkpointing", "budget"), [(True, None), (False, None), (False, 0.1)])
def test_compiled_decoder_layers_keep_the_loss_and_gradients(checkpointing, budget):
    """Whole layers checkpointed from outside, none, and (budget) the compiled layers keeping a
    tenth of their activations and recomputing the rest inside their backward, as the GPU's
    default plan does (`SpeedPlan.recompute_budget`): min-cut partitioned like Inductor's."""
    model, tokenizer, samples = demo_lora_model()
    model.train()
    without_dropout(model)  # the same function in both runs
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=64)
    mask = block_causal_mask(batch.pop("sequence_ids"), torch.float32)

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        return lora_step(model, lora, **batch, attention_mask=mask)

    eager_loss, eager_grads = step()
    torch._dynamo.reset()
    # as the GPU plan does: the 4-bit matmuls as torch ops, compiled into the layers
    assert use_plain_4bit_matmul(model) == 2 * 6  # q, k, v, dense, fc1, fc2 in each layer
    # the GPU's dynamic-shape compile with checkpointing; static shapes (faster) without
    backend = "aot_eager" if budget is None else "aot_eager_decomp_partition"
    layers = compile_decoder_layers(
        model, checkpointing=checkpointing, backend=backend, dynamic=checkpointing or budget is not None
    )
    try:
        assert layers == len(decoder_layers(model)) == 2
        assert not model.get_base_model().is_gradient_checkpointing  # checkpointed from outside
        # read when the layer's forward and backward are split, at its first call
        with torch._functorch.config.patch(activation_memory_budget=1.0 if budget is None else budget):
            compiled_loss, compiled_grads = step()
    finally:
        restore_decoder_layers(model)
        use_bitsandbytes_matmul(model)
        torch._dynamo.reset()
    assert_same_step((compiled_loss, compiled_grads), (eager_loss, eager_grads))


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_a_compiled_layer_is_traced_once_at_the_first_step():
    """Every job pays its layers' trace at its first step, warm compile cache or not: once. A
    float traced as a symbol (dynamic=True's default) that can't become a tensor makes dynamo
    trace the whole layer again (torch's TensorifyScalarRestartAnalysis)."""
    from torch._dynamo.utils import counters

    model, tokenizer, samples = demo_lora_model(samples=4)
    model.train()
    use_plain_4bit_matmul(model)
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=64)
    mask = block_causal_mask(batch.pop("sequence_ids"), torch.float32)
    torch._dynamo.reset()
    counters.clear()
    compile_decoder_layers(model, checkpointing=True, backend="aot_eager", dynamic=True)
    try:
        model(**batch, attention_mask=mask).loss.backward()
    finally:
        restore_decoder_layers(model)
        use_bitsandbytes_matmul(model)
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every layer
    assert counters["aot_autograd"]["total"] == 1, dict(counters["aot_autograd"])


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_flex_attention_with_the_document_block_mask_gives_the_dense_masks_loss():
    """FlexAttention has no backward on a CPU: the loss here; bench/service_bench.py --check
    compares the LoRA gradients on the GPU."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from worker.training.speed import document_block_mask, use_flex_attention, use_sdpa_attention

    model, tokenizer, samples = demo_lora_model()
    model.eval()
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=128)
    sequence_ids = batch.pop("sequence_ids")
    assert batch["input_ids"].shape[1] % 128 == 0 and (sequence_ids == 0).any()  # padding too

    with torch.no_grad():
        dense = model(**batch, attention_mask=block_causal_mask(sequence_ids, torch.float32)).loss.item()
        use_flex_attention(model)
        try:
            flex = model(**batch, attention_mask=document_block_mask(sequence_ids)).loss.item()
        finally:
            use_sdpa_attention(model)
    assert abs(flex - dense) < 1e-4, (flex, dense)


def _adam_pair(steps: int):
    """The same LoRA-like parameters and gradients through bitsandbytes' paged 32-bit AdamW
    (the recipe's optimizer) and torch's AdamW, with the recipe's hyperparameters."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    shapes = [(16, 64), (64, 16), (16, 64), (64, 16)]
    start = [torch.randn(s) * 0.02 for s in shapes]
    grads = [[torch.randn(s) * 1e-2 for s in shapes] for _ in range(steps)]
    paged_params = [torch.nn.Parameter(t.clone()) for t in start]
    torch_params = [torch.nn.Parameter(t.clone()) for t in start]
    hyper = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    paged = bnb.optim.PagedAdamW32bit(paged_params, **hyper)
    plain = torch.optim.AdamW(torch_params, **hyper)
    return paged, paged_params, plain, torch_params, grads


def _step(optimizer, params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()
    optimizer.zero_grad()


def test_paged_adamw_32bit_and_torch_adamw_make_the_same_update():
    paged, paged_params, plain, torch_params, grads = _adam_pair(steps=6)
    for step_grads in grads:
        _step(paged, paged_params, step_grads)
        _step(plain, torch_params, step_grads)
    for a, b in zip(paged_params, torch_params, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5), (a - b).abs().max()


def test_a_paged_adamw_checkpoint_resumes_into_torch_adamw():
    from worker.training.speed import SpeedPlan, accept_bnb_adam_state, optimizer_name

    paged, paged_params, _, _, grads = _adam_pair(steps=6)
    for step_grads in grads[:3]:
        _step(paged, paged_params, step_grads)
    saved = copy.deepcopy(paged.state_dict())  # as read back from a checkpoint file
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in paged_params]
    resumed = torch.optim.AdamW(resumed_params, lr=1.0)  # hyperparameters come from the checkpoint
    accept_bnb_adam_state(resumed)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 2e-4 and "exp_avg" in resumed.state[resumed_params[0]]
    for step_grads in grads[3:]:
        _step(paged, paged_params, step_grads)
        _step(resumed, resumed_params, step_grads)
    for a, b in zip(paged_params, resumed_params, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5), (a - b).abs().max()
    # the substitution happens only where the plan says so (a GPU), and only for the same update
    assert optimizer_name("paged_adamw_32bit", SpeedPlan(fused_adamw=True)) == "adamw_torch_fused"
    assert optimizer_name("paged_adamw_32bit", SpeedPlan()) == "paged_adamw_32bit"
    assert optimizer_name("paged_adamw_8bit", SpeedPlan(fused_adamw=True)) == "paged_adamw_8bit"


def test_full_row_mode_trains_micro_batches_of_full_rows_and_accumulates_the_step(tmp_path):
    from worker.training.data import TokenizedSample, TrainingData
    from worker.training.recipe import _packed, packing_mode, training_arguments

    spec = JobSpec.model_validate(demo_spec(max_seq_length=256))
    assert packing_mode(spec) == "per_step"  # the default, also before the spec has the field
    t = spec.training
    rng = random.Random(1)
    samples = [TokenizedSample([1] * n, [1] * n) for n in (rng.randint(4, 120) for _ in range(400))]
    data = TrainingData(samples, len(samples), 0, {})

    per_step = training_arguments(spec, tmp_path, torch.float32, evaluate=False)
    full = training_arguments(spec, tmp_path, torch.float32, evaluate=False, full_rows=True)
    assert (per_step.per_device_train_batch_size, per_step.gradient_accumulation_steps) == (1, 1)
    assert (full.per_device_train_batch_size, full.gradient_accumulation_steps) == (
        1,
        t.gradient_accumulation_steps,
    )
    items = _packed(data, spec, t.batch_size * t.gradient_accumulation_steps, full_rows=True)
    rows = [row for step in items.steps for row in step.rows]
    assert all(len(step.rows) <= t.batch_size for step in items.steps)
    assert all(sum(len(samples[i].input_ids) for i in row) <= t.max_seq_length for row in rows)
    assert items.fill > 0.9
    # far more samples per optimizer step than the recipe's batch_size × gradient_accumulation_steps
    per_optimizer_step = items.mean_samples_per_step * t.gradient_accumulation_steps
    assert per_optimizer_step > 2 * t.batch_size * t.gradient_accumulation_steps
