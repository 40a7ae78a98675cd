"""Packing keeps the loss and the gradients: a packed step equals its samples trained apart,
on the real tiny Phi through the real 4-bit LoRA path."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import demo_lora_model
from worker.training.data import IGNORE_INDEX, TokenizedSample
from worker.training.packing import PackedData, block_causal_mask, collate_packed, plan_steps


def test_steps_hold_every_sample_once_within_the_row_budget():
    rng = random.Random(0)
    lengths = [rng.choice([20, 60, 150, 400, 900, 2048]) for _ in range(500)]
    steps = plan_steps(lengths, samples_per_step=16, rows_per_step=4, row_length=2048, seed=1)

    placed = sorted(i for step in steps for row in step.rows for i in row)
    assert placed == list(range(500))
    for step in steps:
        assert 1 <= len(step.rows) <= 4 and step.samples <= 16
        assert all(sum(lengths[i] for i in row) <= 2048 for row in step.rows)
    # the recipe's 16 samples per step, on average, unless samples are long
    assert 10 < 500 / len(steps) <= 16  # a sixth of these samples fill a row alone
    short = plan_steps([100] * 160, 16, 4, 2048, seed=1)
    assert [step.samples for step in short] == [16] * 10 and all(len(s.rows) == 1 for s in short)


def test_rows_restart_positions_and_ignore_each_samples_first_label():
    samples = [TokenizedSample([1, 2, 3], [1, 2, 3]), TokenizedSample([4, 5], [IGNORE_INDEX, 5])]
    batch = collate_packed([PackedData(samples, plan_steps([3, 2], 2, 1, 8, 0))[0]], pad_token_id=0)
    order = batch["sequence_ids"][0].tolist()
    first = order.index(1)
    assert batch["position_ids"][0].tolist()[: len(order)] == (
        [0, 1, 2, 0, 1] if first == 0 else [0, 1, 0, 1, 2]
    )
    # each sample's first token is never a target (it would be predicted from the other sample)
    assert batch["labels"][0].tolist() == (
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5] if first == 0 else [IGNORE_INDEX, 5, IGNORE_INDEX, 2, 3]
    )
    mask = block_causal_mask(batch["sequence_ids"], torch.float32)[0, 0]
    boundary = 3 if first == 0 else 2
    assert mask[boundary, boundary - 1] < 0 and mask[boundary, boundary] == 0  # no peeking across


def test_one_row_lays_a_steps_rows_end_to_end_and_numbers_their_samples_on():
    samples = [TokenizedSample([t] * n, [t] * n) for t, n in ((1, 5), (2, 3), (3, 4), (4, 2))]
    packed = PackedData(samples, plan_steps([5, 3, 4, 2], 4, 2, 8, seed=0))
    [rows] = [step.rows for step in packed.steps]
    assert len(rows) == 2  # 5 + 3 and 4 + 2 tokens
    apart = collate_packed([packed[0]], pad_token_id=0, row_multiple=4)
    joined = collate_packed([packed[0]], pad_token_id=0, row_multiple=4, one_row=True)

    assert apart["input_ids"].shape == (2, 8) and joined["input_ids"].shape == (1, 16)  # 14 → 16
    real = apart["sequence_ids"] > 0
    for key in ("input_ids", "labels", "position_ids"):  # the rows' tokens, in order, then padding
        assert joined[key][0, :14].tolist() == apart[key][real].tolist()
    # each sample keeps its own number, none shared across rows; padding is 0 at the end
    assert joined["sequence_ids"][0].tolist() == [1] * 5 + [2] * 3 + [3] * 4 + [4] * 2 + [0, 0]
    assert joined["labels"][0, 14:].tolist() == [IGNORE_INDEX] * 2
    assert packed.fill_of(one_row=True, row_multiple=4) == 14 / 16
    assert packed.fill == packed.fill_of() == 14 / 16 and packed.fill_of(row_multiple=4) == 14 / 16
    uneven = PackedData(samples, plan_steps([5, 3, 4, 2], 4, 2, 9, seed=0))  # 5 + 4 and 3 + 2
    assert uneven.fill == 14 / 18 and uneven.fill_of(one_row=True) == 1.0


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
@pytest.mark.parametrize("one_row", [False, True])
def test_a_packed_step_has_the_loss_and_gradients_of_its_samples_apart(one_row):
    model, tokenizer, samples = demo_lora_model()
    model.eval()  # no dropout: the two runs must see the same function
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def grads() -> dict[str, torch.Tensor]:
        out = {name: p.grad.detach().clone() for name, p in lora.items()}
        model.zero_grad()
        return out

    # apart: the token-weighted mean of each sample's own loss
    counts = [sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in samples]
    total = sum(counts)
    apart = 0.0
    for sample, count in zip(samples, counts, strict=True):
        loss = model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels])).loss
        (loss * count / total).backward()
        apart += loss.item() * count / total
    apart_grads = grads()

    lengths = [len(s.input_ids) for s in samples]
    row_length = sum(lengths) // 2 + max(lengths)  # two rows always hold them all
    packed = PackedData(samples, plan_steps(lengths, 6, 2, row_length, seed=0))
    assert len(packed) == 1 and len(packed.steps[0].rows) == 2  # three samples per row
    batch = collate_packed([packed[0]], tokenizer.pad_token_id, row_multiple=64, one_row=one_row)
    assert batch["input_ids"].shape[0] == (1 if one_row else 2)
    mask = block_causal_mask(batch.pop("sequence_ids"), torch.float32)
    loss = model(**batch, attention_mask=mask).loss
    loss.backward()
    packed_grads = grads()

    assert abs(loss.item() - apart) < 1e-3
    for name, grad in apart_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-4, rtol=1e-3), name

    # the mask is what makes it right: without it, samples in a row see each other
    naive = model(**{k: v for k, v in batch.items() if k != "position_ids"}).loss
    print(f"FIGURE packing: packed loss {loss.item():.6f}, apart {apart:.6f}, naive {naive.item():.6f}")
    assert abs(naive.item() - apart) > abs(loss.item() - apart)
