"""``tinc-hub nodes`` on a SQLite registry without SQLAlchemy.

Importing SQLAlchemy and building the registry's tables (registry.py) takes about 0.2-0.4 s on
a 2-core machine, as long as reading and printing 50,000 nodes; ``tinc-hub nodes`` is the
command admins run at fleet size. So a SQLite registry at exactly this code's schema is read
here with the sqlite3 module: the same query as RegistryView.listed_nodes()
(registry_contract.LISTED_NODES_SQL), in one read transaction, on a connection opened as the
Registry opens its own (read-write, never creating the file, the same busy timeout: a reader
never waits for a writer in WAL mode).

Everything else answers None and the caller goes through :class:`registry.Registry`, which
does what it does for every command: PostgreSQL, a missing file, a registry to upgrade or to
refuse (an older or newer schema, a legacy one without Alembic's table), and any database
error, which the Registry then reports as one line with a hint.
"""

import sqlite3
from contextlib import closing
from typing import List, Optional
from urllib.parse import quote

from .registry_contract import BUSY_TIMEOUT_MS, LISTED_NODES_SQL, SCHEMA_REVISION, VERSION_TABLE
from .registry_url import RegistryURL


def listed_nodes_sqlite(url: RegistryURL) -> Optional[List[tuple]]:
    """RegistryView.listed_nodes() of the SQLite registry ``url``; None when this is not a
    SQLite registry at this code's schema that can be read right now."""
    if url.dialect != "sqlite" or url.path is None or not url.path.is_file():
        return None
    uri = f"file:{quote(str(url.path.resolve()))}?mode=rw"  # never creates the file
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                                     isolation_level=None)) as conn:
            conn.execute("BEGIN")  # the revision and the rows from one commit
            try:
                revision = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
                if revision != [(SCHEMA_REVISION,)]:
                    return None
                return conn.execute(LISTED_NODES_SQL).fetchall()
            finally:
                conn.execute("ROLLBACK")
    except sqlite3.Error:
        return None
