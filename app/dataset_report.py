"""Validate an uploaded training file line by line, before any GPU time is spent.

Pure Python, run by the API on upload, in bounded memory whatever the file's size: records are
read one line at a time and checked on their own; what needs the whole file (which oasst1
message rows form threads) is worked out in an index on disk. Token length statistics need
the tokenizer and are added later by a worker (`worker/analysis.py`).
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.conversations import conversations_from_rows, drop_reason, flatten_trees
from app.formats import BY_NAME, detect_format
from app.preferences import PAIR_FORMATS, PAIR_OF_FORMAT, methods_of_format, ranked_pairs_from_rows

MAX_PROBLEMS_LISTED = 100
UPLOAD_SUFFIXES = (".jsonl", ".json", ".parquet")
# A Parquet upload is read this many rows at a time (its memory stays bounded by a batch).
PARQUET_BATCH_ROWS = 1024
OASST_ROLES = ("prompter", "assistant")
# One record per line may be this long; a file that is one JSON array this large at most
# (larger ones: JSON Lines, which is read a line at a time).
MAX_LINE_BYTES = 16 << 20
MAX_JSON_ARRAY_BYTES = 16 << 20
# Languages counted by name; the rest are counted together.
MAX_LANGUAGES = 100


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
    if fmt in BY_NAME or fmt in PAIR_OF_FORMAT:
        try:
            BY_NAME[fmt].turns(record) if fmt in BY_NAME else PAIR_OF_FORMAT[fmt](record)
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


def _parse(line: bytes) -> tuple[Any, str | None]:
    """(value, None), or (None, why the line is not a JSON value)."""
    if len(line) > MAX_LINE_BYTES:
        return None, f"line longer than {MAX_LINE_BYTES >> 20} MiB"
    try:
        return json.loads(line.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text: {exc.reason} at byte {exc.start}"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply"


def numbered_records(path: Path) -> Iterator[tuple[int | None, Any, str | None]]:
    """(line number, parsed value, None) for each non-blank line of a JSON Lines file (or each
    element of a file holding one JSON array, or each row of a Parquet file), or (line, None,
    why) for one that did not parse."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    with path.open("rb") as file:
        head = file.read(64).lstrip()
        file.seek(0)
        if path.suffix == ".json" and head.startswith(b"["):
            text = file.read(MAX_JSON_ARRAY_BYTES + 1)
            if len(text) > MAX_JSON_ARRAY_BYTES:
                limit = MAX_JSON_ARRAY_BYTES >> 20
                yield None, None, f"a JSON array over {limit} MiB: send JSON Lines (.jsonl), a record a line"
                return
            records, problem = _parse(text)
            if problem is not None or not isinstance(records, list):
                yield None, None, problem or "not a JSON array"
                return
            for index, record in enumerate(records):
                yield index + 1, record, None
            return
        for number, line in enumerate(file, start=1):
            if line.strip():
                record, problem = _parse(line.rstrip(b"\r\n"))
                yield number, record, problem


def _parquet_rows(path: Path) -> Iterator[tuple[int | None, Any, str | None]]:
    """A Parquet file's rows as records, a batch at a time (row numbers from 1)."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
        number = 0
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                number += 1
                yield number, record, None
    except (pyarrow.ArrowException, OSError) as exc:
        yield None, None, f"not a readable Parquet file: {exc}"


def first_record_format(path: Path) -> str | None:
    """The format of a local dataset file's first record; None for a folder, or a file whose
    first record is not one this service reads (training reports that)."""
    if not path.is_file():
        return None
    for _line, record, problem in numbered_records(path):
        if problem is not None or not isinstance(record, dict):
            return None
        try:
            return detect_format(record)
        except ValueError:
            return None
    return None


class ThreadIndex:
    """oasst1 message rows, reduced to what threads need, in a SQLite file on disk: how many
    assistant replies have every ancestor present and kept (a sample each), and how many prompts
    with a whole thread have two or more ranked replies kept (a preference pair each,
    app.preferences.ranked_pairs_from_rows)."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="finetune-threads-")
        self.db = sqlite3.connect(Path(self._folder.name) / "index.db")
        self.db.execute(
            "CREATE TABLE rows "
            "(id TEXT PRIMARY KEY, parent TEXT, kept INT, assistant INT, tree TEXT, rank INT)"
        )
        self._batch: list[tuple] = []

    def add(self, row: dict, kept: bool) -> None:
        tree = row.get("message_tree_id") or (row["message_id"] if row.get("parent_id") is None else None)
        rank = row.get("rank") if isinstance(row.get("rank"), int) else None
        assistant = row["role"] == "assistant"
        self._batch.append((row["message_id"], row.get("parent_id"), kept, assistant, tree, rank))
        if len(self._batch) >= 2_000:
            self._flush()

    def _flush(self) -> None:
        self.db.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?, ?, ?, ?)", self._batch)
        self._batch = []

    def counts(self) -> tuple[int, int, int, int]:
        """(samples, kept replies missing an ancestor, trees, pairs)."""
        self._flush()
        self.db.execute("CREATE INDEX rows_parent ON rows (parent)")
        self.db.execute(
            """
            CREATE TABLE whole AS
            WITH RECURSIVE whole(id) AS (
                SELECT id FROM rows WHERE parent IS NULL AND kept
                UNION ALL
                SELECT rows.id FROM rows JOIN whole ON rows.parent = whole.id WHERE rows.kept
            )
            SELECT id FROM whole
            """
        )
        self.db.execute("CREATE INDEX whole_id ON whole (id)")
        ((samples, missing),) = self.db.execute(
            """
            SELECT count(whole.id), count(*) - count(whole.id)
            FROM rows LEFT JOIN whole ON rows.id = whole.id
            WHERE rows.kept AND rows.assistant
            """
        )
        (pairs,) = self.db.execute(
            """
            SELECT count(*) FROM (
                SELECT rows.parent FROM rows
                JOIN whole ON rows.parent = whole.id
                JOIN rows AS parent ON parent.id = rows.parent AND NOT parent.assistant
                WHERE rows.kept AND rows.assistant AND rows.rank IS NOT NULL
                GROUP BY rows.parent HAVING count(DISTINCT rows.rank) >= 2
            )
            """
        ).fetchone()
        (trees,) = self.db.execute("SELECT count(DISTINCT tree) FROM rows").fetchone()
        return samples, missing, trees, pairs

    def close(self) -> None:
        self.db.close()
        self._folder.cleanup()


