"""A job's first steps train eagerly while its decoder layers compile in a thread
(worker.training.layer_compile): the compiled layers the trainer switches to are compiled
already (no compile at the switch), give the eager loss and gradients, and the thread's compile
touches none of the job's gradients. The real tiny Phi through the real 4-bit LoRA path, with
dynamo's AOTAutograd backend (Inductor's kernels are a GPU matter)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import assert_same_step, demo_lora_model, lora_step, packed_step, without_dropout
from worker.training.nf4 import is_4bit_linear, use_plain_4bit_matmul
from worker.training.packing import block_causal_mask
from worker.training.speed import SpeedPlan, compiled_layer_forwards, decoder_layers, restore_decoder_layers

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("demo_model")]


def _plan(recompute_budget: float | None = None) -> SpeedPlan:
    """The GPU's compiled plan where FlexAttention has a backward (not on a CPU): the dense mask."""
    return SpeedPlan(
        compile_layers=True,
        checkpointing=True,
        plain_4bit=True,
        compile_while_training=True,
        row_multiple=64,
        recompute_budget=recompute_budget,
    )


# whole layers recomputed (checkpointed from outside), and the GPU's default: each layer keeps a
# tenth of its activations (min-cut partitioned like Inductor's, no checkpoint outside)
@pytest.mark.parametrize(("budget", "backend"), [(None, "aot_eager"), (0.1, "aot_eager_decomp_partition")])
def test_the_layers_compile_beside_an_eager_step_and_switch_without_compiling_again(budget, backend):
    from torch._dynamo.utils import counters

    from worker.training.layer_compile import LayerCompile

    model, tokenizer, samples = demo_lora_model()
    model.train()
    without_dropout(model)  # the same function eager and compiled
    use_plain_4bit_matmul(model)
    # as on a GPU, where the 4-bit layers' biases (float32) differ from the input's dtype (bf16):
    # bitsandbytes' forward casts them at its first call, which the compiled copy must have seen
    for module in model.modules():
        if is_4bit_linear(module) and module.bias is not None:
            module.bias.data = module.bias.data.double()
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=64)
    sequence_ids = batch.pop("sequence_ids")
    mask = block_causal_mask(sequence_ids, torch.float32)

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        return lora_step(model, lora, **batch, attention_mask=mask)

    torch._dynamo.reset()
    counters.clear()
    compile = LayerCompile(model, _plan(budget), compiled_layer_forwards(model, backend=backend))
    said: list[str] = []
    compile.say = lambda text, **data: said.append(text)
    trainer = SimpleNamespace(mask_kind="sdpa", step_graphs=None)
    # read when the layer's forward and backward are split (apply_speed_plan sets it on a GPU)
    partition = torch._functorch.config.patch(activation_memory_budget=1.0 if budget is None else budget)
    partition.__enter__()
    try:
        compile.sequence_ids = sequence_ids
        eager = step()  # its first layer call keeps the layer's inputs
        assert compile._thread is None
        assert not compile.ready()  # before the next micro-batch: the compile starts
        assert compile._thread is not None
        compile._thread.join(timeout=300)
        assert compile.ready() and compile.error is None, compile.error
        compiles = counters["aot_autograd"]["total"]
        assert compiles >= 1  # the thread compiled the layer
        compile.eager_micro_batches = 1
        compile.switch(trainer)
        compiled = step()
        again = step()
    finally:
        partition.__exit__(None, None, None)
        compile.close()
        restore_decoder_layers(model)
        torch._dynamo.reset()
    # the switch found the layers compiled: no trace, no compile in the training's thread
    assert counters["aot_autograd"]["total"] == compiles, dict(counters["aot_autograd"])
    # the compiled step is the eager one (which the thread's backward, on its copy, left alone)
    assert_same_step(compiled, eager)
    assert_same_step(again, eager)
    assert said == [
        f"decoder layers compiled in {round(compile.compile_seconds, 1)} s while 1 micro-batch(es) "
        "trained eagerly; compiled from the next one on"
    ]
    assert trainer.mask_kind == "sdpa" and trainer.step_graphs is None  # no FlexAttention, no graphs asked
    assert len(decoder_layers(model)) == 2


def _compile_beside_demo_steps(compiled_forward):
    """The tiny model (2 samples, dense mask) with a `LayerCompile` whose "compiled" layer forward
    is `compiled_forward`; what it says, and a training micro-batch's forward and backward."""
    from worker.training.layer_compile import LayerCompile

    model, tokenizer, samples = demo_lora_model(samples=2)
    model.train()
    compile = LayerCompile(model, _plan(), {type(decoder_layers(model)[0]): compiled_forward})
    said: list[dict] = []
    compile.say = lambda text, **data: said.append({"text": text, **data})
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=64)
    compile.sequence_ids = batch.pop("sequence_ids")
    mask = block_causal_mask(compile.sequence_ids, torch.float32)

    def step() -> None:
        model(**batch, attention_mask=mask).loss.backward()

    return model, compile, said, step


