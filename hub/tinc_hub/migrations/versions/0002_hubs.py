"""Several hubs: hubs are rows of ``nodes`` (kind 'hub') plus a ``hubs`` row; ``settings``
(net, vpn_subnet, generation); the node credential's hash.

- ``nodes.kind``: 'node' (every existing row) or 'hub'. Hubs sit in ``nodes`` so that its
  UNIQUE constraints (name, address, address_int, public_key) hold across hubs and nodes.
- ``nodes.credential_sha256``: sha256 of the node credential (``POST /v1/sync``); NULL until
  the node gets one. ``nodes.credential_used_at``: when the node first showed it (a sync or a
  replay carrying it); NULL while the node may never have received it.
- ``hubs``: what only a hub has (public address, tinc and API ports, TLS pin, removal time).
- ``settings``: ``net`` and ``vpn_subnet`` (written by the first hub that runs this code; a
  hub with other values refuses the registry), ``generation`` (bumped by every write
  transaction: hubs follow the registry by it).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("nodes", sa.Column("kind", sa.Text, nullable=False, server_default="node"))
    op.add_column("nodes", sa.Column("credential_sha256", sa.Text))
    op.add_column("nodes", sa.Column("credential_used_at", BigInt))
    op.create_table(
        "hubs",
        sa.Column("name", sa.Text, sa.ForeignKey("nodes.name", name="hubs_name_is_a_node"),
                  primary_key=True),
        sa.Column("public_address", sa.Text, nullable=False),
        sa.Column("tinc_port", sa.Integer, nullable=False),
        sa.Column("api_port", sa.Integer, nullable=False),
        sa.Column("tls_pin", sa.Text, nullable=False),
        sa.Column("joined_at", BigInt, nullable=False),
        sa.Column("removed_at", BigInt),
    )
    settings = op.create_table(
        "settings",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.bulk_insert(settings, [{"key": "generation", "value": "0"}])


def downgrade() -> None:
    raise NotImplementedError("registry schemas are only upgraded")