class Report:
    """Counts and problems, gathered one record at a time."""

    def __init__(self) -> None:
        self.fmt: str | None = None
        self.records = 0
        self.samples = 0
        self.pairs = 0
        self.messages = 0
        self.trees = 0
        self.languages: Counter = Counter()
        self.dropped: Counter = Counter()
        self.problems: list[dict[str, Any]] = []
        self.problem_count = 0
        self.threads: ThreadIndex | None = None

    def problem(self, line: int | None, error: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append({"line": line, "error": error})

    def add(self, line: int | None, record: Any) -> None:
        self.records += 1
        if self.fmt is None:
            if not isinstance(record, dict):
                self.problem(line, "not a JSON object")
                return
            try:
                self.fmt = detect_format(record)
            except ValueError as exc:
                self.problem(line, str(exc))
                return
        problem = _record_problem(record, self.fmt)
        if problem:
            self.problem(line, problem)
        elif self.fmt in BY_NAME:
            self.samples += 1
        elif self.fmt in PAIR_FORMATS:
            self.pairs += 1
        elif self.fmt == "oasst_trees":
            rows = list(flatten_trees([record]))
            self._count_rows(rows)
            conversations = conversations_from_rows(rows, None)
            self.samples += len(conversations.samples)
            self.pairs += len(ranked_pairs_from_rows(rows, None).pairs)
            self.dropped.update(conversations.dropped)
            self.trees += 1
        else:
            self._count_rows([record])
            if self.threads is None:
                self.threads = ThreadIndex()
            self.threads.add(record, kept=drop_reason(record, None, True) is None)

    def _count_rows(self, rows: list[dict]) -> None:
        self.messages += len(rows)
        for row in rows:
            language = row.get("lang") or "unknown"
            known = language in self.languages or len(self.languages) < MAX_LANGUAGES
            self.languages[language if known else "other"] += 1
            if self.fmt == "oasst_rows":
                reason = drop_reason(row, None, True)
                if reason:
                    self.dropped[f"rows_{reason}"] += 1

    def finish(self) -> dict[str, Any]:
        if self.threads is not None:
            samples, missing, self.trees, pairs = self.threads.counts()
            self.samples += samples
            self.pairs += pairs
            if missing:
                self.dropped["replies_missing_ancestor"] += missing
            self.threads.close()
        methods = methods_of_format(self.fmt)
        report: dict[str, Any] = {"format": self.fmt, "records": self.records, "methods": methods}
        if self.fmt not in ("chat", *PAIR_FORMATS):
            report["messages"] = self.messages
            report["trees"] = self.trees
            report["languages"] = dict(self.languages.most_common())
        if self.fmt not in PAIR_FORMATS:
            report["samples"] = self.samples
        if "dpo" in methods:  # preference pairs, for method dpo (oasst1: from its replies' ranks)
            report["pairs"] = self.pairs
        report["dropped"] = dict(self.dropped)
        if self.fmt and not self.problem_count and not self.samples and not self.pairs:
            what = "preference pair" if self.fmt in PAIR_FORMATS else "training sample"
            self.problem(None, f"no {what} can be built from this file")
        if not self.records and not self.problem_count:
            self.problem(None, "the file holds no records")
        self.problems.sort(key=lambda p: (p["line"] is None, p["line"] or 0))
        report["problem_count"] = self.problem_count
        report["problems"] = self.problems
        report["valid"] = not self.problem_count
        return report


def validate_file(path: Path) -> dict[str, Any]:
    """A report: format, counts, languages, samples, drops, and each problem with its line (the
    first MAX_PROBLEMS_LISTED; `problem_count` counts all).

    `valid` is true only when every line parsed, matched the format and at least one training
    sample can be built.
    """
    report = Report()
    for line, record, problem in numbered_records(path):
        if problem is not None:
            report.problem(line, problem)
        else:
            report.add(line, record)
    return report.finish()
