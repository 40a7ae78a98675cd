"""From a dataset spec to tokenized training samples with loss masks."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.conversations import ASSISTANT, TEXT, Conversations, Turn, conversations_from_rows, flatten_trees
from app.formats import BY_NAME, detect_format
from app.formats import conversations_from_records as conversations_of_format
from app.ids import DATASET_ID
from app.local_paths import confined
from app.services.dataset_files import dataset_file
from app.spec import DEFAULT_TEMPLATE, DatasetSpec, saved_to_disk, split_revision
from worker.training.chat_template import chat_template_segments
from worker.training.hub import fetching

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value carry no loss


def read_json_records(path: Path) -> list[dict]:
    """A JSON Lines file, or a JSON file holding a list of records."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_records(source: str, split: str, *, training: bool = True) -> list[dict]:
    """Records from an uploaded dataset, a local file (jsonl, json, parquet), a local dataset
    folder, or the hub. A folder `save_to_disk` wrote with one `Dataset` (no splits) is all
    training rows, whatever `split` is named; asked for another (`training` False), it has
    none (ValueError), so that its rows never validate what they trained."""
    if DATASET_ID.match(source):
        path = dataset_file(source)
    else:  # a local path is checked again as it is now (moved, or a link added since)
        path = confined(source) if Path(source).is_absolute() else Path(source)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        # Read directly: the nested tree export does not fit an inferred Arrow schema.
        return read_json_records(path)
    import datasets

    if path.is_file() and path.suffix == ".parquet":
        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    if path.is_file():
        raise ValueError(f"dataset file {path.name}: expected .jsonl, .json or .parquet")
    if path.is_dir() and saved_to_disk(path):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise ValueError(f"unknown split {split!r}: the folder has {', '.join(saved)}")
            saved = saved[split]
        elif not training:
            raise ValueError(f"no split {split!r}: the folder holds one Dataset, no splits")
        return list(saved)
    if path.is_dir():
        return list(datasets.load_dataset(str(path), split=split))
    name, revision = split_revision(source)
    with fetching("dataset", source):
        return list(datasets.load_dataset(name, split=split, revision=revision))


def conversations_from_records(records: list[dict], spec: DatasetSpec) -> Conversations:
    if not records:
        return Conversations([])
    fmt = detect_format(records[0]) if spec.format == "auto" else spec.format
    if fmt in BY_NAME:
        return conversations_of_format(records, fmt)
    rows: Iterable[dict] = flatten_trees(records) if fmt == "oasst_trees" else records
    return conversations_from_rows(
        rows, spec.languages, include_synthetic=spec.include_synthetic, mode=spec.conversations
    )


def format_segments(turns: list[Turn], eos: str, space_leads_reply: bool = False) -> list[tuple[str, bool]]:
    """`Human: …` / `Assistant: …` text as (segment, carries_loss) pieces; EOS ends each reply.
    Plain text turns (TEXT) are rendered as they are, one after the other, EOS after a trained one.
    `space_leads_reply`: the space after `Assistant:` starts the reply's segment (SentencePiece
    tokenizers make it part of the reply's first token, `▁Once`, as a whole-text tokenization
    does); otherwise it ends the prompt's (Phi's recipe: `Ġ` then `Once`)."""
    segments: list[tuple[str, bool]] = []
    before, after = ("", " ") if space_leads_reply else (" ", "")
    for index, turn in enumerate(turns):
        lead = "" if index == 0 else "\n"
        if turn.speaker == TEXT:
            segments.append((turn.text + (eos if turn.train else ""), turn.train))
        elif turn.speaker == "Assistant":
            segments.append((f"{lead}Assistant:{before}", False))
            segments.append((after + turn.text + eos, turn.train))
        else:
            segments.append((f"{lead}{turn.speaker}: {turn.text}", False))
    return segments


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]


# Where the Assistant speaks next: what a sampled prompt ends with (the space after it goes with
# the reply where `format_segments` puts it there).
ASSISTANT_SPEAKS = f"\n{ASSISTANT}:"


