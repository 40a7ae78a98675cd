"""Preference pairs (method dpo) from the shapes people have them in: OpenAI's preference JSONL,
TRL's prompt/chosen/rejected, oasst1's ranked replies; their upload reports, and the 422 a job
gets when its data can't feed its method."""

from __future__ import annotations

import json

import pytest

from app.conversations import ASSISTANT, HUMAN, TEXT, flatten_trees
from app.preferences import openai_preference_pair, ranked_pairs_from_rows, trl_preference_pair
from tests.conftest import REPO, demo_spec
from tests.test_datasets import DATA, upload

OPENAI_PAIR = {
    "input": {"messages": [{"role": "user", "content": "Hi"}]},
    "preferred_output": [{"role": "assistant", "content": "Hello!"}],
    "non_preferred_output": [{"role": "assistant", "content": "What?"}],
}


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_openais_preference_record_is_a_prompt_and_two_assistant_replies():
    pair = openai_preference_pair(OPENAI_PAIR)
    assert [(t.speaker, t.text, t.train) for t in pair.prompt] == [(HUMAN, "Hi", False)]
    assert [(t.speaker, t.text, t.train) for t in pair.chosen] == [(ASSISTANT, "Hello!", True)]
    assert [(t.speaker, t.text, t.train) for t in pair.rejected] == [(ASSISTANT, "What?", True)]


def test_trls_records_as_text_as_messages_and_with_an_implicit_prompt():
    text = trl_preference_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    assert (text.prompt[0].speaker, text.chosen[0].speaker, text.chosen[0].text) == (TEXT, TEXT, " blue.")
    asked = [{"role": "user", "content": "Sky?"}]
    messages = trl_preference_pair(
        {
            "prompt": asked,
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    )
    implicit = trl_preference_pair(
        {
            "chosen": [*asked, {"role": "assistant", "content": "Blue."}],
            "rejected": [*asked, {"role": "assistant", "content": "Green."}],
        }
    )
    assert messages == implicit and [t.text for t in implicit.prompt] == ["Sky?"]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({**OPENAI_PAIR, "non_preferred_output": OPENAI_PAIR["preferred_output"]}, "are the same"),
        (
            {k: v for k, v in OPENAI_PAIR.items() if k != "non_preferred_output"},
            "'non_preferred_output' is missing",
        ),
        (
            {**OPENAI_PAIR, "preferred_output": [{"role": "user", "content": "Hello!"}]},
            "preferred_output[0] must be an assistant message",
        ),
        ({"prompt": "a", "chosen": " b"}, "'rejected' is missing"),
        ({"prompt": "a", "chosen": " b", "rejected": " b"}, "chosen and rejected are the same"),
    ],
)
def test_a_bad_pair_is_named_in_its_own_terms(record, error):
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        (openai_preference_pair if "input" in record else trl_preference_pair)(record)


def test_oasst1_trees_give_one_pair_per_prompt_with_two_ranked_replies_best_against_worst():
    trees = [json.loads(line) for line in (DATA / "en-100-trees.jsonl").read_text().splitlines()]
    pairs = ranked_pairs_from_rows(flatten_trees(trees), ["en"]).pairs
    assert len(pairs) == 212  # the count for this file
    rows = {r["message_id"]: r for r in flatten_trees(trees)}
    by_text = {r["text"].strip(): r for r in rows.values()}
    for pair in pairs[:20]:
        best, worst = by_text[pair.chosen[0].text], by_text[pair.rejected[0].text]
        siblings = [
            r for r in rows.values() if r.get("parent_id") == best["parent_id"] and r.get("rank") is not None
        ]
        assert best["rank"] == 0 and worst["rank"] == max(r["rank"] for r in siblings)
        assert pair.prompt[-1].speaker == HUMAN and not any(t.train for t in pair.prompt)


def test_uploads_of_pairs_report_pairs_and_name_a_bad_record(client):
    good = upload(client, "prefs.jsonl", jsonl(OPENAI_PAIR, OPENAI_PAIR)).json()
    assert good["status"] == "ready"
    assert {k: good["report"][k] for k in ("format", "pairs", "methods")} == {
        "format": "openai_preference",
        "pairs": 2,
        "methods": ["dpo"],
    }
    assert "samples" not in good["report"]
    bad = upload(
        client,
        "trl.jsonl",
        jsonl({"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": " b"}),
    )
    report = bad.json()["report"]
    assert (report["format"], report["pairs"]) == ("preference", 1)
    assert report["problems"] == [
        {"line": 2, "error": "'rejected' is missing: a pair needs a chosen and a rejected reply"}
    ]
    oasst = upload(client, "rows.jsonl", (DATA / "en-validation.jsonl").read_bytes()).json()["report"]
    assert oasst["methods"] == ["supervised", "dpo"] and oasst["pairs"] == 416 and oasst["samples"] > 0


def test_a_job_whose_data_cant_feed_its_method_is_refused_with_the_method_that_fits(client, service_env):
    pairs = upload(client, "prefs.jsonl", jsonl(OPENAI_PAIR)).json()
    chats = upload(
        client,
        "chats.jsonl",
        jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ).json()
    supervised, dpo = demo_spec(), {**demo_spec(), "method": {"type": "dpo"}}
    cases = [
        (supervised, pairs["id"], "dataset.source", "which fit method 'dpo'"),
        (dpo, chats["id"], "dataset.source", "fits method 'supervised'"),
        (dpo, str(REPO / "examples/data/oasst1/en-validation.jsonl"), None, None),  # oasst1 feeds both
    ]
    for spec, source, field, message in cases:
        spec = json.loads(json.dumps(spec))
        spec["dataset"] = {"source": source}
        response = client.post("/jobs", json=spec)
        if field is None:
            assert response.status_code == 201, response.text
            continue
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert problem["field"] == field and message in problem["message"]
    local = {
        **dpo,
        "dataset": {"source": str(REPO / "examples/data/oasst1/en-validation.jsonl"), "format": "chat"},
    }
    refused = client.post("/jobs", json=local)
    assert refused.status_code == 422 and "fits method 'supervised'" in refused.text
    assert len(client.get("/jobs").json()["items"]) == 1  # only the oasst1 job was created
