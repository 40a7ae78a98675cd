"""Conversations and loss masks from real oasst1 files, on the real Phi-2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.conversations import Turn, conversations_from_rows, flatten_trees
from app.formats import chat_turns
from app.formats import conversations_from_records as conversations_of_format
from app.spec import DatasetSpec
from worker.training.data import (
    IGNORE_INDEX,
    conversations_from_records,
    read_json_records,
    tokenize_conversation,
)

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "oasst1"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return read_json_records(DATA / "en-validation.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from worker.training.model import load_tokenizer

    return load_tokenizer(str(DATA.parent.parent / "tiny-phi2"))


def test_one_sample_per_surviving_assistant_reply_with_its_whole_thread(rows):
    conversations = conversations_from_rows(rows, ["en"])

    assistant_kept = [
        r for r in rows if r["role"] == "assistant" and not r["deleted"] and r["review_result"] is not False
    ]
    dropped = conversations.dropped
    assert dropped["rows_deleted"] == 40
    assert len(conversations.samples) + dropped["replies_missing_ancestor"] == len(assistant_kept)
    replies = [sample[-1].text for sample in conversations.samples]
    assert set(replies) <= {r["text"].strip() for r in assistant_kept}
    for sample in conversations.samples:
        assert [t.speaker for t in sample] == ["Human", "Assistant"] * (len(sample) // 2)
        assert [t.train for t in sample] == [False] * (len(sample) - 1) + [True]


def test_messages_whose_parent_is_absent_never_become_samples(rows):
    by_id = {r["message_id"]: r for r in rows}
    orphans = [r for r in rows if r["parent_id"] and r["parent_id"] not in by_id]  # parent not English
    assert len(orphans) == 3
    # they also failed review; mark them reviewed so that only the missing parent stands in the way
    reviewed = [dict(r, review_result=True) if r in orphans else r for r in rows]

    before = conversations_from_rows(rows, ["en"])
    after = conversations_from_rows(reviewed, ["en"])

    orphan_replies = [r for r in orphans if r["role"] == "assistant"]
    assert after.dropped["replies_missing_ancestor"] == before.dropped["replies_missing_ancestor"] + len(
        orphan_replies
    )
    assert len(after.samples) == len(before.samples)
    orphan_texts = {r["text"].strip() for r in orphans}
    assert not any(t.text in orphan_texts for sample in after.samples for t in sample)


def test_tree_export_flattens_to_rows_and_filters_synthetic():
    trees = read_json_records(DATA / "en-100-trees.jsonl")

    flat = list(flatten_trees(trees))
    assert len(flat) == 1167 and sum(bool(r.get("synthetic")) for r in flat) == 22
    assert all((r["parent_id"] is None) == (r["message_id"] == r["message_tree_id"]) for r in flat)

    spec = DatasetSpec(source=str(DATA / "en-100-trees.jsonl"), include_synthetic=False)
    conversations = conversations_from_records(trees, spec)
    assert conversations.dropped["rows_synthetic"] == 22
    assert conversations.samples and all(s[-1].speaker == "Assistant" for s in conversations.samples)


def test_best_path_takes_the_top_ranked_reply_at_each_level(rows):
    best = conversations_from_rows(rows, ["en"], mode="best_path")

    roots = {r["message_id"] for r in rows if r["parent_id"] is None and not r["deleted"]}
    assert 0 < len(best.samples) <= len(roots)
    kept = [r for r in rows if not r["deleted"] and r["review_result"] is not False]
    by_text = {r["text"].strip(): r for r in kept}
    texts = [r["text"].strip() for r in kept]
    for sample in best.samples:
        for turn in sample[1:]:
            if texts.count(turn.text) > 1:  # e.g. "Thank you!": ambiguous, skip
                continue
            row = by_text[turn.text]
            sibling_ranks = [
                s["rank"] for s in kept if s["parent_id"] == row["parent_id"] and s["rank"] is not None
            ]
            assert row["rank"] == min(sibling_ranks, default=None)
        assert all(t.train == (t.speaker == "Assistant") for t in sample)


def test_chat_records_become_samples_and_bad_ones_say_why():
    good = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    assert chat_turns(good) == [
        Turn("System", "Be brief."),
        Turn("Human", "Hi"),
        Turn("Assistant", "Hello!", True),
    ]
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        chat_turns({"messages": [{"role": "bot", "content": "x"}]})
    with pytest.raises(ValueError, match="no assistant message"):
        chat_turns({"messages": [{"role": "user", "content": "x"}]})
    conversations = conversations_of_format([good, {"messages": []}, {"text": "x"}], "chat")
    assert len(conversations.samples) == 1 and conversations.dropped["chat_records_invalid"] == 2


def test_loss_covers_exactly_the_reply_and_its_eos(tokenizer):
    turns = [
        Turn("Human", "What is 2+2?"),
        Turn("Assistant", "Four.", False),
        Turn("Human", "Sure?"),
        Turn("Assistant", "Yes, four.", True),
    ]

    sample, truncated = tokenize_conversation(turns, tokenizer, 512, "assistant")

    trained = [
        tok for tok, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == "Yes, four." + tokenizer.eos_token
    assert tokenizer.decode(sample.input_ids) == (
        "Human: What is 2+2?\nAssistant: Four.<|endoftext|>\nHuman: Sure?\nAssistant: Yes, four.<|endoftext|>"
    )
    everything, _ = tokenize_conversation(turns, tokenizer, 512, "all")
    assert everything.labels == everything.input_ids and not truncated


def test_overlong_samples_lose_context_from_the_left_never_the_reply(tokenizer):
    reply = "The answer is short."
    turns = [Turn("Human", "word " * 400), Turn("Assistant", reply, True)]

    sample, truncated = tokenize_conversation(turns, tokenizer, 64, "assistant")

    assert truncated and len(sample.input_ids) == 64
    assert tokenizer.decode(sample.input_ids).endswith("Assistant: " + reply + tokenizer.eos_token)
    long_reply, _ = tokenize_conversation(
        [Turn("Human", "hi"), Turn("Assistant", "ok " * 200, True)], tokenizer, 32, "assistant"
    )
    assert len(long_reply.input_ids) == 32 and all(label != IGNORE_INDEX for label in long_reply.labels)


def _oasst_spec(source: str, **fields) -> DatasetSpec:
    return DatasetSpec(source=source, **fields)


def test_the_default_spec_reads_oasst1_train_and_validation_from_the_hub(monkeypatch, tokenizer, rows):
    """The hub is the one thing that cannot exist here: `load_dataset` answers with the real rows."""
    import datasets

    from worker.training.data import build_eval_data, build_training_data

    calls = []

    def fake_load_dataset(name, split=None, revision=None, **kwargs):
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = DatasetSpec()

    train = build_training_data(spec, tokenizer, 2048)
    evaluation = build_eval_data(spec, tokenizer, 2048)

    assert calls == [("OpenAssistant/oasst1", "train", None), ("OpenAssistant/oasst1", "validation", None)]
    assert len(train) == len(evaluation) == len(conversations_from_rows(rows, ["en"]).samples)


def test_local_parquet_files_and_dataset_folders_load(tmp_path_allowed, tokenizer, rows):
    tmp_path = tmp_path_allowed
    import datasets

    from worker.training.data import build_eval_data, build_training_data

    flat = [
        {
            k: v
            for k, v in r.items()
            if k in ("message_id", "parent_id", "text", "role", "lang", "deleted", "review_result")
        }
        for r in rows
    ]
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path / "rows.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text((DATA / "en-validation.jsonl").read_text())
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:200]))

    from_parquet = build_training_data(_oasst_spec(str(tmp_path / "rows.parquet")), tokenizer, 512)
    from_folder = build_training_data(_oasst_spec(str(folder)), tokenizer, 512)
    folder_eval = build_eval_data(_oasst_spec(str(folder)), tokenizer, 512)

    expected = len(conversations_from_rows(rows, ["en"]).samples)
    assert len(from_parquet) == len(from_folder) == expected
    assert folder_eval is not None and 0 < len(folder_eval) < expected


def test_a_folder_written_by_save_to_disk_loads_with_its_splits(tmp_path_allowed, tokenizer, rows):
    """Issue 15: `load_dataset` can't read what `save_to_disk` wrote; the job failed in the worker."""
    import datasets

    from worker.training.data import build_eval_data, build_training_data

    keep = ("message_id", "parent_id", "text", "role", "lang", "deleted", "review_result")
    flat = [{k: v for k, v in r.items() if k in keep} for r in rows]
    saved = tmp_path_allowed / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(flat), "validation": datasets.Dataset.from_list(flat[:200])}
    ).save_to_disk(str(saved))
    single = tmp_path_allowed / "single"
    datasets.Dataset.from_list(flat).save_to_disk(str(single))

    expected = len(conversations_from_rows(rows, ["en"]).samples)
    assert len(build_training_data(_oasst_spec(str(saved)), tokenizer, 512)) == expected
    assert len(build_training_data(_oasst_spec(str(single)), tokenizer, 512)) == expected
    evaluated = build_eval_data(_oasst_spec(str(saved)), tokenizer, 512)
    assert evaluated is not None and 0 < len(evaluated) < expected


