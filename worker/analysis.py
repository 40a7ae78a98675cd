"""Token length statistics of an uploaded dataset under a tokenizer, measured on a bounded
sample of it (runs in `finetune sampler`, beside samples, so it never waits behind training and
takes seconds whatever the file's size)."""

from __future__ import annotations

import logging
import random
from itertools import islice
from pathlib import Path
from typing import Any

from app.dataset_report import numbered_records
from app.services import datasets
from app.services.dataset_files import dataset_file
from app.spec import DEFAULT_BASE_MODEL, DatasetSpec

log = logging.getLogger(__name__)

# At most this many records are read (from the start of the file: oasst1 exports keep each
# tree's messages together), and at most this many samples, drawn at random, tokenized.
MAX_RECORDS_READ = 20_000
MAX_SAMPLES_MEASURED = 2_000


# An upload that names no tokenizer is measured with the seed recipe's base's (microsoft/phi-2),
# read from the copy of its tokenizer files the service ships with its demo model: statistics
# look the hub up only for a hub tokenizer the upload names.
SHIPPED_TOKENIZERS = {DEFAULT_BASE_MODEL: Path(__file__).resolve().parent.parent / "examples" / "tiny-phi2"}


def load_statistics_tokenizer(name: str) -> tuple[Any, str]:
    """The tokenizer `name` and where it was read from (said in the upload's report)."""
    from transformers import AutoTokenizer

    from worker.training.model import load_tokenizer

    shipped = SHIPPED_TOKENIZERS.get(name)
    if shipped is not None and (shipped / "tokenizer.json").is_file():
        # the service's own files, wherever the operator's local roots are
        return AutoTokenizer.from_pretrained(shipped), f"{shipped} (the service's copy of {name}'s tokenizer)"
    return load_tokenizer(name), name if Path(name).is_absolute() else "the Hugging Face hub"


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def analyze_dataset(dataset_id: str, tokenizer_name: str, max_seq_length: int) -> dict[str, Any]:
    from worker.training.data import conversations_from_records, tokenize_conversation

    base: dict[str, Any] = {"tokenizer": tokenizer_name, "max_seq_length": max_seq_length}
    try:
        tokenizer, base["read_from"] = load_statistics_tokenizer(tokenizer_name)
        spec = DatasetSpec(source=dataset_id, languages=None)
        read = islice(numbered_records(dataset_file(dataset_id)), MAX_RECORDS_READ)
        records = [record for _, record, problem in read if problem is None]
        samples = conversations_from_records(records, spec).samples
        measured = random.Random(0).sample(samples, min(len(samples), MAX_SAMPLES_MEASURED))
        lengths, truncated = [], 0
        for turns in measured:
            # the full length, before truncation, is what a user needs to choose max_seq_length
            sample, _ = tokenize_conversation(turns, tokenizer, 1 << 30, spec.train_on)
            lengths.append(len(sample.input_ids))
            truncated += len(sample.input_ids) > max_seq_length
        lengths.sort()
        stats = {
            **base,
            "status": "done",
            "samples": len(lengths),
            # measured on a sample: `samples` of the file's first `records_read` records
            "sampled": len(measured) < len(samples) or len(records) == MAX_RECORDS_READ,
            "records_read": len(records),
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
