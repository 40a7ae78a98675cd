"""Which local files a job may read: those under FINETUNE_LOCAL_ROOTS and outside the data dir
(which holds every owner's uploads and files: those are reached by id only), with symbolic
links resolved at every depth of a folder, not only the name the spec gives.

The API checks a spec's names when the job is submitted (and resumed); the worker checks again
right before it opens them (`confined`), since a folder can change in between."""

from __future__ import annotations

import os
from pathlib import Path

from app.settings import get_settings

# The one answer for a name that is neither a hub id nor an allowed local path: the same whether
# or not such a file exists, and without the server's folders in it.
NOT_A_MODEL_OR_DATASET = (
    "must be a hub id like 'org/name' (optionally '@revision') or a path under the server's folders "
    "for local models and data (FINETUNE_LOCAL_ROOTS)"
)

# More entries than this under a local model or dataset folder is refused: the walk that checks
# their links must end (a dataset of many shards has hundreds).
MAX_FOLDER_ENTRIES = 10_000


class LocalPathRefused(ValueError):
    """A local model or dataset the job may not read, with the reason."""


def _inside_roots(path: Path) -> bool:
    settings = get_settings()
    return not path.is_relative_to(settings.data_dir) and any(
        path.is_relative_to(root) for root in settings.local_roots
    )


def _escaping_entry(folder: Path) -> str | None:
    """The first entry under `folder` (as a name relative to it) that is a link leading outside
    the roots or into the data dir, following linked folders as readers do; None if there is
    none."""
    seen: set[Path] = set()
    entries = 0
    for directory, folders, files in os.walk(folder, followlinks=True):
        real = Path(directory).resolve()
        if real in seen:  # a link back up the tree: its entries were checked already
            folders.clear()
            continue
        seen.add(real)
        for name in folders + files:
            entries += 1
            if entries > MAX_FOLDER_ENTRIES:
                raise LocalPathRefused(f"holds more than {MAX_FOLDER_ENTRIES:,} files and folders")
            entry = Path(directory) / name
            if entry.is_symlink() and not _inside_roots(entry.resolve()):
                return str(entry.relative_to(folder))
    return None


def allowed_local_path(value: str) -> Path | None:
    """`value` as an existing local file or folder a job may read, made absolute with symbolic
    links resolved; None unless it lies under the roots and outside the data dir. A folder
    holding a link that leads elsewhere is refused naming that link."""
    try:
        path = Path(value).expanduser().resolve()
        if not (_inside_roots(path) and path.exists()):
            return None
        link = _escaping_entry(path) if path.is_dir() else None
    except (OSError, ValueError, RuntimeError):  # too long a file name, a NUL byte, ~unknown_user
        return None
    if link is not None:
        raise LocalPathRefused(
            f"{link} in this folder is a link to a file outside the server's folders for local models "
            "and data (FINETUNE_LOCAL_ROOTS); links may only lead to files under them"
        )
    return path


def names_a_local_path(value: str) -> bool:
    """Whether `value` is spelled as a local path rather than a hub id: absolute, starting with
    `./`, `../` or `~`, or starting with the folder name of a local root (`examples/…`), so a
    typo there is answered as a missing file instead of being looked up on the hub."""
    if value.startswith(("/", "./", "../", "~")):
        return True
    try:
        first = Path(Path(value).parts[0]).resolve()
    except (IndexError, OSError, ValueError, RuntimeError):
        return False
    return first in get_settings().local_roots


def _under_a_root(value: str) -> bool:
    try:
        return _inside_roots(Path(value).expanduser().resolve())
    except (OSError, ValueError, RuntimeError):
        return False


def missing_local_path_problem(value: str) -> str:
    """What to answer for a local-looking name that is not an allowed path: under a root it is
    simply missing (a user may know what is there); elsewhere the one answer that tells nothing."""
    if _under_a_root(value):
        return f"no such file or folder under the server's folders for local models and data: {value}"
    return NOT_A_MODEL_OR_DATASET


def confined(value: str) -> Path:
    """The check right before a job's local model or dataset is read (by the worker, or before a
    resume): the path, or LocalPathRefused saying why (moved or deleted since the job was
    submitted, or a link added)."""
    path = allowed_local_path(value)
    if path is not None:
        return path
    if _under_a_root(value):
        raise LocalPathRefused(missing_local_path_problem(value))
    raise LocalPathRefused(
        f"{value} is not under the server's folders for local models and data (FINETUNE_LOCAL_ROOTS)"
    )