def test_a_compile_that_fails_in_the_thread_is_said_and_the_layers_compile_at_their_call():
    calls = {"n": 0}

    def forward_failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("no compiler here")
        return type(self).forward(self, *args, **kwargs)

    model, compile, said, step = _compile_beside_demo_steps(forward_failing_once)
    try:
        step()
        assert not compile.ready()
        assert compile._thread is not None
        compile._thread.join(timeout=60)
        compile.switch(SimpleNamespace(mask_kind="sdpa", step_graphs=None))
        step()
    finally:
        restore_decoder_layers(model)
    assert said[0]["compile_error"] == "RuntimeError: no compiler here"
    assert "failed (RuntimeError: no compiler here)" in said[0]["text"]
    assert calls["n"] > 2  # the layers ran the "compiled" forward after the switch


@pytest.mark.parametrize("compile_started", [False, True])
def test_a_training_that_ends_before_the_switch_says_so(compile_started):
    """Whether the training ended before the compile began (a single micro-batch) or while the
    compiled layers waited for a next micro-batch that never came, the job is told its
    micro-batches all trained eagerly (a GPU job whose compile finished during its last step
    said nothing)."""

    def compiled(self, *args, **kwargs):
        return type(self).forward(self, *args, **kwargs)

    model, compile, said, step = _compile_beside_demo_steps(compiled)
    try:
        compile.eager_micro_batches += 1  # as the trainer counts them
        step()
        if compile_started:
            assert not compile.ready()  # the next micro-batch's question starts the compile
            assert compile._thread is not None
            compile._thread.join(timeout=60)
        compile.close()
    finally:
        restore_decoder_layers(model)
    assert not compile.switched
    assert [s["eager_micro_batches"] for s in said] == [1]
    if compile_started:
        assert compile.error is None
        seconds = said[0]["compile_seconds"]
        assert said[0]["text"] == (
            f"the training ended before it used its decoder layers, compiled in {seconds} s: "
            "all 1 micro-batch(es) trained eagerly"
        )
    else:
        assert said[0]["text"] == (
            "the training ended before its decoder layers began compiling: "
            "all 1 micro-batch(es) trained eagerly"
        )


def test_the_trainer_switches_to_the_compiled_layers_between_two_steps(tmp_path):
    """PackedTrainer runs its first step alone on the eager layers, its second beside the compile
    it starts, and once the thread is done switches before its next micro-batch (the packed
    per-step items: between two steps)."""
    from functools import partial

    from transformers import TrainerCallback

    from app.spec import JobSpec
    from tests.conftest import demo_spec
    from worker.training.data import TrainingData
    from worker.training.layer_compile import LayerCompile
    from worker.training.packing import collate_step
    from worker.training.recipe import _packed, training_arguments
    from worker.training.trainer import PackedTrainer

    model, tokenizer, samples = demo_lora_model(samples=24)
    spec = JobSpec.model_validate(demo_spec(max_seq_length=256, max_steps=3, batch_size=2))
    t = spec.training
    plan = _plan()
    compile = LayerCompile(model, plan, compiled_layer_forwards(model, backend="aot_eager"))
    said: list[dict] = []
    compile.say = lambda text, **data: said.append(data)
    steps_on_compiled: list[bool] = []

    class WaitForTheCompileAfterStepOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_on_compiled.append(compile.switched)
            if compile._thread is not None:  # started before step 2
                compile._thread.join(timeout=300)

    trainer = PackedTrainer(
        model=model,
        args=training_arguments(spec, tmp_path, torch.float32, evaluate=False, speed=plan),
        train_dataset=_packed(
            TrainingData(samples, len(samples), 0, {}), spec, t.batch_size * t.gradient_accumulation_steps
        ),
        data_collator=partial(
            collate_step, pad_token_id=tokenizer.pad_token_id, row_multiple=plan.row_multiple
        ),
        callbacks=[WaitForTheCompileAfterStepOne()],
    )
    trainer.layer_compile = compile
    try:
        trainer.train()
    finally:
        compile.close()
        restore_decoder_layers(model)
        torch._dynamo.reset()
    assert trainer.state.global_step == 3
    assert steps_on_compiled == [False, False, True]
    assert said == [
        {
            "compile_seconds": round(compile.compile_seconds, 1),
            "eager_micro_batches": 2,
            "compile_error": None,
        }
    ]
