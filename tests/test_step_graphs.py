"""What lets a micro-batch run as a CUDA graph keeps what it computes (worker/training/step_graphs.py):
dropout by counter-based hash draws like dropout and draws again the same, and compiled layers
checkpointed without saving torch's generator state recompute the forward's masks, on the real
tiny Phi through the real 4-bit LoRA path. The capture and replay themselves need a GPU
(tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_same_step, demo_lora_model, lora_step, packed_step
from worker.training.nf4 import use_bitsandbytes_matmul, use_plain_4bit_matmul
from worker.training.packing import block_causal_mask
from worker.training.speed import compile_decoder_layers, decoder_layers, restore_decoder_layers
from worker.training.step_graphs import (
    counter_dropout,
    reset_dropout_calls,
    use_counter_dropout,
    use_torch_dropout,
)


def _draw(seed: int, stream: int, p: float = 0.1, shape=(1000, 1000)) -> torch.Tensor:
    return counter_dropout(torch.ones(shape), p, torch.tensor(seed), torch.tensor(stream))


def test_counter_dropout_keeps_each_element_with_probability_1_minus_p_and_repeats_its_draw():
    out = _draw(seed=123, stream=7)
    kept = out != 0
    assert out.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]  # inverted dropout's scale
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.003)  # 10 σ of 1e6 draws
    # no stripes: every row and every column keeps about the same share
    assert kept.float().mean(0).min() > 0.8 and kept.float().mean(1).min() > 0.8
    assert torch.equal(_draw(seed=123, stream=7), out)  # the same arguments, the same mask
    for other in (_draw(seed=124, stream=7), _draw(seed=123, stream=8)):
        agree = ((other != 0) == kept).float().mean().item()
        assert agree == pytest.approx(0.9 * 0.9 + 0.1 * 0.1, abs=0.005)  # independent draws


def test_a_dropout_module_called_twice_in_a_layer_draws_two_masks_and_repeats_them_after_a_reset():
    """Phi's decoder layer calls its resid_dropout twice; the recomputation repeats both."""
    layer = torch.nn.Sequential(torch.nn.Dropout(0.5))
    dropout = use_counter_dropout(layer)
    assert dropout is not None and layer.counter_dropout is dropout
    layer.counter_dropouts = dropout.modules
    torch.manual_seed(0)
    dropout.next_micro_batch()
    x = torch.ones(64, 64)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    reset_dropout_calls(layer)
    assert torch.equal(layer(x), first) and torch.equal(layer(x), second)
    dropout.next_micro_batch()  # a new micro-batch: new masks
    assert not torch.equal(layer(x), first)
    layer.eval()
    assert torch.equal(layer(x), x)
    use_torch_dropout(layer)
    assert not hasattr(layer, "counter_dropout") and "forward" not in vars(layer[0])


@pytest.mark.usefixtures("demo_model")
def test_compiled_layers_checkpointed_without_the_generator_state_recompute_the_forwards_masks():
    """The graphs' layers: counter dropout (LoRA's 0.05 and Phi's 0.1 residual dropout on),
    compiled, checkpointed with preserve_rng_state=False. The loss and the gradients of every
    trainable tensor (random, so that none is zero) equal the eager layers' without
    checkpointing on the same seed: the recomputation dropped what the forward dropped."""
    model, tokenizer, samples = demo_lora_model()
    model.train()
    for layer in decoder_layers(model):  # Phi-2's resid_pdrop (the tiny model's is 0)
        layer.resid_dropout.p = 0.1
    dropout = use_counter_dropout(model)
    assert dropout is not None and {m.p for m in dropout.modules} >= {0.05, 0.1}
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for param in lora.values():  # LoRA B starts at 0: give A's gradients something to carry
        torch.nn.init.normal_(param, std=0.02)
    batch = packed_step(samples, tokenizer.pad_token_id, row_multiple=64)
    mask = block_causal_mask(batch.pop("sequence_ids"), torch.float32)

    def step() -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(1)
        dropout.next_micro_batch()
        return lora_step(model, lora, **batch, attention_mask=mask)

    # the reference recomputes nothing (transformers' own checkpointing would not reset the
    # dropouts' call counts: the graphs' layers are always checkpointed by compile_decoder_layers)
    model.get_base_model().gradient_checkpointing_disable()
    eager_loss, eager_grads = step()
    with torch.no_grad():
        model.eval()
        no_dropout = model(**batch, attention_mask=mask).loss.item()
        model.train()
    assert abs(no_dropout - eager_loss) > 1e-4  # dropout is on
    torch._dynamo.reset()
    use_plain_4bit_matmul(model)
    compile_decoder_layers(  # static shapes: a third of the compile time, the same masks
        model, checkpointing=True, backend="aot_eager", dynamic=False, preserve_rng_state=False
    )
    try:
        compiled_loss, compiled_grads = step()
    finally:
        restore_decoder_layers(model)
        use_bitsandbytes_matmul(model)
        use_torch_dropout(model)
        torch._dynamo.reset()
    assert_same_step((compiled_loss, compiled_grads), (eager_loss, eager_grads))
