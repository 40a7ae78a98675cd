"""The fused loss (worker.training.fused_loss) is transformers' causal-LM loss: the same value
and the same gradients, chunk by chunk, on random tensors and on the real tiny Phi through the
real 4-bit LoRA path; the trainer's packed batches count their tokens on the host."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from tests.helpers import assert_same_step, demo_lora_model, lora_step, packed_step, without_dropout
from worker.training.data import IGNORE_INDEX
from worker.training.fused_loss import (
    fused_loss_refusal,
    linear_cross_entropy,
    use_fused_loss,
    use_model_loss,
)
from worker.training.packing import (
    INPUT_TOKENS,
    PackedData,
    block_causal_mask,
    collate_step,
    plan_steps,
)


def _head_and_batch(seed: int = 0, vocab: int = 97, hidden: int = 16):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) * 0.3
    bias = torch.randn(vocab, generator=generator) * 0.1
    states = torch.randn(2, 11, hidden, generator=generator)
    labels = torch.randint(0, vocab, (2, 11), generator=generator)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    return weight, bias, states, labels


@pytest.mark.parametrize("chunk_tokens", [1, 5, 22, 64])
@pytest.mark.parametrize("num_items", [None, 13])
def test_the_chunked_loss_is_transformers_causal_lm_loss(chunk_tokens, num_items):
    weight, bias, states, labels = _head_and_batch()
    fused_states, fused_bias = states.clone().requires_grad_(), bias.clone().requires_grad_()
    reference_states, reference_bias = states.clone().requires_grad_(), bias.clone().requires_grad_()

    fused = linear_cross_entropy(
        fused_states, weight, fused_bias, labels, num_items, chunk_tokens=chunk_tokens
    )
    reference = ForCausalLMLoss(
        F.linear(reference_states, weight, reference_bias), labels, weight.shape[0], num_items
    )
    (fused * 3.0).backward()  # the backward scales by what comes from above (loss scaling)
    (reference * 3.0).backward()

    assert torch.allclose(fused, reference, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fused_states.grad, reference_states.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(fused_bias.grad, reference_bias.grad, rtol=1e-5, atol=1e-7)
    # a token whose next label is ignored (and each row's last) has no gradient; the others do
    assert fused_states.grad[1, 6:].abs().sum() == 0 and fused_states.grad[0, 10].abs().sum() == 0
    assert (fused_states.grad[1, :6].abs().sum(-1) > 0).all()


def test_under_autocast_the_logits_are_computed_in_its_dtype_as_lm_head_would():
    weight, bias, states, labels = _head_and_batch(seed=1)
    fused_states = states.clone().requires_grad_()
    reference_states = states.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(fused_states, weight, bias, labels, 20, chunk_tokens=4)
        reference = ForCausalLMLoss(F.linear(reference_states, weight, bias), labels, weight.shape[0], 20)
    fused.backward()
    reference.backward()
    # the same bfloat16 logits and float32 loss; gradients through bfloat16 matmuls
    assert torch.allclose(fused, reference, rtol=1e-5)
    assert torch.allclose(fused_states.grad, reference_states.grad, rtol=2e-2, atol=1e-4)


def test_a_trained_head_is_refused():
    weight, bias, states, labels = _head_and_batch()
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(states, weight.requires_grad_(), bias, labels)


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_the_fused_loss_keeps_a_packed_steps_loss_and_gradients_on_the_4bit_model():
    model, tokenizer, samples = demo_lora_model()
    model.train()
    without_dropout(model)  # the same function in both runs
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=64)
    mask = block_causal_mask(batch.pop("sequence_ids"), torch.float32)
    items = torch.tensor(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        return lora_step(model, lora, **batch, attention_mask=mask, num_items_in_batch=items)

    assert fused_loss_refusal(model) is None
    model_step = step()
    vocab = model.config.vocab_size
    assert model(**batch, attention_mask=mask).logits.shape[-1] == vocab
    assert use_fused_loss(model)
    try:
        fused_step = step()
        assert model(**batch, attention_mask=mask).logits.shape[-1] == model.config.hidden_size
    finally:
        use_model_loss(model)
    assert model(**batch, attention_mask=mask).logits.shape[-1] == vocab
    assert_same_step(fused_step, model_step)

    # (the demo trains every bias, lm_head's among them) a head whose weight trains keeps the
    # model's own loss
    head = model.get_base_model().lm_head
    head.weight.requires_grad_(True)
    try:
        assert fused_loss_refusal(model) == "lm_head's weight is trained" and not use_fused_loss(model)
    finally:
        head.weight.requires_grad_(False)


def test_a_trainer_batch_counts_its_real_tokens_on_the_host():
    from worker.training.data import TokenizedSample

    samples = [TokenizedSample([1, 2, 3], [1, 2, 3]), TokenizedSample([4, 5], [4, 5])]
    item = PackedData(samples, plan_steps([3, 2], 2, 2, 3, 0))[0]
    batch = collate_step([item], pad_token_id=0, row_multiple=64)
    assert batch[INPUT_TOKENS] == 5 and isinstance(batch[INPUT_TOKENS], int)
    assert batch["input_ids"].shape == (2, 64)
    assert int((batch["sequence_ids"] > 0).sum()) == 5


def test_the_speed_plan_keeps_the_models_own_loss_where_it_cant_fuse_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    from worker.training.speed import SpeedPlan, apply_speed_plan

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=16))
    model.requires_grad_(False)
    plan = SpeedPlan(fused_loss=True)
    apply_speed_plan(model, plan)
    assert not plan.fused_loss and "loss not fused (model type 'gpt2'" in plan.describe()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 50
