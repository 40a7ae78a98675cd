"""Preference pairs (a prompt, the reply people preferred, the one they didn't) for DPO jobs, from
the shapes people have them in, and which training method each dataset format fits. Pure Python
(no torch, no tokenizer): the upload report and the trainer read the same rules.

- OpenAI's preference JSONL: `{"input": {"messages": [...]}, "preferred_output": [assistant
  message], "non_preferred_output": [assistant message]}` (`openai_preference`);
- TRL's `{"prompt", "chosen", "rejected"}`, as text (the completion continues the prompt as it
  is, as TRL's DPOTrainer reads it) or as message lists (conversational); without `prompt`, the
  messages `chosen` and `rejected` share are the prompt (TRL's implicit prompt) (`preference`);
- oasst1 message rows and tree exports: for each prompt with two or more ranked assistant replies,
  the thread up to that prompt is the prompt, the best-ranked reply (rank 0) is chosen and the
  worst-ranked is rejected. One pair per prompt, not every pair of its replies: the pairs of one
  prompt share their prompt and replies, so all pairs would weigh prompts with many replies more
  (a prompt with 5 replies would count 10 times) and repeat the same replies in many pairs; best
  against worst is also the pair whose order people agreed on most.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from app.conversations import ASSISTANT, TEXT, Turn, _thread, _turn, kept_rows
from app.formats import _messages, _raw, convert_each
from app.spec import DPO, SUPERVISED

PAIR_FORMATS = ("openai_preference", "preference")
THREAD_FORMATS = ("oasst_rows", "oasst_trees")


def methods_of_format(fmt: str | None) -> list[str]:
    """The training methods a dataset of this format can feed: pairs feed DPO, one-sample
    formats feed supervised training, oasst1's threads feed both (replies, or their ranks)."""
    if fmt in PAIR_FORMATS:
        return [DPO]
    if fmt in THREAD_FORMATS:
        return [SUPERVISED, DPO]
    return [SUPERVISED]


def method_fit_problem(fmt: str | None, method: str) -> str | None:
    """Why a dataset of format `fmt` can't train a job of `method` (None: it can), saying which
    method fits it."""
    if fmt is None or method in methods_of_format(fmt):
        return None
    if method == DPO:
        return (
            f"method 'dpo' trains on preference pairs, and this dataset is {fmt} data, which fits method "
            "'supervised'; pairs are OpenAI's input/preferred_output/non_preferred_output records, TRL's "
            "prompt/chosen/rejected, or oasst1 rows or trees with ranked replies"
        )
    return (
        f"this dataset holds preference pairs ({fmt}), which fit method 'dpo': set method.type to 'dpo', "
        "or give supervised training chat, prompt/completion or text records"
    )


@dataclass(frozen=True)
class Pair:
    """A prompt (turns that carry no loss), and the preferred and the other completion (turns that
    do: the assistant's replies, or TEXT continuing a text prompt)."""

    prompt: list[Turn]
    chosen: list[Turn]
    rejected: list[Turn]


@dataclass
class Pairs:
    pairs: list[Pair]
    dropped: Counter = field(default_factory=Counter)


def _completion(value: Any, where: str) -> list[Turn]:
    """A side of a pair given as messages: assistant messages only, each trained."""
    turns = _messages(value if not isinstance(value, dict) else [value], where)
    for index, turn in enumerate(turns):
        if turn.speaker != ASSISTANT:
            raise ValueError(f"{where}[{index}] must be an assistant message: the reply being judged")
    return turns


def _distinct(pair: Pair, chosen_name: str, rejected_name: str) -> Pair:
    if [t.text for t in pair.chosen] == [t.text for t in pair.rejected]:
        raise ValueError(f"{chosen_name} and {rejected_name} are the same: there is nothing to prefer")
    return pair


def _untrained(turns: list[Turn]) -> list[Turn]:
    return [Turn(t.speaker, t.text, False) for t in turns]


def openai_preference_pair(record: dict) -> Pair:
    """OpenAI's preference format: `input.messages` is the prompt, `preferred_output` and
    `non_preferred_output` each one assistant message (as a list)."""
    given = record.get("input")
    if not isinstance(given, dict):
        raise ValueError("'input' must be an object holding 'messages'")
    if given.get("tools"):
        raise ValueError("input.tools: tool calls are not trained here")
    prompt = _untrained(_messages(given.get("messages"), "input.messages"))
    for side in ("preferred_output", "non_preferred_output"):
        if side not in record:
            raise ValueError(f"'{side}' is missing: a pair needs a preferred and a non-preferred reply")
    chosen = _completion(record.get("preferred_output"), "preferred_output")
    rejected = _completion(record.get("non_preferred_output"), "non_preferred_output")
    return _distinct(Pair(prompt, chosen, rejected), "preferred_output", "non_preferred_output")


