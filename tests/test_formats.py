"""The dataset formats people already have (issue 15): each becomes the turns it means, is
recognised from its first record, validates on upload, and trains the tokens it should; a shape
nobody knows is refused with every accepted shape's one-line example."""

from __future__ import annotations

import json
import typing

import pytest

from app.conversations import TEXT, Turn
from app.dataset_report import validate_file
from app.formats import RECORD_FORMATS, detect_format
from app.preferences import PAIR_FORMATS
from app.spec import DatasetSpec
from tests.conftest import DEMO_MODEL
from worker.training.data import IGNORE_INDEX, tokenize_conversation

H, A, S = "Human", "Assistant", "System"

CASES = {
    "chat": (
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": "Hello!", "weight": 0},
                {"role": "user", "content": "Again?"},
                {"role": "assistant", "content": "Hello again!"},
            ]
        },
        [
            Turn(S, "Be brief."),
            Turn(H, "Hi there"),
            Turn(A, "Hello!"),
            Turn(H, "Again?"),
            Turn(A, "Hello again!", True),
        ],
    ),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
            ]
        },
        [Turn(S, "Be kind."), Turn(H, "Hi"), Turn(A, "Hello!", True)],
    ),
    "alpaca": (
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "text": "(ignored)"},
        [Turn(H, "Add the numbers.\n\n2 and 3"), Turn(A, "5", True)],
    ),
    "prompt_completion": (
        {"prompt": "The capital of France is", "completion": " Paris."},
        [Turn(TEXT, "The capital of France is"), Turn(TEXT, " Paris.", True)],
    ),
    "text": ({"text": "Once upon a time."}, [Turn(TEXT, "Once upon a time.", True)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_format_is_recognised_and_becomes_its_turns(name):
    record, turns = CASES[name]
    assert detect_format(record) == name
    assert next(f for f in RECORD_FORMATS if f.name == name).turns(record) == turns


def test_conversational_prompt_completion_trains_only_the_completion():
    record = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yes?"},
            {"role": "user", "content": "Bye"},
        ],
        "completion": [{"role": "assistant", "content": "Goodbye!"}],
    }
    assert RECORD_FORMATS[3].turns(record) == [
        Turn(H, "Hi"),
        Turn(A, "Yes?"),
        Turn(H, "Bye"),
        Turn(A, "Goodbye!", True),
    ]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x", "weight": 0},
                ]
            },
            "no assistant message to learn from",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            r"messages\[0\].content\[0\] is a image_url part; only text parts",
        ),
        (
            {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
            "tool calls are not trained here",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool calls are not trained here"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x", "weight": 0.5},
                ]
            },
            "weight must be 0 or 1",
        ),
        (
            {"conversations": [{"from": "robot", "value": "x"}]},
            r"conversations\[0\].from must be human, gpt or system",
        ),
        ({"instruction": "", "output": "x"}, "instruction must be non-empty text"),
        ({"prompt": 3, "completion": "x"}, "prompt must be text, or a list of messages"),
        ({"text": "   "}, "text must be non-empty text"),
    ],
)
def test_a_bad_record_says_what_is_wrong_with_it(record, message):
    with pytest.raises(ValueError, match=message):
        RECORD_FORMATS[[f.name for f in RECORD_FORMATS].index(detect_format(record))].turns(record)


def test_an_unknown_shape_lists_every_accepted_one_with_an_example():
    with pytest.raises(ValueError) as refused:
        detect_format({"question": "Hi", "answer": "Hello"})
    text = str(refused.value)
    assert "unrecognised record with fields ['answer', 'question']" in text
    for known in RECORD_FORMATS:
        assert f"{known.name}: {known.example}" in text
    assert "oasst1" in text


def test_the_spec_names_every_format():
    named = set(typing.get_args(DatasetSpec.model_fields["format"].annotation))
    assert named == {"auto", "oasst_rows", "oasst_trees", *(f.name for f in RECORD_FORMATS), *PAIR_FORMATS}


@pytest.mark.parametrize("name", ["sharegpt", "alpaca", "prompt_completion", "text"])
def test_uploads_of_each_format_are_validated_line_by_line(tmp_path, name):
    record, _ = CASES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, **broken(name)}) + "\n")
    report = validate_file(path)
    assert (report["format"], report["records"], report["samples"]) == (name, 2, 1)
    assert [p["line"] for p in report["problems"]] == [2] and not report["valid"]


def broken(name: str) -> dict:
    return {
        "sharegpt": {"conversations": []},
        "alpaca": {"output": ""},
        "prompt_completion": {"completion": ""},
        "text": {"text": ""},
    }[name]


@pytest.fixture(scope="module")
def tokenizer():
    from worker.training.model import load_tokenizer

    return load_tokenizer(str(DEMO_MODEL))


def test_text_trains_every_token_and_a_completion_only_its_own(tokenizer):
    text, _ = tokenize_conversation(CASES["text"][1], tokenizer, 512, "assistant")
    assert IGNORE_INDEX not in text.labels and text.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(text.input_ids) == "Once upon a time." + tokenizer.eos_token

    completion, _ = tokenize_conversation(CASES["prompt_completion"][1], tokenizer, 512, "assistant")
    trained = [
        t for t, label in zip(completion.input_ids, completion.labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == " Paris." + tokenizer.eos_token
    assert tokenizer.decode(completion.input_ids) == "The capital of France is Paris." + tokenizer.eos_token
