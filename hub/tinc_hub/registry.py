"""The SQLite registry of tokens and nodes.

All writes go through :meth:`Registry.exclusive` (an flock on a lock file next to the
database, shared by ``tinc-hub serve`` threads and CLI commands) and a ``BEGIN IMMEDIATE``
transaction, so spending a token use and allocating an address is one atomic step, and the
host file written after the commit cannot be overtaken by another writer. Reads (and the
enrolment pre-check) never take the lock: SQLite's WAL lets them run beside a writer.

The :class:`Registry` owns its connections; callers never see one. Each block hands out an
object whose methods run the queries on that block's connection::

    with registry.reading() as view:        # autocommit reads (a RegistryView)
        nodes = view.list_nodes()
    with registry.snapshot() as view:       # reads that all see one commit (a RegistryView)
        ...
    with registry.exclusive(), registry.transaction() as tx:   # a RegistryTransaction
        if tx.spend_token_use(token_hash): ...

Only a :class:`RegistryTransaction` has the write methods, so a write outside ``BEGIN
IMMEDIATE`` does not type-check. The object is valid only inside its ``with`` block.

A token is known by its id: the first TOKEN_ID_CHARS hex digits of the stored sha256 (unique;
``create_token`` draws another secret on a clash). The secret itself is never stored.
"""

import fcntl
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

TOKEN_ID_CHARS = 10
MIN_TOKEN_ID_PREFIX = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    secret_sha256 TEXT PRIMARY KEY,
    uses_total    INTEGER NOT NULL,
    uses_left     INTEGER NOT NULL CHECK (uses_left >= 0),
    expires_at    INTEGER NOT NULL,
    bound_name    TEXT,
    allow_replace INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
