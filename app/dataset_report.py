"""Validate an uploaded training file line by line, before any GPU time is spent.

Pure Python: the API runs it on upload. Token length statistics need the tokenizer and are
added later by the worker (`worker/analysis.py`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from app.conversations import (
    chat_turns,
    conversations_from_chats,
    conversations_from_rows,
    detect_format,
    flatten_trees,
)

MAX_PROBLEMS_LISTED = 100
UPLOAD_SUFFIXES = (".jsonl", ".json")
OASST_ROLES = ("prompter", "assistant")


def _row_problem(row: Any) -> str | None:
    """What is wrong with one oasst1 message row, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    wrong = [name for name in ("message_id", "text") if not isinstance(row.get(name), str)]
    if "parent_id" not in row:
        wrong.append("parent_id")
    if row.get("role") not in OASST_ROLES:
        wrong.append("role (prompter or assistant)")
    return f"missing or wrong fields: {', '.join(wrong)}" if wrong else None


def _record_problem(record: Any, fmt: str) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    if fmt == "chat":
        try:
            chat_turns(record)
        except ValueError as exc:
            return str(exc)
        return None
    if fmt == "oasst_trees":
        if not isinstance(record.get("prompt"), dict):
            return "missing or wrong fields: prompt"
        for row in flatten_trees([record]):
            problem = _row_problem(row)
            if problem:
                return f"message {row.get('message_id', '?')}: {problem}"
        return None
    return _row_problem(record)


def _numbered_records(path: Path) -> tuple[list[tuple[int, Any]], list[dict[str, Any]]]:
    """(line number, parsed value) for each non-blank line, and the lines that did not parse."""
    problems: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [], [{"line": None, "error": f"not UTF-8 text: {exc.reason} at byte {exc.start}"}]
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(i + 1, record) for i, record in enumerate(json.loads(text))], []
        except json.JSONDecodeError as exc:
            return [], [{"line": exc.lineno, "error": f"invalid JSON: {exc.msg} (column {exc.colno})"}]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append({"line": number, "error": f"invalid JSON: {exc.msg} (column {exc.colno})"})
    return records, problems


def _root_marker(row: dict) -> str | None:
    """Rows without a message_tree_id count their roots as trees."""
    return row["message_id"] if row.get("parent_id") is None else None


def validate_file(path: Path) -> dict[str, Any]:
    """A report: format, counts, languages, samples, drops, and each problem with its line.

    `valid` is true only when every line parsed, matched the format and at least one training
    sample can be built.
    """
    records, problems = _numbered_records(path)
    fmt = None
    first_object = next((r for _, r in records if isinstance(r, dict)), None)
    if first_object is not None:
        try:
            fmt = detect_format(first_object)
        except ValueError as exc:
            problems.append({"line": records[0][0], "error": str(exc)})
    good: list[Any] = []
    if fmt:
        for number, record in records:
            problem = _record_problem(record, fmt)
            if problem:
                problems.append({"line": number, "error": problem})
            else:
                good.append(record)
    report: dict[str, Any] = {"format": fmt, "records": len(records)}
    if fmt == "chat":
        conversations = conversations_from_chats(good)
    else:
        rows = list(flatten_trees(good)) if fmt == "oasst_trees" else good
        conversations = conversations_from_rows(rows, None)
        report["messages"] = len(rows)
        report["trees"] = len({row.get("message_tree_id") or _root_marker(row) for row in rows} - {None})
        report["languages"] = dict(Counter(row.get("lang") or "unknown" for row in rows).most_common())
    report["samples"] = len(conversations.samples)
    report["dropped"] = dict(conversations.dropped)
    if fmt and not problems and not conversations.samples:
        problems.append({"line": None, "error": "no training sample can be built from this file"})
    if not records and not problems:
        problems.append({"line": None, "error": "the file holds no records"})
    problems.sort(key=lambda p: (p["line"] is None, p["line"] or 0))
    report["problem_count"] = len(problems)
    report["problems"] = problems[:MAX_PROBLEMS_LISTED]
    report["valid"] = not problems
    return report
