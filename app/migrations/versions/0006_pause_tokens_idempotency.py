"""pause requests, trained tokens, idempotent job creation

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("trained_tokens", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("request_sha256", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_request_sha256"), ["request_sha256"], unique=False)
        batch_op.create_unique_constraint("uq_jobs_owner_idempotency_key", ["owner", "idempotency_key"])
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("pause_requested", server_default=None)  # the existing rows are filled


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_jobs_owner_idempotency_key", type_="unique")
        batch_op.drop_index(batch_op.f("ix_jobs_request_sha256"))
        batch_op.drop_column("request_sha256")
        batch_op.drop_column("idempotency_key")
        batch_op.drop_column("trained_tokens")
        batch_op.drop_column("pause_requested")
