"""What the registry shares with its URL parser and its migrations: the errors it raises and
the key of its PostgreSQL write lock (here, so that registry.py, registry_url.py and
migrations/ import from one place below them, not from each other)."""

from .errors import HubError

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
