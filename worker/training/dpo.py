"""Direct Preference Optimization on packed pairs: the loss, the figures, and the Trainer.

A step takes `batch_size × gradient_accumulation_steps` pairs, as a supervised step takes that
many samples. Both sides of every pair go through the padding-free packing of
worker.training.packing: they are packed best-fit into micro-batches of at most `batch_size`
rows of `max_seq_length` tokens (the supervised recipe's micro-batch), each sample attending
only to itself, both sides of a pair in the same micro-batch, as many micro-batches as the
step's pairs need. Each micro-batch runs one forward of the policy (the adapter on) and one
without gradients of the reference: the base with the adapter switched off (no second copy of
the model), or, for a job that continues from an earlier adapter, that adapter kept frozen
under the name `reference` (its LoRA weights), in evaluation mode (no dropout: it scores a pair
the same way every time; TRL switches dropout off altogether). Biases a job trains (`lora.bias`)
change the base in place, which no adapter switch undoes: the reference forward runs with their
starting values (TRL's would use the trained ones).

Only completion tokens (a side's reply) are scored: their hidden states are gathered (at
positions the collator computed on the host, so nothing waits for the GPU) and turned into
log-probabilities by `fused_loss.linear_log_probs`, a chunk at a time, so the vocabulary-wide
logits never exist. A side's log-probability is the sum over its completion tokens, and the
loss is TRL 1.16's DPOTrainer's for the same model, batch and beta (tests/test_dpo.py):

    sigmoid: -log σ(β·Δ) (with label smoothing ε: -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ))
    ipo:     (Δ̄ - 1/(2β))², Δ̄ the log-ratios averaged per completion token
    hinge:   max(0, 1 - β·Δ)

where Δ = (log π(chosen) - log π_ref(chosen)) - (log π(rejected) - log π_ref(rejected)). The
step's loss is the mean over its pairs. The implicit rewards are β·(log π - log π_ref) of each
side; the figures logged beside the loss (named as TRL names them) are their means, their
margin, and the share of pairs whose chosen side has the larger reward.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from app.spec import DpoHyperparameters
from worker.training.data import IGNORE_INDEX
from worker.training.fused_loss import linear_log_probs
from worker.training.packing import INPUT_TOKENS, block_causal_mask
from worker.training.preference_data import TokenizedPair
from worker.training.speed import document_block_mask
from worker.training.trainer import ServiceTrainer

# The adapter a job that continues from an earlier one keeps frozen as its reference.
REFERENCE_ADAPTER = "reference"
# What a packed unit of a pair holds: one side alone, or the prompt once with both completions
# after it (SHARED).
CHOSEN, REJECTED, SHARED = 0, 1, 2

# A micro-batch: rows of (pair index, unit index) units.
MicroBatch = list[list[tuple[int, int]]]


@dataclass
class PairStep:
    """The pairs of one optimizer step, packed into micro-batches of rows."""

    micro_batches: list[MicroBatch]

    @property
    def pairs(self) -> int:
        return len({pair for micro in self.micro_batches for row in micro for pair, _ in row})


def shared_prompt_length(pair: TokenizedPair) -> int:
    """How many tokens both sides start with before either's completion: the prompt, unless the
    sides were truncated differently."""
    chosen, rejected = pair.chosen, pair.rejected
    shared = 0
    while (
        shared < min(len(chosen.input_ids), len(rejected.input_ids))
        and chosen.input_ids[shared] == rejected.input_ids[shared]
        and chosen.labels[shared] == rejected.labels[shared] == IGNORE_INDEX
    ):
        shared += 1
    return shared


def unit_length(pair: TokenizedPair, kind: int) -> int:
    """The tokens a unit of `pair` puts in its row (`unit_piece`'s, without building it)."""
    chosen, rejected = len(pair.chosen.input_ids), len(pair.rejected.input_ids)
    if kind == SHARED:
        return chosen + rejected - shared_prompt_length(pair)
    return chosen if kind == CHOSEN else rejected


def pair_units(pair: TokenizedPair, row_length: int, share_prompt: bool = True) -> tuple[int, ...]:
    """The kinds of the units a pair is packed as: the prompt once with both completions after
    it, where that fits a row (and `share_prompt`); else each side on its own."""
    if share_prompt and shared_prompt_length(pair) and unit_length(pair, SHARED) <= row_length:
        return (SHARED,)
    return (CHOSEN, REJECTED)


@dataclass
class Piece:
    """What one unit puts in its row: its tokens, their positions, their branch (0: a prompt,
    or a side on its own; 1 and 2: the chosen and the rejected completion after a shared prompt,
    which see the prompt and themselves only), and the tokens scored: (side, index of the token
    that predicts it, the token)."""

    pair: int  # the pair's index in its data set
    input_ids: list[int]
    positions: list[int]
    branches: list[int]
    scored: list[tuple[int, int, int]]


def unit_piece(pair: TokenizedPair, kind: int, index: int = 0) -> Piece:
    if kind != SHARED:
        sample = pair.chosen if kind == CHOSEN else pair.rejected
        ids, labels = sample.input_ids, sample.labels
        scored = [(kind, j - 1, ids[j]) for j in range(1, len(ids)) if labels[j] != IGNORE_INDEX]
        return Piece(index, ids, list(range(len(ids))), [0] * len(ids), scored)
    shared = shared_prompt_length(pair)
    chosen, rejected = pair.chosen, pair.rejected
    after = len(chosen.input_ids)  # the rejected completion follows the chosen one
    scored = [
        (CHOSEN, j - 1, chosen.input_ids[j])
        for j in range(1, len(chosen.input_ids))
        if chosen.labels[j] != IGNORE_INDEX
    ]
    scored += [
        (REJECTED, j - 1 if j - 1 < shared else after + j - 1 - shared, rejected.input_ids[j])
        for j in range(1, len(rejected.input_ids))
        if rejected.labels[j] != IGNORE_INDEX
    ]
    return Piece(
        index,
        chosen.input_ids + rejected.input_ids[shared:],
        list(range(after)) + list(range(shared, len(rejected.input_ids))),
        [0] * shared + [1] * (after - shared) + [2] * (len(rejected.input_ids) - shared),
        scored,
    )


def plan_pair_steps(
    lengths: list[tuple[int, ...]],
    pairs_per_step: int,
    rows_per_micro_batch: int,
    row_length: int,
    seed: int,
) -> list[PairStep]:
    """Shuffle the pairs (seeded), take `pairs_per_step` at a time, and pack each step's pairs,
    longest first, all units of a pair (`lengths[pair]`: one, or its two sides) into one
    micro-batch: best-fit into its rows (at most `rows_per_micro_batch`, and at least 2 so that
    any pair fits), a new micro-batch when no open one has room for all of them."""
    rows = max(2, rows_per_micro_batch)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    steps = []
    for start in range(0, len(order), pairs_per_step):
        candidates = sorted(order[start : start + pairs_per_step], key=lambda i: -sum(lengths[i]))
        micro_batches: list[MicroBatch] = []
        room: list[list[int]] = []  # each micro-batch's free tokens per row
        for pair in candidates:
            placed = any(
                _place_pair(micro, free, pair, lengths[pair], rows, row_length)
                for micro, free in zip(micro_batches, room, strict=True)
            )
            if not placed:  # a new micro-batch holds any pair: each side fits a row
                micro_batches.append([])
                room.append([])
                _place_pair(micro_batches[-1], room[-1], pair, lengths[pair], rows, row_length)
        steps.append(PairStep(micro_batches))
    return steps


def _place_pair(
    micro: MicroBatch, free: list[int], pair: int, sides: tuple[int, ...], rows: int, row_length: int
) -> bool:
    """Every unit of `pair` into `micro`'s rows (best fit, new rows up to `rows`), or none."""
    taken: list[tuple[int, int]] = []  # (row, length) placed so far, to undo
    opened = len(micro)
    for side, need in enumerate(sides):
        fits = [r for r in range(len(micro)) if free[r] >= need]
        if fits:
            row = min(fits, key=lambda r: free[r])
        elif len(micro) < rows:
            micro.append([])
            free.append(row_length)
            row = len(micro) - 1
        else:
            for row, need_back in taken:
                micro[row].pop()
                free[row] += need_back
            del micro[opened:], free[opened:]
            return False
        micro[row].append((pair, side))
        free[row] -= need
        taken.append((row, need))
    return True


class PackedPairs:
    """A DPO training set whose items are whole optimizer steps (the Trainer's batch size is 1)."""

    def __init__(
        self,
        pairs: list[TokenizedPair],
        units: list[tuple[int, ...]],
        lengths: list[tuple[int, ...]],
        steps: list[PairStep],
    ):
        self.pairs = pairs
        self.units = units  # each pair's unit kinds (`pair_units`)
        self.lengths = lengths  # and their lengths (`unit_length`)
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def piece(self, pair: int, unit: int) -> Piece:
        return unit_piece(self.pairs[pair], self.units[pair][unit], pair)

    def __getitem__(self, index: int) -> dict[str, Any]:
        step = self.steps[index]
        return {
            "micro_batches": [
                [[self.piece(p, u) for p, u in row] for row in micro] for micro in step.micro_batches
            ],
            "pairs": step.pairs,
        }

    @property
    def shared_share(self) -> float:
        """Share of the pairs packed with their prompt once."""
        return sum(units == (SHARED,) for units in self.units) / max(1, len(self.units))

    @property
    def fill(self) -> float:
        """Share of the computed (micro-batch rows × longest row) tokens that are real."""
        real = computed = 0
        for step in self.steps:
            for micro in step.micro_batches:
                widths = [sum(self.lengths[p][u] for p, u in row) for row in micro]
                real += sum(widths)
                computed += max(widths) * len(micro)
        return real / max(1, computed)


def pack_pairs(
    pairs: list[TokenizedPair],
    pairs_per_step: int,
    rows_per_micro_batch: int,
    row_length: int,
    seed: int,
    share_prompts: bool = True,
) -> PackedPairs:
    """`pairs` in steps of `pairs_per_step`, each pair's prompt computed once where the pair fits
    a row (`pair_units`; `share_prompts=False`: every side on its own, for comparison)."""
    units = [pair_units(pair, row_length, share_prompts) for pair in pairs]
    lengths = [
        tuple(unit_length(pair, kind) for kind in kinds) for pair, kinds in zip(pairs, units, strict=True)
    ]
    steps = plan_pair_steps(lengths, pairs_per_step, rows_per_micro_batch, row_length, seed)
    return PackedPairs(pairs, units, lengths, steps)


def collate_micro_batch(
    rows: list[list[Piece]], pad_token_id: int, row_multiple: int
) -> dict[str, torch.Tensor]:
    """One micro-batch's packed rows, and where its completion tokens are, all worked out on the
    host: `sequence_ids` (a unit's number across the micro-batch, 0 for padding) and
    `branch_ids` (`Piece.branches`) for the attention mask, `positions` (flat index into rows ×
    width of each token that predicts a completion token), `targets` (that token),
    `target_sequence` (which side of which pair it scores, numbered across the micro-batch),
    `chosen` / `rejected` (each pair's two sides), `completion_tokens` (per side)."""
    width = max(sum(len(piece.input_ids) for piece in row) for row in rows)
    width = -(-width // row_multiple) * row_multiple
    columns: dict[str, list[list[int]]] = {
        "input_ids": [],
        "position_ids": [],
        "sequence_ids": [],
        "branch_ids": [],
    }
    positions, targets, target_sequence = [], [], []
    sides: dict[tuple[int, int], int] = {}  # (pair, side) → its number among the sides
    completion_tokens: list[int] = []
    unit = 0
    for r, row in enumerate(rows):
        ids: list[int] = []
        position_ids: list[int] = []
        sequence_ids: list[int] = []
        branch_ids: list[int] = []
        for piece in row:
            unit += 1
            offset = len(ids)
            for side, at, target in piece.scored:
                number = sides.setdefault((piece.pair, side), len(completion_tokens))
                if number == len(completion_tokens):
                    completion_tokens.append(0)
                positions.append(r * width + offset + at)
                targets.append(target)
                target_sequence.append(number)
                completion_tokens[number] += 1
            ids += piece.input_ids
            position_ids += piece.positions
            sequence_ids += [unit] * len(piece.input_ids)
            branch_ids += piece.branches
        pad = width - len(ids)
        columns["input_ids"].append(ids + [pad_token_id] * pad)
        for name, values in (
            ("position_ids", position_ids),
            ("sequence_ids", sequence_ids),
            ("branch_ids", branch_ids),
        ):
            columns[name].append(values + [0] * pad)
    pairs = sorted({pair for pair, _ in sides})
    return {
        **{name: torch.tensor(values, dtype=torch.long) for name, values in columns.items()},
        "positions": torch.tensor(positions, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "target_sequence": torch.tensor(target_sequence, dtype=torch.long),
        "completion_tokens": torch.tensor(completion_tokens, dtype=torch.long),
        "chosen": torch.tensor([sides[(pair, CHOSEN)] for pair in pairs], dtype=torch.long),
        "rejected": torch.tensor([sides[(pair, REJECTED)] for pair in pairs], dtype=torch.long),
    }


def collate_pair_step(
    items: list[dict[str, Any]], pad_token_id: int, row_multiple: int = 1
) -> dict[str, Any]:
    """What the DPO Trainer's data loader yields: the step's micro-batches (`collate_micro_batch`),
    its pair count and its real tokens (`INPUT_TOKENS`, counted on the host)."""
    [step] = items
    micro_batches = [collate_micro_batch(rows, pad_token_id, row_multiple) for rows in step["micro_batches"]]
    tokens = sum(len(piece.input_ids) for micro in step["micro_batches"] for row in micro for piece in row)
    return {"micro_batches": micro_batches, "pairs": step["pairs"], INPUT_TOKENS: tokens}


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    settings: DpoHyperparameters,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pair's loss, and the chosen and rejected sides' implicit rewards (detached), as TRL
    1.16's DPOTrainer computes them (f-divergence reverse KL, one loss type)."""
    beta = settings.beta
    chosen_ratios = chosen_logps - reference_chosen_logps
    rejected_ratios = rejected_logps - reference_rejected_logps
    delta = chosen_ratios - rejected_ratios
    if settings.loss_type == "sigmoid":
        smoothing = settings.label_smoothing
        losses = -F.logsigmoid(beta * delta) * (1 - smoothing) - F.logsigmoid(-beta * delta) * smoothing
    elif settings.loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif settings.loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss averages per completion token: pass the token counts")
        averaged = chosen_ratios / chosen_tokens.clamp(min=1) - rejected_ratios / rejected_tokens.clamp(min=1)
        losses = (averaged - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {settings.loss_type!r}")
    return losses, beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


# The figures logged beside the loss, named as TRL's DPOTrainer names them.
FIGURES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class FigureSums:
    """Sums over the pairs seen since the last log, kept on the device (read when logged)."""

    pairs: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(
        self, loss_sum: torch.Tensor, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps
    ) -> None:
        values = {
            "loss": loss_sum.detach(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": chosen_logps.detach().sum(),
            "logps/rejected": rejected_logps.detach().sum(),
        }
        for name, value in values.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.pairs += chosen_rewards.shape[0]

    def means(self) -> dict[str, float]:
        """The mean of each figure (and the loss) per pair, then reset."""
        if not self.pairs:
            return {}
        means = {name: float(value) / self.pairs for name, value in self.sums.items()}
        self.pairs, self.sums = 0, {}
        return means


def sequence_logps(model: Any, micro: dict[str, torch.Tensor], mask: Any, head: Any) -> torch.Tensor:
    """Each sample's summed log-probability of its completion tokens (float32). `head`: the
    lm_head taken out of the forward (`fused_loss.use_hidden_states_head`), or None where the
    model's forward still computes the logits."""
    outputs = model(
        input_ids=micro["input_ids"], position_ids=micro["position_ids"], attention_mask=mask, use_cache=False
    )
    states = outputs.logits  # the last hidden states where the head was taken out
    picked = states.reshape(-1, states.shape[-1]).index_select(0, micro["positions"])
    targets = micro["targets"]
    if head is not None:
        token_logps = linear_log_probs(picked, head.weight, head.bias, targets)
    else:
        token_logps = torch.log_softmax(picked.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    samples = micro["completion_tokens"].shape[0]
    sums = torch.zeros(samples, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, micro["target_sequence"], token_logps)


@dataclass
class ScoredPairs:
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor  # β·(log π − log π_ref), detached
    rejected_rewards: torch.Tensor
    logps: tuple[torch.Tensor, torch.Tensor]  # the policy's (chosen, rejected) log-probabilities


def score_pairs(
    model: Any,
    micro: dict[str, torch.Tensor],
    settings: DpoHyperparameters,
    head: Any,
    reference_adapter: str | None,
    mask_kind: str = "sdpa",
    mask_dtype: torch.dtype = torch.float32,
    reference_biases: dict[torch.nn.Parameter, torch.Tensor] | None = None,
) -> ScoredPairs:
    """The pairs of one collated micro-batch (`collate_micro_batch`): the reference's forward
    without gradients, the policy's, and DPO's loss of each pair."""
    sequence_ids, branch_ids = micro["sequence_ids"], micro["branch_ids"]
    if mask_kind == "flex":
        mask = document_block_mask(sequence_ids, branch_ids)
    else:
        mask = block_causal_mask(sequence_ids, mask_dtype, branch_ids)
    with torch.no_grad(), reference_model(_unwrapped(model), reference_adapter, reference_biases):
        reference = sequence_logps(model, micro, mask, head)
    policy = sequence_logps(model, micro, mask, head)
    chosen, rejected, tokens = micro["chosen"], micro["rejected"], micro["completion_tokens"]
    losses, chosen_rewards, rejected_rewards = dpo_losses(
        policy[chosen],
        policy[rejected],
        reference[chosen],
        reference[rejected],
        settings,
        tokens[chosen],
        tokens[rejected],
    )
    return ScoredPairs(losses, chosen_rewards, rejected_rewards, (policy[chosen], policy[rejected]))


def _unwrapped(model: Any) -> Any:
    """The peft model under a data-parallel wrapper."""
    return getattr(model, "module", model)


@contextmanager
def reference_model(
    model: Any, adapter: str | None, biases: dict[torch.nn.Parameter, torch.Tensor] | None = None
) -> Iterator[None]:
    """The reference policy: `adapter` (frozen) active, or every adapter off (the base); trained
    biases (`lora.bias`), which no adapter switch undoes, at their starting values
    (`starting_biases`); and no dropout (evaluation mode: the base's own, Phi-2's 0.1 on the
    residuals, too), so the reference scores a pair the same way every time."""
    swapped = dict(biases or {})
    for parameter, start in swapped.items():
        parameter.data, swapped[parameter] = start, parameter.data
    training = model.training
    model.eval()
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            previous = model.active_adapter
            model.set_adapter(adapter)
            try:
                yield
            finally:
                model.set_adapter(previous)
    finally:
        model.train(training)
        for parameter, trained in swapped.items():
            parameter.data = trained


def starting_biases(model: torch.nn.Module) -> dict[torch.nn.Parameter, torch.Tensor]:
    """A copy of each trained parameter that is no LoRA weight (the biases `lora.bias` trains in
    place), as it is before training: the reference's."""
    return {
        p: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n
    }


class DpoTrainer(ServiceTrainer):
    """Trains packed pair steps (`collate_pair_step`'s batches) with the DPO loss; logs DPO's
    figures beside the loss, and the eval set's with `eval_` in front."""

    mask_dtype: torch.dtype = torch.float32
    mask_kind: str = "sdpa"  # "flex": a FlexAttention BlockMask (worker.training.speed)

    def __init__(
        self,
        *args: Any,
        settings: DpoHyperparameters,
        head: torch.nn.Linear | None,
        reference_adapter: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.head = head  # lm_head, taken out of the forward (None: the model's logits are used)
        self.reference_adapter = reference_adapter
        self.reference_biases = starting_biases(self.model)
        self.figures = {"train": FigureSums(), "eval": FigureSums()}

    # a step

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        tokens = inputs.get(INPUT_TOKENS)
        if tokens is not None and self.args.include_num_input_tokens_seen == "no":
            self.state.num_input_tokens_seen += tokens
        inputs = self._prepare_inputs(inputs)
        total = None
        micro_batches = inputs["micro_batches"]
        for index, micro in enumerate(micro_batches):
            # data-parallel: gradients are all-reduced once a step, with its last micro-batch
            last = index == len(micro_batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    loss = self.micro_batch_loss(model, micro, inputs["pairs"], self.figures["train"])
                self.accelerator.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = sum(
                self.micro_batch_loss(model, micro, inputs["pairs"], self.figures["eval"])
                for micro in inputs["micro_batches"]
            )
        return loss, None, None

    def micro_batch_loss(
        self, model: Any, micro: dict[str, torch.Tensor], step_pairs: int, figures: FigureSums
    ) -> torch.Tensor:
        """This micro-batch's pairs' summed loss over the step's pair count (so a step's
        micro-batches add up to the mean over its pairs); their figures go to `figures`."""
        scored = score_pairs(
            model,
            micro,
            self.settings,
            self.head,
            self.reference_adapter,
            self.mask_kind,
            self.mask_dtype,
            self.reference_biases,
        )
        figures.add(scored.losses.sum(), scored.chosen_rewards, scored.rejected_rewards, *scored.logps)
        return scored.losses.sum() / step_pairs

    # logs and saves

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            means = self.figures["train"].means()
            means.pop("loss", None)
            logs.update(means)
        if "eval_loss" in logs:
            means = self.figures["eval"].means()
            if "loss" in means:  # the exact mean over the eval pairs
                logs["eval_loss"] = means.pop("loss")
            logs.update({f"eval_{name}": value for name, value in means.items()})
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final adapter hold the trained adapter only, not the frozen
        reference."""
        if self.reference_adapter is None:
            return super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained = partial(model.save_pretrained, selected_adapters=[model.active_adapter])
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained
