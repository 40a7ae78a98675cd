"""Dataset formats whose every record is one sample: what each looks like, how it is recognised,
and how it becomes turns. (oasst1 message rows and tree exports, whose records are threads, are
app/conversations.py's.) Pure Python: the upload report and the trainer read the same rules.

Each converter raises ValueError saying what is wrong with a record, in the record's own terms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app.conversations import ASSISTANT, HUMAN, SYSTEM, TEXT, Conversations, Turn

CHAT_ROLES = {"user": HUMAN, "assistant": ASSISTANT, "system": SYSTEM, "developer": SYSTEM}
SHAREGPT_ROLES = {
    "human": HUMAN,
    "user": HUMAN,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "chatgpt": ASSISTANT,
    "system": SYSTEM,
}
TOOL_CALLS = (
    "tool calls are not trained here: drop the tool messages and `tool_calls`, or write what "
    "they did into the assistant's text"
)


@dataclass(frozen=True)
class RecordFormat:
    name: str
    example: str  # one line, shown when a record's shape is not recognised
    recognise: Callable[[dict], bool]
    turns: Callable[[dict], list[Turn]]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be non-empty text")
    return value.strip()


def _raw(value: Any, where: str) -> str:
    """Plain text kept exactly as written (its spaces are part of what is learned)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be non-empty text")
    return value


def _weight(message: dict, where: str) -> bool:
    """OpenAI's per-message `weight`: 0 keeps the reply as context without loss, 1 trains it."""
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise ValueError(f"{where}.weight must be 0 or 1")
    return weight == 1


def _content(content: Any, where: str) -> str:
    """A message's content: text, or OpenAI's content parts, of which only text is trained on."""
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(
                    f"{where}[{index}] is a {kind or 'malformed'!s} part; only text parts can be trained on"
                )
            texts.append(part["text"])
        content = "".join(texts)
    return _text(content, where)


def _messages(messages: Any, where: str, train: bool = True) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'{where}' must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at} is not an object")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise ValueError(f"{at}: {TOOL_CALLS}")
        if role not in CHAT_ROLES:
            raise ValueError(f"{at}.role must be user, assistant or system, not {role!r}")
        reply = role == "assistant"
        learns = reply and train and _weight(message, at)
        turns.append(Turn(CHAT_ROLES[role], _content(message.get("content"), f"{at}.content"), learns))
    return turns


def _learns_something(turns: list[Turn]) -> list[Turn]:
    if not any(t.train for t in turns):
        raise ValueError("no assistant message to learn from")
    return turns


def chat_turns(record: dict) -> list[Turn]:
    """OpenAI's chat format (and TRL's `messages`): loss on every assistant message whose
    `weight` isn't 0."""
    return _learns_something(_messages(record.get("messages"), "messages"))


def sharegpt_turns(record: dict) -> list[Turn]:
    """ShareGPT: `conversations` of `{"from": human|gpt|system, "value": …}`."""
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'conversations' must be a non-empty list")
    turns = []
    for index, message in enumerate(messages):
        at = f"conversations[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at} is not an object")
        speaker = SHAREGPT_ROLES.get(message.get("from"))  # type: ignore[arg-type]
        if speaker is None:
            raise ValueError(f"{at}.from must be human, gpt or system, not {message.get('from')!r}")
        learns = speaker == ASSISTANT and _weight(message, at)
        turns.append(Turn(speaker, _text(message.get("value"), f"{at}.value"), learns))
    return _learns_something(turns)


def alpaca_turns(record: dict) -> list[Turn]:
    """Alpaca: the `instruction` (and its `input`, after a blank line) asks, `output` answers."""
    ask = _text(record.get("instruction"), "instruction")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError("input must be text")
    if extra and extra.strip():
        ask += "\n\n" + extra.strip()
    turns = [Turn(SYSTEM, _text(record["system"], "system"))] if record.get("system") else []
    return turns + [Turn(HUMAN, ask), Turn(ASSISTANT, _text(record.get("output"), "output"), True)]


def prompt_completion_turns(record: dict) -> list[Turn]:
    """TRL's prompt/completion: plain text (the completion continues the prompt as it is, loss
    on the completion), or conversational (lists of messages; loss on the completion's)."""
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        asked = _messages(prompt, "prompt", train=False)
        return _learns_something(asked + _messages(completion, "completion"))
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be text, or a list of messages")
    return [Turn(TEXT, prompt), Turn(TEXT, _raw(completion, "completion"), True)]


def text_turns(record: dict) -> list[Turn]:
    """Plain text: language-model loss on all of it."""
    return [Turn(TEXT, _raw(record.get("text"), "text"), True)]


# In the order records are recognised (after oasst1's rows and trees, which also have `text`
# and `prompt` fields).
RECORD_FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat(
        "chat",
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
        lambda r: "messages" in r,
        chat_turns,
    ),
    RecordFormat(
        "sharegpt",
        '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
        lambda r: "conversations" in r,
        sharegpt_turns,
    ),
    RecordFormat(
        "alpaca",
        '{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}',
        lambda r: "instruction" in r and "output" in r,
        alpaca_turns,
    ),
    RecordFormat(
        "prompt_completion",
        '{"prompt": "The capital of France is", "completion": " Paris."}',
        lambda r: "prompt" in r and "completion" in r,
        prompt_completion_turns,
    ),
    RecordFormat("text", '{"text": "Once upon a time…"}', lambda r: "text" in r, text_turns),
)
BY_NAME = {f.name: f for f in RECORD_FORMATS}


def convert_each(records: Iterable[dict], convert: Callable[[dict], Any], fmt: str) -> tuple[list, Counter]:
    """`convert(record)` of each record of format `fmt`, and how many it refused (dropped)."""
    converted, dropped = [], Counter[str]()
    for record in records:
        try:
            converted.append(convert(record))
        except (ValueError, AttributeError, TypeError):
            dropped[f"{fmt}_records_invalid"] += 1
    return converted, dropped


def conversations_from_records(records: Iterable[dict], fmt: str) -> Conversations:
    """One sample per valid record of format `fmt`; the invalid ones are counted as dropped."""
    return Conversations(*convert_each(records, BY_NAME[fmt].turns, fmt))


def detect_format(record: dict) -> str:
    """The format of a dataset's first record; ValueError listing every accepted shape."""
    if "prompt" in record and "message_tree_id" in record:
        return "oasst_trees"
    if "message_id" in record and "role" in record:
        return "oasst_rows"
    from app.preferences import PAIR_EXAMPLES, recognise_pair_format  # it reads this module

    pairs = recognise_pair_format(record)
    if pairs is not None:
        return pairs
    for candidate in RECORD_FORMATS:
        if candidate.recognise(record):
            return candidate.name
    shapes = "; ".join(f"{f.name}: {f.example}" for f in RECORD_FORMATS)
    shapes += "; " + "; ".join(f"{name} (method dpo): {example}" for name, example in PAIR_EXAMPLES.items())
    raise ValueError(
        f"unrecognised record with fields {sorted(record)[:8]}; accepted: {shapes}; and oasst1 "
        "message rows or tree exports"
    )
