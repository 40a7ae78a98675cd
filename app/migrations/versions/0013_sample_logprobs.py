"""samples may continue token ids, echo their prompt and carry log-probabilities (OpenAI's
`prompt` as token ids, `echo`, `logprobs`)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-09
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt_ids", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("echo", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("top_logprobs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("logprobs", sa.JSON(), nullable=True))
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.alter_column("echo", server_default=None)  # the existing rows are filled


def downgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        for column in ("logprobs", "top_logprobs", "echo", "prompt_ids"):
            batch_op.drop_column(column)
