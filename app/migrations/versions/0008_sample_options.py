"""samples carry a conversation, sampling options, token counts, and may ask the base alone

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29

A sample made before this revision was a single Human turn (`prompt`); it gets that as its
`messages`, so it reads as it was answered.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("messages", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("top_p", sa.Float(), nullable=False, server_default="1.0"))
        batch_op.add_column(sa.Column("stop", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("seed", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("finish_reason", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("prompt_tokens", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("completion_tokens", sa.Integer(), nullable=True))
    samples = sa.table(
        "samples", sa.column("id", sa.String), sa.column("prompt", sa.Text), sa.column("messages", sa.JSON)
    )
    connection = op.get_bind()
    for sample_id, prompt in connection.execute(sa.select(samples.c.id, samples.c.prompt)).all():
        connection.execute(
            samples.update()
            .where(samples.c.id == sample_id)
            .values(messages=[{"role": "user", "content": prompt}])
        )
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.alter_column("top_p", server_default=None)  # the existing rows are filled
        batch_op.alter_column("adapter", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        for column in (
            "completion_tokens",
            "prompt_tokens",
            "finish_reason",
            "seed",
            "stop",
            "top_p",
            "messages",
            "adapter",
        ):
            batch_op.drop_column(column)
