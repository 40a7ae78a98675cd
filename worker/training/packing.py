"""Padding-free packing: each optimizer step's samples packed into a few long rows, with
positions restarting per sample and attention confined to each sample.

The recipe keeps its meaning. `batch_size × gradient_accumulation_steps` samples make one
optimizer step (16 in the default recipe), as without packing, so an epoch has the same
number of steps and the same LR schedule. They are packed best-fit into at most `batch_size`
rows of `max_seq_length` tokens: one micro-batch per step, never larger than the unpacked
recipe's (`batch_size × max_seq_length` tokens). A sample that doesn't fit goes to the next
step, so a step holds 16 samples on average unless samples are very long (the data event
reports the exact average). The loss is the mean over the step's trained tokens, which is
what the unpacked recipe's gradient accumulation computes too.

Samples never see each other: the collator hands the trainer a per-token sample number, and
`block_causal_mask` turns it into a 4D mask on the GPU (sample-diagonal and causal), where it
costs a few MiB. A sample's first label is ignored, so no token is trained to predict the
start of the next sample.

Where the decoder layers are compiled (`SpeedPlan.one_row`) the collator lays a step's rows end
to end as one row (`collate_packed(one_row=True)`): the attention is the same (each sample still
sees only itself, by its own sample number), the rows' padding to the longest is gone (the default
recipe's computed tokens: 78 % real in rows, 97 % in one row), and the compiled layers always meet
one batch size, which they would otherwise compile again for (a step of one row after steps of
two: dynamo specializes a size of 1).

Full-row mode (`plan_full_rows`, `training.packing_mode: "full_rows"`) is the other
choice, and not the seed's recipe: all samples are packed best-fit into rows filled close to
`max_seq_length`, an item is one micro-batch of `batch_size` full rows and an optimizer step
is `gradient_accumulation_steps` of them — the seed's 16 rows of 2048 per step, filled with
real tokens instead of padding. An epoch then has ~16× fewer optimizer steps (oasst1-en:
~150 instead of ~2,450), each averaging ~16× more tokens; docs/benchmarks.md says how to set
the learning rate for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from worker.training.data import IGNORE_INDEX, TokenizedSample


@dataclass
class PackedStep:
    """The samples of one optimizer step, as rows of sample indices."""

    rows: list[list[int]]

    @property
    def samples(self) -> int:
        return sum(len(row) for row in self.rows)


def plan_steps(
    lengths: list[int], samples_per_step: int, rows_per_step: int, row_length: int, seed: int
) -> list[PackedStep]:
    """Shuffle the samples (seeded), then fill steps of `samples_per_step` samples, each packed
    best-fit decreasing into at most `rows_per_step` rows of `row_length` tokens."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    steps: list[PackedStep] = []
    waiting = order
    while waiting:
        candidates, waiting = waiting[:samples_per_step], waiting[samples_per_step:]
        rows: list[list[int]] = []
        free: list[int] = []
        deferred = []
        for index in sorted(candidates, key=lambda i: -lengths[i]):
            need = lengths[index]
            fits = [r for r in range(len(rows)) if free[r] >= need]
            if fits:
                best = min(fits, key=lambda r: free[r])
                rows[best].append(index)
                free[best] -= need
            elif len(rows) < rows_per_step:
                rows.append([index])
                free.append(row_length - need)
            else:
                deferred.append(index)
        steps.append(PackedStep(rows))
        waiting = deferred + waiting
    return steps


