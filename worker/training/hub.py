"""Fetching from the Hugging Face hub, with errors that say what could not be fetched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.local_paths import confined

# What transformers' and datasets' errors say when the hub can't be reached or offline mode
# is on (both raise a plain OSError / ConnectionError).
UNREACHABLE_SIGNS = ("couldn't connect", "couldn't reach", "offline", "connection", "timed out")


class HubFetchFailed(OSError):
    """A model, tokenizer or dataset named by hub id could not be fetched."""


@contextmanager
def fetching(kind: str, name: str) -> Iterator[None]:
    """Re-raise a failure to fetch `name` (a hub id) as one that names it. A local path (made
    absolute when the job was submitted) is checked again first, as it is now: still there,
    under the allowed roots, with no link in it leading elsewhere (`confined`); its own errors
    pass through."""
    local = Path(name).is_absolute()
    if local:
        confined(name)
    try:
        yield
    except OSError as exc:
        if local:
            raise
        if any(sign in str(exc).lower() for sign in UNREACHABLE_SIGNS):
            reason = (
                "the Hugging Face hub could not be reached (no network, or HF_HUB_OFFLINE is set) and it "
                "is not in this worker's cache (HF_HOME)"
            )
        else:
            reason = str(exc).splitlines()[0]
        raise HubFetchFailed(f"could not fetch the {kind} {name!r}: {reason}") from exc