CREATE TABLE IF NOT EXISTS nodes (
    name          TEXT PRIMARY KEY,
    address       TEXT NOT NULL UNIQUE,
    address_int   INTEGER NOT NULL UNIQUE,
    public_key    TEXT NOT NULL UNIQUE,
    token_sha256  TEXT NOT NULL,
    enrolled_at   INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
"""

# Columns added after the first release: (table, column, type). upgrade_schema() adds them to
# an older registry.sqlite3; new columns go at the end, so SELECT * is the same on both.
ADDED_COLUMNS = (("tokens", "revoked_at", "INTEGER"),)

BUSY_TIMEOUT_MS = 30_000


def token_id(secret_sha256: str) -> str:
    """The short public id of a token (a prefix of the stored hash; never the secret)."""
    return secret_sha256[:TOKEN_ID_CHARS]


@dataclass(frozen=True)
class TokenRow:
    secret_sha256: str
    uses_total: int
    uses_left: int
    expires_at: int
    bound_name: Optional[str]
    allow_replace: bool
    created_at: int
    revoked_at: Optional[int] = None

    @property
    def id(self) -> str:
        return token_id(self.secret_sha256)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def status(self, now: int) -> str:
        """active, expired, spent or revoked (the first that applies: revoked, spent, expired)."""
        if self.revoked:
            return "revoked"
        if self.uses_left <= 0:
            return "spent"
        if now >= self.expires_at:
            return "expired"
        return "active"

    def can_enrol(self, now: int) -> bool:
        return self.status(now) == "active"


@dataclass(frozen=True)
class NodeRow:
    name: str
    address: str
    address_int: int
    public_key: str
    token_sha256: str
    enrolled_at: int
    updated_at: int
    revoked_at: Optional[int]

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def iso_utc(timestamp: Optional[int]) -> Optional[str]:
    """Unix seconds as ISO 8601 UTC (``2024-01-31T12:00:00Z``); None stays None."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class RegistryView:
    """The read queries, over the one connection of a :meth:`Registry.reading` or
    :meth:`Registry.snapshot` block (do not keep it past the block)."""

    _TOKEN_COLUMNS = ("secret_sha256, uses_total, uses_left, expires_at, bound_name, allow_replace,"
                      " created_at, revoked_at")
    _NODE_COLUMNS = ("name, address, address_int, public_key, token_sha256, enrolled_at,"
                     " updated_at, revoked_at")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    # -- tokens ------------------------------------------------------------------------
    @staticmethod
    def _token_row(r: tuple) -> TokenRow:
        return TokenRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7])

    def get_token(self, secret_sha256: str) -> Optional[TokenRow]:
        r = self._conn.execute(f"SELECT {self._TOKEN_COLUMNS} FROM tokens WHERE secret_sha256 = ?",
                               (secret_sha256,)).fetchone()
        return self._token_row(r) if r else None

    def list_tokens(self) -> List[TokenRow]:
        rows = self._conn.execute(f"SELECT {self._TOKEN_COLUMNS} FROM tokens"
                                  " ORDER BY created_at, secret_sha256").fetchall()
        return [self._token_row(r) for r in rows]

    def tokens_with_prefix(self, prefix: str) -> List[TokenRow]:
        """Tokens whose stored hash starts with ``prefix`` (lowercase hex, checked here)."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise ValueError(f"token id prefix must be lowercase hex, not {prefix!r}")
        rows = self._conn.execute(f"SELECT {self._TOKEN_COLUMNS} FROM tokens WHERE substr(secret_sha256, 1, ?) = ?"
                                  " ORDER BY created_at, secret_sha256", (len(prefix), prefix)).fetchall()
        return [self._token_row(r) for r in rows]

    def node_names_by_token(self) -> Dict[str, List[str]]:
        """token hash -> names of the nodes it last enrolled or re-keyed."""
        out: Dict[str, List[str]] = {}
        for sha, name in self._conn.execute("SELECT token_sha256, name FROM nodes ORDER BY address_int"):
            out.setdefault(sha, []).append(name)
        return out

    # -- nodes -------------------------------------------------------------------------
    def get_node(self, name: str) -> Optional[NodeRow]:
        r = self._conn.execute(f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE name = ?", (name,)).fetchone()
        return NodeRow(*r) if r else None

    def get_node_by_key(self, public_key: str) -> Optional[NodeRow]:
        r = self._conn.execute(f"SELECT {self._NODE_COLUMNS} FROM nodes WHERE public_key = ?",
                               (public_key,)).fetchone()
        return NodeRow(*r) if r else None

    def list_nodes(self) -> List[NodeRow]:
        rows = self._conn.execute(f"SELECT {self._NODE_COLUMNS} FROM nodes ORDER BY address_int").fetchall()
        return [NodeRow(*r) for r in rows]

    def used_address_ints(self) -> Set[int]:
        """Addresses held by any node row, revoked ones included (they are never reused)."""
        return {r[0] for r in self._conn.execute("SELECT address_int FROM nodes")}

    def count_nodes(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]


class RegistryTransaction(RegistryView):
    """The reads and the writes, inside the ``BEGIN IMMEDIATE`` of a
    :meth:`Registry.transaction` block (committed when the block ends without an exception)."""

    # -- tokens ------------------------------------------------------------------------
    def insert_token(self, row: TokenRow) -> None:
        self._conn.execute(
            "INSERT INTO tokens (secret_sha256, uses_total, uses_left, expires_at, bound_name,"
            " allow_replace, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.secret_sha256, row.uses_total, row.uses_left, row.expires_at, row.bound_name,
             int(row.allow_replace), row.created_at, row.revoked_at),
        )

    def revoke_token(self, secret_sha256: str, now: int) -> bool:
        """Set revoked_at (once); False when the token was already revoked or is unknown."""
        cur = self._conn.execute("UPDATE tokens SET revoked_at = ? WHERE secret_sha256 = ? AND revoked_at IS NULL",
                                 (now, secret_sha256))
        return cur.rowcount == 1

    def spend_token_use(self, secret_sha256: str) -> bool:
        """Decrement uses_left if positive and not revoked; False when nothing was left."""
        cur = self._conn.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE secret_sha256 = ? AND uses_left > 0"
            " AND revoked_at IS NULL", (secret_sha256,))
        return cur.rowcount == 1

    # -- nodes -------------------------------------------------------------------------
    def insert_node(self, row: NodeRow) -> None:
        self._conn.execute(
            "INSERT INTO nodes (name, address, address_int, public_key, token_sha256, enrolled_at,"
            " updated_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.name, row.address, row.address_int, row.public_key, row.token_sha256,
             row.enrolled_at, row.updated_at, row.revoked_at))

    def replace_node_key(self, name: str, public_key: str, token_sha256: str, now: int) -> None:
        self._conn.execute("UPDATE nodes SET public_key = ?, token_sha256 = ?, updated_at = ? WHERE name = ?",
                           (public_key, token_sha256, now, name))

    def mark_revoked(self, name: str, now: int) -> None:
        self._conn.execute("UPDATE nodes SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (now, name))

    def delete_node(self, name: str) -> None:
        self._conn.execute("DELETE FROM nodes WHERE name = ?", (name,))


class Registry:
    """Access to ``registry.sqlite3``: owns its connections (one per block, or one per thread
    kept open with ``keep_connections``) and hands out query objects per block."""

    def __init__(self, db_path: "os.PathLike[str] | str", lock_path: "os.PathLike[str] | str",
                 keep_connections: bool = False) -> None:
        self.db_path = Path(db_path)
        self.lock_path = Path(lock_path)
        self._thread_lock = threading.Lock()
        # serve: one connection per thread, opened once (opening costs more than a whole
        # enrolment, and closing the last one checkpoints the WAL). CLI: one per operation.
        self.keep_connections = keep_connections
        self._local = threading.local()

    # -- connections -------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode (transactions are explicit)."""
        conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def create(self) -> bool:
        """Create the database and schema if the file is missing; True when created.

        An existing database is not even opened (opening a WAL database creates and removes
        side files, touching the directory), so re-running ``init`` changes nothing on disk.
        """
        if not self.lock_path.exists():
            os.close(os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600))
        if self.db_path.exists():
            return False
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(SCHEMA)
        finally:
            conn.close()
        os.chmod(self.db_path, 0o600)
        return True

    def ensure_schema(self) -> None:
        """Create missing tables and columns (``serve`` start; idempotent)."""
        self.create()
        conn = self._connect()
        try:
            conn.executescript(SCHEMA)
        finally:
            conn.close()
        self.upgrade_schema()

    def _missing_columns(self, conn: sqlite3.Connection) -> List[tuple]:
        missing = []
        for table, column, kind in ADDED_COLUMNS:
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if have and column not in have:
                missing.append((table, column, kind))
        return missing

    def upgrade_schema(self) -> List[str]:
        """Add the columns a registry made by an older tinc-hub lacks; returns what was added.

        A current database is only read (nothing written, no lock taken); a missing one is
        left alone (the command that needs it reports that)."""
        if not self.db_path.exists():
            return []
        with self._connection() as conn:
            if not self._missing_columns(conn):
                return []
        added = []
        with self.exclusive(), self._immediate() as conn:
            for table, column, kind in self._missing_columns(conn):  # again, under the lock
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                added.append(f"{table}.{column}")
        return added

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the registry write lock (threads of this process and other processes)."""
        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if not self.keep_connections:
            conn = self._connect()
            try:
                yield conn
            finally:
                conn.close()
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        yield conn

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any exception)."""
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # a kept connection must never stay mid-transaction
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self) -> Iterator[RegistryTransaction]:
        """Reads and writes in one ``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on any
        exception). Writers hold :meth:`exclusive` around it."""
        with self._immediate() as conn:
            yield RegistryTransaction(conn)

    @contextmanager
    def reading(self) -> Iterator[RegistryView]:
        """Reads in autocommit mode: each statement sees the latest commit."""
        with self._connection() as conn:
            yield RegistryView(conn)

    @contextmanager
    def snapshot(self) -> Iterator[RegistryView]:
        """Reads in one read transaction: every statement sees the same commit. Takes no lock
        that a writer waits for (WAL), and is not the registry write lock."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                yield RegistryView(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

