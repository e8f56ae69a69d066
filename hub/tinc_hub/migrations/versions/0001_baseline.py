"""The registry schema of tinc-hub before Alembic: tokens and nodes.

Also adopts a registry made before Alembic (no alembic_version table): the tables that exist
are kept with their rows, and tokens.revoked_at (added by hand to the first release's schema)
is added where it is missing.

Revision ID: 0001
Revises: -
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# SQLite: INTEGER, as the hand-written schema had; PostgreSQL: 64-bit (times past 2038,
# addresses above 2^31).
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Flag = sa.Boolean().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("tokens"):
        op.create_table(
            "tokens",
            sa.Column("secret_sha256", sa.Text, primary_key=True),
            sa.Column("uses_total", sa.Integer, nullable=False),
            sa.Column("uses_left", sa.Integer, nullable=False),
            sa.Column("expires_at", BigInt, nullable=False),
            sa.Column("bound_name", sa.Text),
            sa.Column("allow_replace", Flag, nullable=False, server_default=sa.false()),
            sa.Column("created_at", BigInt, nullable=False),
            sa.Column("revoked_at", BigInt),
            sa.CheckConstraint("uses_left >= 0", name="tokens_uses_left_not_negative"),
        )
    elif "revoked_at" not in {c["name"] for c in inspector.get_columns("tokens")}:
        op.add_column("tokens", sa.Column("revoked_at", BigInt))
    if not inspector.has_table("nodes"):
        op.create_table(
            "nodes",
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("address", sa.Text, nullable=False),
            sa.Column("address_int", BigInt, nullable=False),
            sa.Column("public_key", sa.Text, nullable=False),
            sa.Column("token_sha256", sa.Text, nullable=False),
            sa.Column("enrolled_at", BigInt, nullable=False),
            sa.Column("updated_at", BigInt, nullable=False),
            sa.Column("revoked_at", BigInt),
            sa.UniqueConstraint("address", name="nodes_address_unique"),
            sa.UniqueConstraint("address_int", name="nodes_address_int_unique"),
            sa.UniqueConstraint("public_key", name="nodes_public_key_unique"),
        )


def downgrade() -> None:
    raise NotImplementedError("the first registry schema has no older one to go back to")
