"""From a dataset spec to tokenized training samples with loss masks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from app.spec import DatasetSpec, split_revision
from worker.training.conversations import ASSISTANT, Conversations, Turn, conversations_from_rows

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value carry no loss
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_rows(spec: DatasetSpec) -> list[dict]:
    """Message rows from the hub (`datasets.load_dataset`) or a local file or folder."""
    import datasets

    path = Path(spec.source)
    if path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix)
        if builder is None:
            raise ValueError(f"dataset file {path.name}: expected one of {sorted(LOCAL_FORMATS)}")
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir():
        ds = datasets.load_dataset(str(path), split=spec.split)
    else:
        name, revision = split_revision(spec.source)
        ds = datasets.load_dataset(name, split=spec.split, revision=revision)
    return list(ds)


def format_turn_segments(turns: list[Turn], eos: str) -> list[tuple[str, bool]]:
    """`Human: …` / `Assistant: …` text split into (segment, is_assistant_reply) pieces."""
    segments: list[tuple[str, bool]] = []
    for index, turn in enumerate(turns):
        lead = "" if index == 0 else "\n"
        if turn.speaker == ASSISTANT:
            segments.append((f"{lead}{ASSISTANT}: ", False))
            segments.append((turn.text + eos, True))
        else:
            segments.append((f"{lead}{turn.speaker}: {turn.text}", False))
    return segments


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(
    turns: list[Turn], tokenizer, max_length: int, train_on: str
) -> tuple[TokenizedSample, bool]:
    """Tokenize one sample; loss on assistant replies (or on all). Returns (sample, truncated).

    Overlong samples lose context from the left; the final reply is kept (its head, when the
    reply alone is longer than max_length).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    segments = format_turn_segments(turns, tokenizer.eos_token)
    last_reply_start = 0
    for text, is_reply in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_reply:
            last_reply_start = len(input_ids)
        input_ids.extend(ids)
        labels.extend(ids if is_reply or train_on == "all" else [IGNORE_INDEX] * len(ids))
    if len(input_ids) <= max_length:
        return TokenizedSample(input_ids, labels), False
    if len(input_ids) - last_reply_start <= max_length:
        return TokenizedSample(input_ids[-max_length:], labels[-max_length:]), True
    end = last_reply_start + max_length
    return TokenizedSample(input_ids[last_reply_start:end], labels[last_reply_start:end]), True


@dataclass
class TrainingData:
    samples: list[TokenizedSample]
    conversations: int
    truncated: int
    dropped: dict[str, int]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        sample = self.samples[index]
        return {
            "input_ids": sample.input_ids,
            "attention_mask": [1] * len(sample.input_ids),
            "labels": sample.labels,
        }


def build_training_data(spec: DatasetSpec, tokenizer, max_length: int) -> TrainingData:
    conversations: Conversations = conversations_from_rows(load_rows(spec), spec.languages)
    turns_list = conversations.samples[: spec.max_samples] if spec.max_samples else conversations.samples
    samples, truncated = [], 0
    for turns in turns_list:
        sample, was_truncated = tokenize_conversation(turns, tokenizer, max_length, spec.train_on)
        samples.append(sample)
        truncated += was_truncated
    if not samples:
        raise ValueError(
            f"dataset {spec.source!r} produced no training samples ({dict(conversations.dropped)})"
        )
    return TrainingData(samples, len(turns_list), truncated, dict(conversations.dropped))
