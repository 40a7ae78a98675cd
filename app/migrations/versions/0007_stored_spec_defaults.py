"""stored job specs name the fields added since the first schema, with what they meant then

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29

A job's spec is stored with every field JobSpec had when the job was created; a field added
later is missing from it and is read with today's default. Where that default means something
other than what the job was created under, a resumed job would train differently from its
first run: `training.packing` is on by default since 2026-11-27 (d951d71), so a job stored before
it resumed packed (docs/known-issues.md until this revision). This writes, into every stored spec
lacking one of these fields, the value it meant before the field existed. The values are frozen
here, not read from app.spec, so later changes of a default leave this revision as it is.

Downgrade is a no-op: the values written are what those jobs meant all along, and which keys
this revision wrote cannot be told from keys a job was created with.
"""

from collections.abc import Sequence
from typing import Any

from app.migrations.stored_specs import rewrite_stored_specs

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (section, field) -> the value a stored spec without the field was trained under. Every field
# added to JobSpec after the first schema (cb06a25), in the order they came.
OLD_MEANING: dict[tuple[str | None, str], Any] = {
    # 3d6dc3f: the first data loader read oasst1 message rows (auto reads them as rows), one
    # sample per assistant reply, synthetic messages kept: the new defaults mean the same.
    ("dataset", "format"): "auto",
    ("dataset", "conversations"): "all_replies",
    ("dataset", "include_synthetic"): True,
    # ee50081: no evaluation before it; the new default ("validation") evaluates on oasst1's
    # validation split, so the old meaning is null.
    ("dataset", "validation_split"): None,
    ("dataset", "validation_source"): None,
    ("dataset", "max_eval_samples"): None,
    ("training", "eval_steps"): None,
    # d951d71: every sample padded to its own row; the new default (true) packs.
    ("training", "packing"): False,
    # 691b93d, 5779e0a, 18f44fe: no notification, one GPU, no name or labels.
    (None, "notify_url"): None,
    ("resources", "gpus"): 1,
    (None, "name"): None,
    (None, "metadata"): None,
    # 8307f2e: the only packing there was groups each optimizer step's samples.
    ("training", "packing_mode"): "per_step",
}


def filled(spec: dict[str, Any]) -> dict[str, Any] | None:
    """`spec` with the missing fields written in, or None when it lacks none."""
    result = dict(spec)
    for (section, field), value in OLD_MEANING.items():
        if section is None:
            result.setdefault(field, value)
            continue
        part = result.get(section)
        part = dict(part) if isinstance(part, dict) else {}
        part.setdefault(field, value)
        result[section] = part
    return None if result == spec else result


def upgrade() -> None:
    rewrite_stored_specs(filled)


def downgrade() -> None:
    pass
