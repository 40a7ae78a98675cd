"""Token length statistics of an uploaded dataset under a tokenizer (runs in the worker)."""

from __future__ import annotations

import logging
from typing import Any

from app.services import datasets
from app.spec import DatasetSpec

log = logging.getLogger(__name__)


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def analyze_dataset(dataset_id: str, tokenizer_name: str, max_seq_length: int) -> dict[str, Any]:
    from worker.training.data import conversations_from_records, load_records, tokenize_conversation
    from worker.training.model import load_tokenizer

    base = {"tokenizer": tokenizer_name, "max_seq_length": max_seq_length}
    try:
        tokenizer = load_tokenizer(tokenizer_name)
        spec = DatasetSpec(source=dataset_id, languages=None)
        conversations = conversations_from_records(load_records(spec.source, spec.split), spec)
        lengths, truncated = [], 0
        for turns in conversations.samples:
            # the full length, before truncation, is what a user needs to choose max_seq_length
            sample, _ = tokenize_conversation(turns, tokenizer, 1 << 30, spec.train_on)
            lengths.append(len(sample.input_ids))
            truncated += len(sample.input_ids) > max_seq_length
        lengths.sort()
        stats = {
            **base,
            "status": "done",
            "samples": len(lengths),
            "total": sum(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "p50": percentile(lengths, 0.5),
            "p95": percentile(lengths, 0.95),
            "p99": percentile(lengths, 0.99),
            "max": lengths[-1],
            "over_max_seq_length": truncated,
        }
    except Exception as exc:
        log.exception("dataset %s: token statistics failed", dataset_id)
        stats = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    datasets.set_token_stats(dataset_id, stats)
    return stats