def start_ids(tokenizer) -> list[int]:
    """The token a sequence starts with: BOS where the tokenizer adds one (Llama, Mistral),
    nothing where it doesn't (Phi, GPT-2)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


# What a segment that continues a sequence is tokenized behind (then cut off), so that a
# SentencePiece tokenizer (Llama, Mistral) adds no prefix space of its own to it.
ANCHOR = "\n"


def _segment_ids(tokenizer, text: str, continues: bool) -> list[int]:
    """`text`'s tokens. SentencePiece tokenizers start every encoding with a space (`▁`): right
    for a sequence's first segment (the whole text would start so too), a stray token anywhere
    else. A segment that `continues` a sequence is tokenized behind ANCHOR instead, whose own
    tokens are then cut off; where they don't come out unchanged (a tokenizer that merges the
    anchor with what follows, like GPT-2's `\n\n`), plain encoding is right anyway."""
    anchor = _prefix_space_anchor(tokenizer) if continues else None
    if anchor:
        ids = tokenizer(ANCHOR + text, add_special_tokens=False)["input_ids"]
        if tuple(ids[: len(anchor)]) == anchor:
            return ids[len(anchor) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@lru_cache(maxsize=8)
def _prefix_space_anchor(tokenizer) -> tuple[int, ...] | None:
    """ANCHOR's ids for a tokenizer that starts every encoding with `▁`; None for the others."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"][:1])
    if first and first[0].startswith("▁"):
        return tuple(tokenizer(ANCHOR, add_special_tokens=False)["input_ids"])
    return None


def render(
    turns: list[Turn], tokenizer, template: str, reply_follows: bool
) -> tuple[list[int], list[tuple[str, bool]]]:
    """A conversation as the ids it starts with and its text segments (segment, carries_loss),
    in the job's prompt template: the seed's `Human:` / `Assistant:` lines, or the tokenizer's
    chat template. `reply_follows`: end with the Assistant about to speak (a sampled prompt)."""
    if template == "chat_template":
        return [], chat_template_segments(turns, tokenizer, generation_prompt=reply_follows)
    sentencepiece = _prefix_space_anchor(tokenizer) is not None
    segments = format_segments(turns, tokenizer.eos_token or "", sentencepiece)
    if reply_follows:
        segments.append((ASSISTANT_SPEAKS if sentencepiece else ASSISTANT_SPEAKS + " ", False))
    return start_ids(tokenizer), segments


def prompt_ids(turns: list[Turn], tokenizer, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """A conversation to be answered, tokenized exactly as training tokenized it up to the
    reply (`tokenize_conversation`: the same start, the same segments one by one), ending where
    the Assistant speaks. The sampler asks the model with these ids."""
    ids, segments = render(turns, tokenizer, template, reply_follows=True)
    for index, (text, _) in enumerate(segments):
        ids += _segment_ids(tokenizer, text, continues=index > 0)
    return ids


def tokenize_conversation(
    turns: list[Turn], tokenizer, max_length: int, train_on: str, template: str = DEFAULT_TEMPLATE
) -> tuple[TokenizedSample, bool]:
    """Tokenize one sample, a segment at a time (so that the reply's tokens never merge with
    the prompt's, and a sampled prompt, `prompt_ids`, is this sample's beginning). Returns
    (sample, truncated).

    Overlong samples lose context from the left; the last trained reply is kept (its head,
    when the reply alone is longer than max_length).
    """
    input_ids, segments = render(turns, tokenizer, template, reply_follows=False)
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    last_reply_start = 0
    for index, (text, carries_loss) in enumerate(segments):
        ids = _segment_ids(tokenizer, text, continues=index > 0)
        if carries_loss:
            last_reply_start = len(input_ids)
        input_ids.extend(ids)
        labels.extend(ids if carries_loss or train_on == "all" else [IGNORE_INDEX] * len(ids))
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
    records = load_records(spec.source, spec.split)
    return _tokenized(
        conversations_from_records(records, spec), spec, tokenizer, max_length, spec.max_samples
    )


def load_eval_records(spec: DatasetSpec) -> list[dict] | None:
    """The validation records, or None when the spec names none or the source has no such
    split (a single file, an upload or a single saved Dataset has none): never the training rows."""
    if spec.validation_source:
        return load_records(spec.validation_source, "train")
    if spec.validation_split and not DATASET_ID.match(spec.source) and not Path(spec.source).is_file():
        try:
            return load_records(spec.source, spec.validation_split, training=False)
        except ValueError as exc:  # datasets: unknown split
            log.warning("no validation split %r in %s: %s", spec.validation_split, spec.source, exc)
    return None


def build_eval_data(spec: DatasetSpec, tokenizer, max_length: int) -> TrainingData | None:
    """The validation samples, or None when the spec names none (or a single-file source has none)."""
    records = load_eval_records(spec)
    if records is None:
        return None
    return _tokenized(
        conversations_from_records(records, spec), spec, tokenizer, max_length, spec.max_eval_samples
    )


def _tokenized(
    conversations: Conversations, spec: DatasetSpec, tokenizer, max_length: int, limit: int | None
) -> TrainingData:
    chosen = conversations.samples[:limit] if limit else conversations.samples
    samples, truncated = [], 0
    for turns in chosen:
        sample, was_truncated = tokenize_conversation(
            turns, tokenizer, max_length, spec.train_on, spec.template
        )
        samples.append(sample)
        truncated += was_truncated
    if not samples:
        dropped = dict(conversations.dropped)
        raise ValueError(f"dataset {spec.source!r} produced no training samples (dropped: {dropped})")
    return TrainingData(samples, len(chosen), truncated, dict(conversations.dropped))
