"""What the registry shares with its URL parser, its migrations and the SQLite read of
listings (registry_read.py): the errors it raises, the key of its PostgreSQL write lock, the
schema revision, the listing query and how timestamps are shown (here, so that registry.py,
registry_url.py, registry_read.py and migrations/ import from one place below them, not from
each other, and none of it imports SQLAlchemy)."""

import time
from typing import Optional

from .errors import HubError

# The Alembic head revision of tinc_hub/migrations (tests/test_registry_migrations.py checks it).
SCHEMA_REVISION = "0005"
VERSION_TABLE = "alembic_version"

BUSY_TIMEOUT_MS = 30_000

# RegistryView.listed_nodes() and registry_read.listed_nodes_sqlite(): the columns of a node
# that ``tinc-hub nodes`` shows, in this order, for every node (not the hubs) in address order.
# Plain SQL that SQLite and PostgreSQL run alike (tests/test_listing.py runs it on both).
LISTED_NODE_FIELDS = ("name", "address", "enrolled_at", "revoked_at", "ephemeral_seconds", "last_seen_at")
LISTED_NODES_SQL = (f"SELECT {', '.join(LISTED_NODE_FIELDS)} FROM nodes WHERE kind = 'node'"
                    " ORDER BY address_int")


def iso_utc(timestamp: Optional[int]) -> Optional[str]:
    """Unix seconds as ISO 8601 UTC (``2024-01-31T12:00:00Z``); None stays None."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))

# pg_advisory_xact_lock key of the registry write lock ("tinc-hub" in ASCII, as a bigint).
WRITE_LOCK_KEY = 0x74696E632D687562


class RegistryError(HubError):
    """A registry failure the CLI shows as one line with a hint."""


class RegistryConflict(RegistryError):
    """A write broke a constraint (a name, address or key taken meanwhile)."""


class RegistryUnavailable(RegistryError):
    """The database cannot be reached or used (PostgreSQL down, file unreadable, locked)."""


class RegistrySchemaError(RegistryError):
    """The registry's schema is newer than this tinc-hub knows, or not a registry at all."""
