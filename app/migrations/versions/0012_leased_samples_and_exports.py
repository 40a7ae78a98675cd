"""samples and exports are leased as jobs are: attempts, lease owner and expiry; when their id
was last sent while they wait to be taken, and how often it was sent again

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08

A row running at the upgrade was taken without a lease: it gets one that has already expired,
so the sweeper re-queues it (or fails it with the reason) like any other. A queued row counts as
sent when it was created.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("samples", "exports")


def upgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
            batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
            batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
            batch_op.create_index(
                batch_op.f(f"ix_{name}_lease_expires_at"), ["lease_expires_at"], unique=False
            )
            batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
            batch_op.add_column(sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))
            batch_op.create_index(batch_op.f(f"ix_{name}_dispatched_at"), ["dispatched_at"], unique=False)
        table = sa.table(
            name,
            sa.column("status", sa.String),
            sa.column("created_at", sa.DateTime(timezone=True)),
            sa.column("dispatched_at", sa.DateTime(timezone=True)),
            sa.column("attempts", sa.Integer),
            sa.column("lease_owner", sa.String),
            sa.column("lease_expires_at", sa.DateTime(timezone=True)),
        )
        op.get_bind().execute(
            table.update()
            .where(table.c.status == "running")
            .values(
                attempts=1, lease_owner="unknown (taken before leases)", lease_expires_at=datetime.now(UTC)
            )
        )
        op.get_bind().execute(
            table.update().where(table.c.status == "queued").values(dispatched_at=table.c.created_at)
        )
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.alter_column("attempts", server_default=None)  # the existing rows are filled
            batch_op.alter_column("resends", server_default=None)


def downgrade() -> None:
    for name in TABLES:
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{name}_dispatched_at"))
            batch_op.drop_column("resends")
            batch_op.drop_column("dispatched_at")
            batch_op.drop_index(batch_op.f(f"ix_{name}_lease_expires_at"))
            batch_op.drop_column("lease_expires_at")
            batch_op.drop_column("lease_owner")
            batch_op.drop_column("attempts")
