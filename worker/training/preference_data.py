"""From a dataset spec to tokenized preference pairs (method dpo): each side is the prompt and one
completion, tokenized as a supervised sample is (worker.training.data.tokenize_conversation), with
labels on the completion only: the tokens whose log-probability DPO sums."""

from __future__ import annotations

from dataclasses import dataclass

from app.conversations import flatten_trees
from app.formats import detect_format
from app.preferences import (
    PAIR_FORMATS,
    THREAD_FORMATS,
    Pair,
    Pairs,
    method_fit_problem,
    pairs_from_records,
    ranked_pairs_from_rows,
)
from app.spec import DPO, DatasetSpec
from worker.training.data import TokenizedSample, load_eval_records, load_records, tokenize_conversation


@dataclass
class TokenizedPair:
    chosen: TokenizedSample
    rejected: TokenizedSample


@dataclass
class PairData:
    pairs: list[TokenizedPair]
    truncated: int  # sides that lost context from the left
    dropped: dict[str, int]

    def __len__(self) -> int:
        return len(self.pairs)


def pairs_from_dataset_records(records: list[dict], spec: DatasetSpec) -> Pairs:
    """The pairs a dataset's records hold: pair records as they are, oasst1 threads by their
    replies' ranks. ValueError, naming the method that fits, for any other format."""
    if not records:
        return Pairs([])
    fmt = detect_format(records[0]) if spec.format == "auto" else spec.format
    if fmt in PAIR_FORMATS:
        return pairs_from_records(records, fmt)
    if fmt in THREAD_FORMATS:
        rows = flatten_trees(records) if fmt == "oasst_trees" else records
        return ranked_pairs_from_rows(rows, spec.languages, include_synthetic=spec.include_synthetic)
    raise ValueError(f"dataset {spec.source!r}: {method_fit_problem(fmt, DPO)}")


def tokenize_pair(pair: Pair, tokenizer, max_length: int, template: str) -> tuple[TokenizedPair, int]:
    """Both sides of a pair, and how many of them were truncated (context lost from the left)."""
    chosen, chosen_cut = tokenize_conversation(
        pair.prompt + pair.chosen, tokenizer, max_length, "assistant", template
    )
    rejected, rejected_cut = tokenize_conversation(
        pair.prompt + pair.rejected, tokenizer, max_length, "assistant", template
    )
    return TokenizedPair(chosen, rejected), chosen_cut + rejected_cut


def _tokenized(pairs: Pairs, spec: DatasetSpec, tokenizer, max_length: int, limit: int | None) -> PairData:
    chosen = pairs.pairs[:limit] if limit else pairs.pairs
    tokenized, truncated = [], 0
    for pair in chosen:
        both, cut = tokenize_pair(pair, tokenizer, max_length, spec.template)
        tokenized.append(both)
        truncated += cut
    if not tokenized:
        raise ValueError(
            f"dataset {spec.source!r} produced no preference pairs (dropped: {dict(pairs.dropped)}); "
            "oasst1 data needs prompts with two or more ranked replies"
        )
    return PairData(tokenized, truncated, dict(pairs.dropped))


def build_pair_data(spec: DatasetSpec, tokenizer, max_length: int) -> PairData:
    records = load_records(spec.source, spec.split)
    return _tokenized(
        pairs_from_dataset_records(records, spec), spec, tokenizer, max_length, spec.max_samples
    )


def build_eval_pair_data(spec: DatasetSpec, tokenizer, max_length: int) -> PairData | None:
    """The validation pairs, or None when the spec names no validation data."""
    records = load_eval_records(spec)
    if records is None:
        return None
    pairs = pairs_from_dataset_records(records, spec)
    return _tokenized(pairs, spec, tokenizer, max_length, spec.max_eval_samples)
