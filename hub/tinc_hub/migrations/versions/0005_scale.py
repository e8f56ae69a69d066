"""Enrolment at fleet size: no statement of an enrolment reads every node.

- ``nodes_by_lower_name``: an index on ``lower(name)``, so the check that a new name does not
  differ from another only in case (NAME.NET is lower case) is a lookup, not a scan.
- The address allocation keeps ``settings.address_floor`` ("NETWORK FLOOR": every host address
  below FLOOR is held), written by the first allocation and lowered by every removal
  (registry.py, RegistryTransaction.allocate_address_int). No row is needed here: without one
  the search starts at the first address. This revision also keeps a tinc-hub older than it,
  which removes rows without lowering the floor, from writing the registry (it refuses a
  revision it does not know).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("nodes_by_lower_name", "nodes", [sa.text("lower(name)")])


def downgrade() -> None:
    op.drop_index("nodes_by_lower_name", table_name="nodes")
    op.execute("DELETE FROM settings WHERE key = 'address_floor'")
