"""jobs get a priority, their GPU needs and the worker class they were routed to; workers their
class; owners' turns (issue 29: routing, priorities, fair share)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

Stored specs gain `priority: normal`, what every job stored before it meant (frozen here, not
read from app.spec: see 0007 for why); downgrade leaves them (the field means what those jobs
meant all along).
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from app.migrations.stored_specs import rewrite_stored_specs

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_MEANING: dict[str, Any] = {"priority": "normal"}


def filled(spec: dict[str, Any]) -> dict[str, Any] | None:
    """`spec` with the missing fields written in, or None when it lacks none."""
    result = {**OLD_MEANING, **spec}
    return None if result == spec else result


def upgrade() -> None:
    # Jobs stored before have the default priority (normal) and need one GPU of any memory:
    # routed as every job was before, to whichever worker is free.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("needs_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("needs_gpus", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("needs_bf16", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("routed_to", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("preempted_for", sa.String(length=40), nullable=True))
        batch_op.create_index(
            "ix_jobs_dispatch_order", ["status", "routed_to", "priority", "owner", "created_at"], unique=False
        )
        batch_op.create_index("ix_jobs_status_owner", ["status", "owner"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in ("priority", "needs_gpus", "needs_bf16"):
            batch_op.alter_column(column, server_default=None)  # the existing rows are filled
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpu_class", sa.String(length=64), nullable=True))
    op.create_table(
        "owner_turns",
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("last_turn_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner"),
    )
    rewrite_stored_specs(filled)


def downgrade() -> None:
    op.drop_table("owner_turns")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("gpu_class")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_owner")
        batch_op.drop_index("ix_jobs_dispatch_order")
        for column in ("preempted_for", "routed_to", "needs_bf16", "needs_gpus", "needs_bytes", "priority"):
            batch_op.drop_column(column)
