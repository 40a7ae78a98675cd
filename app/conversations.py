"""Conversations as lists of turns, each saying whether its tokens carry loss; here the oasst1
shapes, whose records are threads (app/formats.py has the formats of one sample per record).
Pure Python (no torch, no tokenizer): cheap to test and to reuse.

- oasst1 message rows (`message_id`, `parent_id`, `role`, `text`, …), as `load_dataset` gives;
- OpenAssistant's nested tree export (`{message_tree_id, prompt: {…, replies: [...]}}`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

HUMAN, ASSISTANT, SYSTEM = "Human", "Assistant", "System"
# A turn of plain text, rendered as it is (no speaker): text and prompt/completion records
TEXT = ""
ROLE_NAMES = {"prompter": HUMAN, "user": HUMAN, "assistant": ASSISTANT, "system": SYSTEM}


@dataclass(frozen=True)
class Turn:
    speaker: str  # HUMAN, ASSISTANT or SYSTEM
    text: str
    train: bool = False  # whether this turn's tokens carry loss


@dataclass
class Conversations:
    samples: list[list[Turn]]
    dropped: Counter = field(default_factory=Counter)


def flatten_trees(trees: Iterable[dict]) -> Iterator[dict]:
    """Tree export → message rows with parent_id, the form the thread builder reads."""
    for tree in trees:
        stack = [(tree["prompt"], None)]
        while stack:
            node, parent_id = stack.pop()
            row = {k: v for k, v in node.items() if k != "replies"}
            row.setdefault("parent_id", parent_id)
            row.setdefault("message_tree_id", tree.get("message_tree_id"))
            yield row
            stack.extend((reply, node["message_id"]) for reply in reversed(node.get("replies") or []))


def drop_reason(row: dict, languages: set[str] | None, include_synthetic: bool) -> str | None:
    if row.get("deleted"):
        return "deleted"
    if row.get("review_result") is False:
        return "failed_review"
    if languages is not None and row.get("lang") not in languages:
        return "language"
    if not include_synthetic and row.get("synthetic"):
        return "synthetic"
    if not (row.get("text") or "").strip():
        return "empty_text"
    return None


def conversations_from_rows(
    rows: Iterable[dict],
    languages: list[str] | None,
    *,
    include_synthetic: bool = True,
    mode: str = "all_replies",
) -> Conversations:
    """Rebuild threads from parent_id.

    `all_replies`: one sample per kept assistant reply, its ancestors as context, loss on the
    reply. `best_path`: one sample per tree following the best-ranked reply at each level
    (the guanaco way), loss on every assistant turn.
    """
    by_id, dropped = kept_rows(rows, languages, include_synthetic)
    if mode == "best_path":
        return Conversations(_best_paths(by_id, dropped), dropped)
    samples = []
    for row in by_id.values():
        if row["role"] != "assistant":
            continue
        thread = _thread(row, by_id)
        if thread is None:
            dropped["replies_missing_ancestor"] += 1
            continue
        *context, reply = thread
        samples.append([_turn(r) for r in context] + [_turn(reply, train=True)])
    return Conversations(samples, dropped)


def kept_rows(
    rows: Iterable[dict], languages: list[str] | None, include_synthetic: bool
) -> tuple[dict[str, dict], Counter]:
    """The rows kept (by message id), and how many were dropped for each reason (`drop_reason`)."""
    wanted = set(languages) if languages is not None else None
    dropped: Counter = Counter()
    by_id: dict[str, dict] = {}
    for row in rows:
        reason = drop_reason(row, wanted, include_synthetic)
        if reason:
            dropped[f"rows_{reason}"] += 1
        else:
            by_id[row["message_id"]] = row
    return by_id, dropped


def _turn(row: dict, train: bool = False) -> Turn:
    return Turn(ROLE_NAMES[row["role"]], row["text"].strip(), train)


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


def _best_paths(by_id: dict[str, dict], dropped: Counter) -> list[list[Turn]]:
    children: dict[str, list[dict]] = defaultdict(list)
    for row in by_id.values():
        if row.get("parent_id") is not None:
            children[row["parent_id"]].append(row)
    samples = []
    for root in (r for r in by_id.values() if r.get("parent_id") is None):
        path, node = [root], root
        while children.get(node["message_id"]):
            node = min(children[node["message_id"]], key=_rank_order)
            path.append(node)
        turns = [_turn(r, train=r["role"] == "assistant") for r in path]
        if any(t.train for t in turns):
            samples.append(turns)
        else:
            dropped["trees_without_reply"] += 1
    return samples


def _rank_order(row: dict) -> tuple[bool, int]:
    """Best first: rank 0, 1, …; unranked replies last."""
    return (row.get("rank") is None, row.get("rank") or 0)