def test_data_without_a_validation_split_gets_none_never_its_training_rows(tmp_path_allowed, tokenizer, rows):
    """Issue 28 item 5: a `save_to_disk` folder of one Dataset (no splits) answered the default
    `validation_split` with its training rows ("24 training samples, 24 validation samples"). It,
    a single file and a folder of one data file have no validation split: no eval_loss."""
    import datasets

    from worker.training.data import build_eval_data, build_training_data, load_records

    keep = ("message_id", "parent_id", "text", "role", "lang", "deleted", "review_result")
    flat = [{k: v for k, v in r.items() if k in keep} for r in rows[:300]]
    single = tmp_path_allowed / "single"
    datasets.Dataset.from_list(flat).save_to_disk(str(single))
    (tmp_path_allowed / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    datasets.Dataset.from_list(flat).to_parquet(str(tmp_path_allowed / "rows.parquet"))
    (tmp_path_allowed / "files").mkdir()
    (tmp_path_allowed / "files" / "rows.jsonl").write_text((tmp_path_allowed / "rows.jsonl").read_text())

    for source in ("single", "rows.jsonl", "rows.parquet", "files"):
        spec = _oasst_spec(str(tmp_path_allowed / source))
        assert spec.validation_split == "validation"  # the default, named by no one here
        assert len(build_training_data(spec, tokenizer, 512)) > 0, source
        assert build_eval_data(spec, tokenizer, 512) is None, source
    # a split named that the folder lacks: none, as for a folder of files or the hub (the worker
    # warns; the job's "data ready" event says 0 validation samples)
    assert build_eval_data(_oasst_spec(str(single), validation_split="test"), tokenizer, 512) is None
    with pytest.raises(ValueError, match="holds one Dataset, no splits"):
        load_records(str(single), "validation", training=False)
    # its rows still validate where the spec says so, as a validation_source
    named = _oasst_spec(str(tmp_path_allowed / "rows.jsonl"), validation_source=str(single))
    assert build_eval_data(named, tokenizer, 512) is not None
