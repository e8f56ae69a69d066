"""Ephemeral nodes: removed once offline for a while (tinc-hub token create --ephemeral).

- ``tokens.ephemeral_seconds``: NULL, or how long a node this token enrols may be offline
  before the hubs remove it.
- ``nodes.ephemeral_seconds``: copied from the token at enrolment (a later revocation or expiry
  of the token does not change it); NULL for an ordinary node. ``nodes.last_seen_at``: the last
  time a hub saw the node online (its tincd reachable, or a successful sync); NULL for
  ordinary nodes.
- ``removed_nodes``: tombstones of nodes removed with their name and address released (an
  ephemeral node offline too long, or ``revoke --release``): the name (the other hubs remove
  its host file), the sync credential's hash (a machine that comes back is told why it is
  refused), when, and how long it had been offline (NULL: removed by an admin). Pruned after
  some days.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("tokens", sa.Column("ephemeral_seconds", sa.Integer))
    op.add_column("nodes", sa.Column("ephemeral_seconds", sa.Integer))
    op.add_column("nodes", sa.Column("last_seen_at", BigInt))
    op.create_table(
        "removed_nodes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("credential_sha256", sa.Text),
        sa.Column("removed_at", BigInt, nullable=False),
        sa.Column("offline_seconds", BigInt),
    )
    op.create_index("removed_nodes_by_credential", "removed_nodes", ["credential_sha256"])


def downgrade() -> None:
    raise NotImplementedError("registry schemas are only upgraded")
