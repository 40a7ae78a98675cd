"""oasst1 message rows into conversations: one sample per assistant reply, ancestors as context.

Pure Python (no torch, no tokenizer), so it is cheap to test and to reuse for reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

HUMAN, ASSISTANT = "Human", "Assistant"
ROLE_NAMES = {"prompter": HUMAN, "user": HUMAN, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Turn:
    speaker: str  # HUMAN or ASSISTANT
    text: str


@dataclass
class Conversations:
    samples: list[list[Turn]]
    dropped: Counter = field(default_factory=Counter)


def _kept(row: dict, languages: set[str] | None) -> str | None:
    """Why a row is dropped, or None when it is kept."""
    if row.get("deleted"):
        return "deleted"
    if row.get("review_result") is False:
        return "failed_review"
    if languages is not None and row.get("lang") not in languages:
        return "language"
    if not (row.get("text") or "").strip():
        return "empty_text"
    return None


def conversations_from_rows(rows: Iterable[dict], languages: list[str] | None) -> Conversations:
    """Rebuild threads from parent_id; each kept assistant reply becomes one sample."""
    wanted = set(languages) if languages is not None else None
    dropped: Counter = Counter()
    by_id: dict[str, dict] = {}
    for row in rows:
        reason = _kept(row, wanted)
        if reason:
            dropped[f"rows_{reason}"] += 1
        else:
            by_id[row["message_id"]] = row
    samples = []
    for row in by_id.values():
        if row["role"] != "assistant":
            continue
        thread = _thread(row, by_id)
        if thread is None:
            dropped["replies_missing_ancestor"] += 1
            continue
        samples.append([Turn(ROLE_NAMES[r["role"]], r["text"].strip()) for r in thread])
    return Conversations(samples, dropped)


def _thread(reply: dict, by_id: dict[str, dict]) -> list[dict] | None:
    """The reply with its ancestors, root first; None when an ancestor was dropped or is absent."""
    thread = [reply]
    parent_id = reply.get("parent_id")
    while parent_id is not None:
        parent = by_id.get(parent_id)
        if parent is None:
            return None
        thread.append(parent)
        parent_id = parent.get("parent_id")
    thread.reverse()
    return thread