def plan_full_rows(
    lengths: list[int], rows_per_item: int, row_length: int, seed: int, window: int = 512
) -> list[PackedStep]:
    """Shuffle the samples (seeded), pack each window of `window` samples best-fit decreasing
    into rows of `row_length` tokens, and cut the rows into items of `rows_per_item` rows.
    Every sample is placed once; a window's rows are ~97 % full for oasst-like lengths."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        window_rows: list[list[int]] = []
        free: list[int] = []
        for index in chunk:
            need = min(lengths[index], row_length)
            best = -1
            for r, room in enumerate(free):
                if room >= need and (best < 0 or room < free[best]):
                    best = r
            if best >= 0:
                window_rows[best].append(index)
                free[best] -= need
            else:
                window_rows.append([index])
                free.append(row_length - need)
        rows += window_rows
    # rows in a seeded random order, so long and short rows mix across items
    random.Random(seed + 1).shuffle(rows)
    return [PackedStep(rows[i : i + rows_per_item]) for i in range(0, len(rows), rows_per_item)]


class PackedData:
    """A training set whose items are whole optimizer steps (the trainer's batch size is 1)."""

    def __init__(self, samples: list[TokenizedSample], steps: list[PackedStep]):
        self.samples = samples
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> dict[str, list[list[int]]]:
        rows: dict[str, list[list[int]]] = {
            "input_ids": [],
            "labels": [],
            "position_ids": [],
            "sequence_ids": [],
        }
        for row in self.steps[index].rows:
            input_ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            sequences: list[int] = []
            for number, sample_index in enumerate(row, start=1):
                sample = self.samples[sample_index]
                input_ids += sample.input_ids
                labels += [IGNORE_INDEX] + sample.labels[1:]
                positions += range(len(sample.input_ids))
                sequences += [number] * len(sample.input_ids)
            for key, values in zip(rows, (input_ids, labels, positions, sequences), strict=True):
                rows[key].append(values)
        return rows

    @property
    def mean_samples_per_step(self) -> float:
        return len(self.samples) / max(1, len(self.steps))

    @property
    def fill(self) -> float:
        """Share of the computed (row × longest row) tokens that are real."""
        return self.fill_of()

    def fill_of(self, one_row: bool = False, row_multiple: int = 1) -> float:
        """Share of the computed tokens that are real, as `collate_packed` lays the steps out."""
        real = sum(len(s.input_ids) for s in self.samples)
        computed = 0
        for step in self.steps:
            lengths = [sum(len(self.samples[i].input_ids) for i in row) for row in step.rows]
            rows, width = (1, sum(lengths)) if one_row else (len(lengths), max(lengths))
            computed += rows * -(-width // row_multiple) * row_multiple
        return real / max(1, computed)


def collate_packed(
    items: list[dict[str, list[list[int]]]], pad_token_id: int, row_multiple: int = 1, one_row: bool = False
) -> dict[str, torch.Tensor]:
    """One step's rows, padded to the longest row rounded up to `row_multiple` (sequence id 0
    marks padding: it carries no loss and no sample sees it). `one_row`: the rows end to end as
    one row, their samples numbered on from row to row (see the module's doc)."""
    [step] = items
    if one_row:
        step = _end_to_end(step)
    width = max(len(row) for row in step["input_ids"])
    width = -(-width // row_multiple) * row_multiple
    pads = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "position_ids": 0, "sequence_ids": 0}
    return {
        key: torch.tensor([row + [pads[key]] * (width - len(row)) for row in rows], dtype=torch.long)
        for key, rows in step.items()
    }


# A trainer batch's count of real (non-padding) tokens: an int the host knows without reading
# anything back from the GPU (the Trainer's own count waits for the GPU every micro-batch).
INPUT_TOKENS = "input_tokens"


def collate_step(
    items: list[dict[str, list[list[int]]]], pad_token_id: int, row_multiple: int = 1, one_row: bool = False
) -> dict[str, Any]:
    """What the packed Trainer's data loader yields: `collate_packed`'s tensors and the step's
    `INPUT_TOKENS` (worker.training.trainer.PackedTrainer counts them)."""
    [step] = items
    tokens = sum(len(row) for row in step["input_ids"])
    return {**collate_packed(items, pad_token_id, row_multiple, one_row), INPUT_TOKENS: tokens}


def _end_to_end(step: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """A step's rows as one row; each row's sample numbers continue after the previous row's."""
    joined: dict[str, list[int]] = {key: [] for key in step}
    numbered = 0
    for index in range(len(step["input_ids"])):
        for key, rows in step.items():
            row = rows[index]
            joined[key] += [number + numbered for number in row] if key == "sequence_ids" else row
        numbered += max(step["sequence_ids"][index], default=0)
    return {key: [row] for key, row in joined.items()}


def block_causal_mask(
    sequence_ids: torch.Tensor, dtype: torch.dtype, branch_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Additive 4D mask (batch, 1, T, T): a token sees earlier tokens of its own sample only.
    Padding sees itself, so no row of the softmax is empty. `branch_ids` (a DPO pair packed with
    its prompt once, worker.training.dpo): a token also sees only branch 0 (the prompt) and its
    own branch, so each completion sees the prompt and itself, not the other completion."""
    width = sequence_ids.shape[1]
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = same & causal
    if branch_ids is not None:
        allowed &= (branch_ids[:, None, :] == 0) | (branch_ids[:, None, :] == branch_ids[:, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
