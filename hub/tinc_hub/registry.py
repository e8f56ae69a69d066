"""The SQLite registry of tokens and nodes.

All writes go through :meth:`Registry.exclusive` (an flock on a lock file next to the
database, shared by ``tinc-hub serve`` threads and CLI commands) and a ``BEGIN IMMEDIATE``
transaction, so spending a token use and allocating an address is one atomic step, and the
host file written after the commit cannot be overtaken by another writer. Reads (and the
enrolment pre-check) never take the lock: SQLite's WAL lets them run beside a writer.

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


class Registry:
    """Access to ``registry.sqlite3``; cheap to construct, one connection per operation."""

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
    def connect(self) -> sqlite3.Connection:
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
        conn = self.connect()
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
        conn = self.connect()
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
        with self.reading() as conn:
            if not self._missing_columns(conn):
                return []
        added = []
        with self.exclusive(), self.transaction() as conn:
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
            conn = self.connect()
            try:
                yield conn
            finally:
                conn.close()
            return
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
        yield conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
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
    def reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for reads (autocommit: each statement sees the latest commit)."""
        with self._connection() as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement sees the same commit. Takes no lock that a
        writer waits for (WAL), and is not the registry write lock."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    # -- tokens ------------------------------------------------------------------------
    @staticmethod
    def insert_token(conn: sqlite3.Connection, row: TokenRow) -> None:
        conn.execute(
            "INSERT INTO tokens (secret_sha256, uses_total, uses_left, expires_at, bound_name,"
            " allow_replace, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.secret_sha256, row.uses_total, row.uses_left, row.expires_at, row.bound_name,
             int(row.allow_replace), row.created_at, row.revoked_at),
        )

    _TOKEN_COLUMNS = ("secret_sha256, uses_total, uses_left, expires_at, bound_name, allow_replace,"
                      " created_at, revoked_at")

    @staticmethod
    def _token_row(r: tuple) -> TokenRow:
        return TokenRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7])

    @classmethod
    def get_token(cls, conn: sqlite3.Connection, secret_sha256: str) -> Optional[TokenRow]:
        r = conn.execute(f"SELECT {cls._TOKEN_COLUMNS} FROM tokens WHERE secret_sha256 = ?",
                         (secret_sha256,)).fetchone()
        return cls._token_row(r) if r else None

    @classmethod
    def list_tokens(cls, conn: sqlite3.Connection) -> List[TokenRow]:
        rows = conn.execute(f"SELECT {cls._TOKEN_COLUMNS} FROM tokens"
                            " ORDER BY created_at, secret_sha256").fetchall()
        return [cls._token_row(r) for r in rows]

    @classmethod
    def tokens_with_prefix(cls, conn: sqlite3.Connection, prefix: str) -> List[TokenRow]:
        """Tokens whose stored hash starts with ``prefix`` (lowercase hex, checked here)."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise ValueError(f"token id prefix must be lowercase hex, not {prefix!r}")
        rows = conn.execute(f"SELECT {cls._TOKEN_COLUMNS} FROM tokens WHERE substr(secret_sha256, 1, ?) = ?"
                            " ORDER BY created_at, secret_sha256", (len(prefix), prefix)).fetchall()
        return [cls._token_row(r) for r in rows]

    @staticmethod
    def revoke_token(conn: sqlite3.Connection, secret_sha256: str, now: int) -> bool:
        """Set revoked_at (once); False when the token was already revoked or is unknown."""
        cur = conn.execute("UPDATE tokens SET revoked_at = ? WHERE secret_sha256 = ? AND revoked_at IS NULL",
                           (now, secret_sha256))
        return cur.rowcount == 1

    @staticmethod
    def node_names_by_token(conn: sqlite3.Connection) -> Dict[str, List[str]]:
        """token hash -> names of the nodes it last enrolled or re-keyed."""
        out: Dict[str, List[str]] = {}
        for sha, name in conn.execute("SELECT token_sha256, name FROM nodes ORDER BY address_int"):
            out.setdefault(sha, []).append(name)
        return out

    @staticmethod
    def spend_token_use(conn: sqlite3.Connection, secret_sha256: str) -> bool:
        """Decrement uses_left if positive and not revoked; False when nothing was left."""
        cur = conn.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE secret_sha256 = ? AND uses_left > 0"
            " AND revoked_at IS NULL", (secret_sha256,))
        return cur.rowcount == 1

    # -- nodes -------------------------------------------------------------------------
    _NODE_COLUMNS = ("name, address, address_int, public_key, token_sha256, enrolled_at,"
                     " updated_at, revoked_at")

    @classmethod
    def get_node(cls, conn: sqlite3.Connection, name: str) -> Optional[NodeRow]:
        r = conn.execute(f"SELECT {cls._NODE_COLUMNS} FROM nodes WHERE name = ?", (name,)).fetchone()
        return NodeRow(*r) if r else None

    @classmethod
    def get_node_by_key(cls, conn: sqlite3.Connection, public_key: str) -> Optional[NodeRow]:
        r = conn.execute(f"SELECT {cls._NODE_COLUMNS} FROM nodes WHERE public_key = ?",
                         (public_key,)).fetchone()
        return NodeRow(*r) if r else None

    @classmethod
    def list_nodes(cls, conn: sqlite3.Connection) -> List[NodeRow]:
        rows = conn.execute(f"SELECT {cls._NODE_COLUMNS} FROM nodes ORDER BY address_int").fetchall()
        return [NodeRow(*r) for r in rows]

    @staticmethod
    def used_address_ints(conn: sqlite3.Connection) -> Set[int]:
        """Addresses held by any node row, revoked ones included (they are never reused)."""
        return {r[0] for r in conn.execute("SELECT address_int FROM nodes")}

    @staticmethod
    def count_nodes(conn: sqlite3.Connection) -> int:
        return conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]

    @staticmethod
    def insert_node(conn: sqlite3.Connection, row: NodeRow) -> None:
        conn.execute(
            "INSERT INTO nodes (name, address, address_int, public_key, token_sha256, enrolled_at,"
            " updated_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row.name, row.address, row.address_int, row.public_key, row.token_sha256,
             row.enrolled_at, row.updated_at, row.revoked_at))

    @staticmethod
    def replace_node_key(conn: sqlite3.Connection, name: str, public_key: str, token_sha256: str,
                         now: int) -> None:
        conn.execute("UPDATE nodes SET public_key = ?, token_sha256 = ?, updated_at = ? WHERE name = ?",
                     (public_key, token_sha256, now, name))

    @staticmethod
    def mark_revoked(conn: sqlite3.Connection, name: str, now: int) -> None:
        conn.execute("UPDATE nodes SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL", (now, name))

    @staticmethod
    def delete_node(conn: sqlite3.Connection, name: str) -> None:
        conn.execute("DELETE FROM nodes WHERE name = ?", (name,))

    # -- test / debugging aid --------------------------------------------------------------
    def dump(self) -> List[tuple]:
        """Every row of every table, in a stable order (used to prove a request changed nothing)."""
        with self.reading() as conn:
            out: List[tuple] = []
            for table, order in (("tokens", "secret_sha256"), ("nodes", "name")):
                out.extend((table,) + tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}"))
            return out
