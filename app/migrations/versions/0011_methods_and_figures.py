"""job methods (supervised, dpo) and init_from in stored specs; each metric row's figures

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

- `metrics.figures`: a JSON object of a method's own figures at that step (DPO's rewards of the
  chosen and rejected replies, their margin, its accuracy, and the eval set's), so the next
  method's figures need no schema change.
- `datasets.format` holds names up to 32 characters (`openai_preference`).
- Stored specs gain `method` and `init_from` with what every job stored before them meant: a
  supervised job started from a new adapter. The values are frozen here, not read from app.spec
  (see 0007 for why). Downgrade drops the column and leaves the specs: the fields written mean
  what those jobs meant all along.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from app.migrations.stored_specs import rewrite_stored_specs

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_MEANING: dict[str, Any] = {"method": {"type": "supervised", "dpo": None}, "init_from": None}


def filled(spec: dict[str, Any]) -> dict[str, Any] | None:
    """`spec` with the missing fields written in, or None when it lacks none."""
    result = dict(spec)
    for field, value in OLD_MEANING.items():
        result.setdefault(field, value)
    return None if result == spec else result


def upgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("figures", sa.JSON(), nullable=True))
    with op.batch_alter_table("datasets") as batch:  # "openai_preference" has 17 characters
        batch.alter_column("format", type_=sa.String(length=32), existing_type=sa.String(length=16))
    rewrite_stored_specs(filled)


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("format", type_=sa.String(length=16), existing_type=sa.String(length=32))
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("figures")