def trl_preference_pair(record: dict) -> Pair:
    """TRL's preference format: text (`prompt`, then `chosen` / `rejected` continuing it as they
    are), or message lists; without `prompt`, the messages both sides start with."""
    for side in ("chosen", "rejected"):
        if side not in record:
            raise ValueError(f"'{side}' is missing: a pair needs a chosen and a rejected reply")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be text when chosen and rejected are text")
        pair = Pair(
            [Turn(TEXT, prompt)],
            [Turn(TEXT, _raw(chosen, "chosen"), True)],
            [Turn(TEXT, _raw(rejected, "rejected"), True)],
        )
        return _distinct(pair, "chosen", "rejected")
    if prompt is None:  # implicit prompt: the messages both sides share
        both = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        shared = 0
        while (
            shared < min(map(len, both))
            and both[0][shared].text == both[1][shared].text
            and (both[0][shared].speaker == both[1][shared].speaker)
        ):
            shared += 1
        if shared == 0:
            raise ValueError("without 'prompt', chosen and rejected must start with the same messages")
        asked = _untrained(list(both[0][:shared]))
        pair = Pair(
            asked,
            _completion(chosen[shared:], "chosen"),
            _completion(rejected[shared:], "rejected"),
        )
        return _distinct(pair, "chosen", "rejected")
    asked = _untrained(_messages(prompt, "prompt"))
    pair = Pair(asked, _completion(chosen, "chosen"), _completion(rejected, "rejected"))
    return _distinct(pair, "chosen", "rejected")


PAIR_OF_FORMAT = {"openai_preference": openai_preference_pair, "preference": trl_preference_pair}
# What each pair format looks like, shown when a record's shape is not recognised.
PAIR_EXAMPLES = {
    "openai_preference": '{"input": {"messages": [{"role": "user", "content": "Hi"}]}, "preferred_output": '
    '[{"role": "assistant", "content": "Hello!"}], "non_preferred_output": [{"role": "assistant", '
    '"content": "What?"}]}',
    "preference": '{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}',
}


def recognise_pair_format(record: dict) -> str | None:
    if "preferred_output" in record or "non_preferred_output" in record:
        return "openai_preference"
    if "chosen" in record and "rejected" in record:
        return "preference"
    return None


def pairs_from_records(records: Iterable[dict], fmt: str) -> Pairs:
    """One pair per valid record of a pair format; the invalid ones are counted as dropped."""
    return Pairs(*convert_each(records, PAIR_OF_FORMAT[fmt], fmt))


def ranked_pairs_from_rows(
    rows: Iterable[dict], languages: list[str] | None, *, include_synthetic: bool = True
) -> Pairs:
    """oasst1 message rows → one pair per prompt with two or more ranked replies kept: the thread
    up to the prompt, its best-ranked reply (rank 0) chosen, its worst-ranked rejected."""
    by_id, dropped = kept_rows(rows, languages, include_synthetic)
    ranked: dict[str, list[dict]] = defaultdict(list)
    for row in by_id.values():
        if row["role"] == "assistant" and row.get("rank") is not None and row.get("parent_id") is not None:
            ranked[row["parent_id"]].append(row)
    pairs = []
    for parent_id, replies in ranked.items():
        parent = by_id.get(parent_id)
        if parent is None or parent["role"] != "prompter" or len(replies) < 2:
            if parent is not None and parent["role"] == "prompter":
                dropped["prompts_with_one_ranked_reply"] += 1
            continue
        thread = _thread(parent, by_id)
        if thread is None:
            dropped["prompts_missing_ancestor"] += 1
            continue
        replies.sort(key=lambda r: r["rank"])
        best, worst = replies[0], replies[-1]
        if best["rank"] == worst["rank"]:
            dropped["prompts_with_tied_replies"] += 1
            continue
        pairs.append(Pair([_turn(r) for r in thread], [_turn(best, True)], [_turn(worst, True)]))
    return Pairs(pairs, dropped)
