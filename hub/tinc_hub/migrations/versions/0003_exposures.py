"""Exposures: services of nodes the hubs publish on their public addresses (tinc-hub expose).

- ``exposures``: one row per published port: the node (``nodes.name``) and its port, the
  address the hubs listen on (NULL: every local address) and the listen port, the protocol
  ('tcp' or 'udp'), whether the hubs rewrite the client's address to their own (``snat``), and
  when it was made. A listen (proto, port) is published once (UNIQUE). Ids are given by the
  writer under the registry write lock (max + 1), never by a sequence.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Bool = sa.Boolean().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "exposures",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("node_name", sa.Text, sa.ForeignKey("nodes.name", name="exposures_node_is_a_node"),
                  nullable=False),
        sa.Column("node_port", sa.Integer, nullable=False),
        sa.Column("listen_address", sa.Text),
        sa.Column("listen_port", sa.Integer, nullable=False),
        sa.Column("proto", sa.Text, nullable=False),
        sa.Column("snat", Bool, nullable=False),
        sa.Column("created_at", BigInt, nullable=False),
        sa.CheckConstraint("proto IN ('tcp', 'udp')", name="exposures_proto"),
        sa.CheckConstraint("node_port BETWEEN 1 AND 65535 AND listen_port BETWEEN 1 AND 65535",
                           name="exposures_ports"),
        sa.UniqueConstraint("proto", "listen_port", name="exposures_listen_once"),
    )


def downgrade() -> None:
    raise NotImplementedError("registry schemas are only upgraded")
