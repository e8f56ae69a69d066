"""The registry of tokens and nodes, on SQLAlchemy Core: SQLite (one hub, the default file
``registry.sqlite3`` in the state dir) or PostgreSQL (several hubs, ``postgresql://…``).

All writes go through :meth:`Registry.exclusive` (an flock on a lock file in the state dir,
shared by ``tinc-hub serve`` threads and CLI commands of this machine) and
:meth:`Registry.transaction`, so spending a token use and allocating an address is one atomic
step, and the host file written after the commit cannot be overtaken by another writer of this
hub. How a write transaction excludes the other writers depends on the database:

- SQLite: ``BEGIN IMMEDIATE`` (one writer per database file; WAL, ``synchronous = FULL``).
- PostgreSQL: ``BEGIN`` (READ COMMITTED) then ``pg_advisory_xact_lock(WRITE_LOCK_KEY)``, taken
  by every writer of every hub and released by COMMIT/ROLLBACK: write transactions run one at a
  time across all hubs, and each statement after the lock sees every earlier writer's commit.
  The UNIQUE constraints on nodes.name, nodes.address, nodes.address_int and nodes.public_key
  and CHECK (uses_left >= 0) hold even for a writer that skipped the lock (a conflict is a
  :class:`RegistryConflict`, never a duplicate).

Reads (and the enrolment pre-check) never take the lock: SQLite's WAL and PostgreSQL's MVCC let
them run beside a writer.

The :class:`Registry` owns its connections (a pool); callers never see one. Each block hands out
an object whose methods run the queries on that block's connection::

    with registry.reading() as view:        # autocommit reads (a RegistryView)
        nodes = view.list_nodes()
    with registry.snapshot() as view:       # reads that all see one commit (a RegistryView)
        ...
    with registry.exclusive(), registry.transaction() as tx:   # a RegistryTransaction
        if tx.spend_token_use(token_hash): ...

Only a :class:`RegistryTransaction` has the write methods. The object is valid only inside its
``with`` block. Database errors leave as :class:`RegistryError` subclasses (one line, a hint,
never a password).

The schema is managed by Alembic (tinc_hub/migrations); :data:`SCHEMA_REVISION` is the head
revision this code knows (tests check it against the scripts), so a current registry is
recognised without importing Alembic.

A token is known by its id: the first TOKEN_ID_CHARS hex digits of the stored sha256 (unique;
``create_token`` draws another secret on a clash). The secret itself is never stored.
"""

import fcntl
import ipaddress
import logging
import os
import threading
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AbstractSet, Any, Dict, Iterator, List, Optional, Sequence, Set

import sqlalchemy as sa

# the errors and the lock key live below this module (callers may import them from here too)
from .registry_contract import (WRITE_LOCK_KEY, RegistryConflict, RegistryError,  # noqa: F401
                                RegistrySchemaError, RegistryUnavailable)
# and what the SQLite read of listings (registry_read.py) shares with it, without SQLAlchemy
from .registry_contract import (BUSY_TIMEOUT_MS, LISTED_NODE_FIELDS, LISTED_NODES_SQL,  # noqa: F401
                                SCHEMA_REVISION, VERSION_TABLE, iso_utc)

if TYPE_CHECKING:
    from .registry_url import RegistryURL
    from .state import StateDir

TOKEN_ID_CHARS = 10
MIN_TOKEN_ID_PREFIX = 6

# serve: connections kept open (opening costs more than a whole enrolment). SQLite: one per
# API worker thread (anyio's default limit, 40), so that no writer holding the write lock waits
# for a connection. PostgreSQL: fewer, as every hub's pool counts against max_connections
# (default 100); a thread past them waits for one.
SQLITE_POOL_SIZE = 40
POSTGRES_POOL_SIZE = 16
# Address allocation (RegistryTransaction.allocate_address_int): rows read per query of its
# scan, and the settings key of the lowest address that may be free (see there).
ADDRESS_SCAN_BATCH = 256
ADDRESS_FLOOR = "address_floor"

metadata = sa.MetaData()
_BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: today's INTEGER columns

tokens = sa.Table(
    "tokens", metadata,
    sa.Column("secret_sha256", sa.Text, primary_key=True),
    sa.Column("uses_total", sa.Integer, nullable=False),
    sa.Column("uses_left", sa.Integer, sa.CheckConstraint("uses_left >= 0"), nullable=False),
    sa.Column("expires_at", _BigInt, nullable=False),
    sa.Column("bound_name", sa.Text),
    sa.Column("allow_replace", sa.Boolean().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.Column("created_at", _BigInt, nullable=False),
    sa.Column("revoked_at", _BigInt),
    sa.Column("ephemeral_seconds", sa.Integer),
)

nodes = sa.Table(
    "nodes", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, nullable=False, unique=True),
    sa.Column("address_int", _BigInt, nullable=False, unique=True),
    sa.Column("public_key", sa.Text, nullable=False, unique=True),
    sa.Column("token_sha256", sa.Text, nullable=False),
    sa.Column("enrolled_at", _BigInt, nullable=False),
    sa.Column("updated_at", _BigInt, nullable=False),
    sa.Column("revoked_at", _BigInt),
    sa.Column("kind", sa.Text, nullable=False, server_default="node"),  # 'node' or 'hub'
    sa.Column("credential_sha256", sa.Text),
    sa.Column("credential_used_at", _BigInt),
    sa.Column("ephemeral_seconds", sa.Integer),
    sa.Column("last_seen_at", _BigInt),
)

hubs = sa.Table(
    "hubs", metadata,
    sa.Column("name", sa.Text, sa.ForeignKey("nodes.name"), primary_key=True),
    sa.Column("public_address", sa.Text, nullable=False),
    sa.Column("tinc_port", sa.Integer, nullable=False),
    sa.Column("api_port", sa.Integer, nullable=False),
    sa.Column("tls_pin", sa.Text, nullable=False),
    sa.Column("joined_at", _BigInt, nullable=False),
    sa.Column("removed_at", _BigInt),
)

exposures = sa.Table(
    "exposures", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("node_name", sa.Text, sa.ForeignKey("nodes.name"), nullable=False),
    sa.Column("node_port", sa.Integer, nullable=False),
    sa.Column("listen_address", sa.Text),
    sa.Column("listen_port", sa.Integer, nullable=False),
    sa.Column("proto", sa.Text, nullable=False),
    sa.Column("snat", sa.Boolean().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.Column("created_at", _BigInt, nullable=False),
)

removed_nodes = sa.Table(  # tombstones (revision 0004)
    "removed_nodes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("credential_sha256", sa.Text),
    sa.Column("removed_at", _BigInt, nullable=False),
    sa.Column("offline_seconds", _BigInt),
)

settings = sa.Table(
    "settings", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

NODE, HUB = "node", "hub"  # nodes.kind
# the PostgreSQL channel every write transaction notifies (at its commit)
CHANGES_CHANNEL = "tinc_hub_changes"


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
    ephemeral_seconds: Optional[int] = None  # nodes it enrols are ephemeral (removed when offline)

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
    kind: str = NODE
    credential_sha256: Optional[str] = None  # never shown; POST /v1/sync compares with it
    credential_used_at: Optional[int] = None  # first shown by the node (None: maybe never received)
    ephemeral_seconds: Optional[int] = None  # removed once offline this long (None: never)
    last_seen_at: Optional[int] = None  # last time a hub saw it online (ephemeral nodes only)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class Tombstone:
    """A node removed with its name and address released (``removed_nodes``)."""
    name: str
    credential_sha256: Optional[str]
    removed_at: int
    offline_seconds: Optional[int]  # None: removed by an admin (revoke --release)


@dataclass(frozen=True)
class HubRow:
    """A hub: its tinc identity (its row of ``nodes``) and where it is."""
    name: str
    address: str  # VPN address
    address_int: int
    public_key: str
    public_address: str  # host name or IPv4 address nodes and hubs connect to
    tinc_port: int
    api_port: int
    tls_pin: str
    joined_at: int
    removed_at: Optional[int] = None

    @property
    def removed(self) -> bool:
        return self.removed_at is not None


@dataclass(frozen=True)
class ExposureRow:
    """A service of a node published by the hubs (tinc-hub expose), with the node's VPN
    address and whether the node is revoked (joined from ``nodes``)."""
    id: int
    node_name: str
    node_port: int
    listen_address: Optional[str]  # None: every local address of the hub
    listen_port: int
    proto: str  # 'tcp' or 'udp'
    snat: bool
    created_at: int
    node_address: str = ""
    node_revoked: bool = False


_TOKEN_COLUMNS = [tokens.c[name] for name in TokenRow.__dataclass_fields__]
_NODE_COLUMNS = [nodes.c[name] for name in NodeRow.__dataclass_fields__]
_HUB_COLUMNS = [nodes.c.name, nodes.c.address, nodes.c.address_int, nodes.c.public_key,
                hubs.c.public_address, hubs.c.tinc_port, hubs.c.api_port, hubs.c.tls_pin,
                hubs.c.joined_at, hubs.c.removed_at]


def _token_row(r: Any) -> TokenRow:
    return TokenRow(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8])


def _node_row(r: Any) -> NodeRow:
    return NodeRow(*r)


class _Statements:
    """Every query, built once with bound parameters (see :class:`_Runner`)."""

    P = sa.bindparam
    token_by_hash = sa.select(*_TOKEN_COLUMNS).where(tokens.c.secret_sha256 == P("sha"))
    tokens_in_order = sa.select(*_TOKEN_COLUMNS).order_by(tokens.c.created_at, tokens.c.secret_sha256)
    tokens_by_prefix = (sa.select(*_TOKEN_COLUMNS)
                        .where(sa.func.substr(tokens.c.secret_sha256, 1, P("length")) == P("prefix"))
                        .order_by(tokens.c.created_at, tokens.c.secret_sha256))
    is_node = nodes.c.kind == NODE
    names_by_token = (sa.select(nodes.c.token_sha256, nodes.c.name).where(is_node)
                      .order_by(nodes.c.address_int))
    node_by_name = sa.select(*_NODE_COLUMNS).where(nodes.c.name == P("name"))  # hubs too
    node_by_key = sa.select(*_NODE_COLUMNS).where(nodes.c.public_key == P("key"))  # hubs too
    names_ignoring_case = sa.select(nodes.c.name).where(  # hubs too (NAME.NET is lower case)
        sa.func.lower(nodes.c.name) == sa.func.lower(P("name")))
    nodes_in_order = sa.select(*_NODE_COLUMNS).where(is_node).order_by(nodes.c.address_int)
    # a listing's rows (tinc-hub nodes): only the columns it shows; the SQL registry_read.py
    # also runs on a SQLite registry without SQLAlchemy
    nodes_listed = sa.text(LISTED_NODES_SQL)
    rows_in_order = sa.select(*_NODE_COLUMNS).order_by(nodes.c.address_int)  # hubs too (copy)
    address_ints = sa.select(nodes.c.address_int)  # hubs too: an address is never handed out twice
    # the allocation's scan: addresses held from P("start") on, on the unique index of address_int
    held_addresses_from = (sa.select(nodes.c.address_int)
                           .where(nodes.c.address_int >= P("start"), nodes.c.address_int <= P("last"))
                           .order_by(nodes.c.address_int).limit(ADDRESS_SCAN_BATCH))
    address_of = sa.select(nodes.c.address_int).where(nodes.c.name == P("name"))
    # rows not revoked, counted up to P("limit") (names.py: "too many to send" without reading them)
    count_active_up_to = sa.select(sa.func.count()).select_from(
        sa.select(sa.literal_column("1")).select_from(nodes).where(nodes.c.revoked_at.is_(None))
        .limit(P("limit")).subquery())
    count_nodes = sa.select(sa.func.count()).select_from(nodes).where(is_node)
    # hubs first: the few hub rows drive the join, where SQLite's planner would scan every node
    # for an inner join (it never reorders an outer one; list_hubs drops a hub without its node)
    hubs_in_order = (sa.select(*_HUB_COLUMNS).select_from(hubs.outerjoin(nodes, nodes.c.name == hubs.c.name))
                     .order_by(hubs.c.joined_at, nodes.c.name))
    insert_hub = hubs.insert().values({c.name: sa.bindparam(c.name) for c in hubs.c})
    update_hub = (hubs.update().where(hubs.c.name == P("name"))
                  .values(public_address=P("public_address"), tinc_port=P("tinc_port"),
                          api_port=P("api_port"), tls_pin=P("tls_pin")))
    update_hub_key = (nodes.update().where(nodes.c.name == P("name"), nodes.c.kind == HUB)
                      .values(public_key=P("key"), address=P("address"), address_int=P("address_int"),
                              updated_at=P("now")))
    remove_hub = (hubs.update().where(hubs.c.name == P("name"), hubs.c.removed_at.is_(None))
                  .values(removed_at=P("now")))
    revoke_hub_row = (nodes.update().where(nodes.c.name == P("name"), nodes.c.kind == HUB,
                                           nodes.c.revoked_at.is_(None))
                      .values(revoked_at=P("now")))
    all_settings = sa.select(settings.c.key, settings.c.value)
    setting = sa.select(settings.c.value).where(settings.c.key == P("key"))
    insert_setting = settings.insert().values(key=P("key"), value=P("value"))
    update_setting = settings.update().where(settings.c.key == P("key")).values(value=P("value"))
    # one statement on every write transaction (the migration made the row)
    bump_generation = (settings.update().where(settings.c.key == "generation")
                       .values(value=sa.cast(sa.cast(settings.c.value, sa.BigInteger) + 1, sa.Text)))
    credential_of = sa.select(nodes.c.credential_sha256).where(nodes.c.name == P("name"), is_node)
    set_credential = (nodes.update().where(nodes.c.name == P("name"), nodes.c.kind == NODE)
                      .values(credential_sha256=P("sha"), credential_used_at=None))
    mark_credential_used = (nodes.update().where(nodes.c.name == P("name"), nodes.c.kind == NODE,
                                                 nodes.c.credential_sha256 == P("sha"),
                                                 nodes.c.credential_used_at.is_(None))
                            .values(credential_used_at=P("now")))
    count_tokens = sa.select(sa.func.count()).select_from(tokens)
    insert_token = tokens.insert().values({c.name: sa.bindparam(c.name) for c in _TOKEN_COLUMNS})
    revoke_token = (tokens.update().where(tokens.c.secret_sha256 == P("sha"), tokens.c.revoked_at.is_(None))
                    .values(revoked_at=P("now")))
    spend_token_use = (tokens.update().where(tokens.c.secret_sha256 == P("sha"), tokens.c.uses_left > 0,
                                             tokens.c.revoked_at.is_(None))
                       .values(uses_left=tokens.c.uses_left - 1))
    insert_node = nodes.insert().values({c.name: sa.bindparam(c.name) for c in _NODE_COLUMNS})
    replace_node_key = (nodes.update().where(nodes.c.name == P("name"))
                        .values(public_key=P("key"), token_sha256=P("token"), updated_at=P("now")))
    mark_revoked = (nodes.update().where(nodes.c.name == P("name"), nodes.c.kind == NODE,
                                         nodes.c.revoked_at.is_(None))
                    .values(revoked_at=P("now")))
    delete_node = nodes.delete().where(nodes.c.name == P("name"), nodes.c.kind == NODE)
    # ephemeral nodes: the reaper's two writes (docs/DESIGN.md, "Ephemeral nodes")
    mark_seen = (nodes.update().where(nodes.c.name == P("name"), nodes.c.kind == NODE,
                                      nodes.c.ephemeral_seconds.isnot(None),
                                      sa.or_(nodes.c.last_seen_at.is_(None), nodes.c.last_seen_at < P("now")))
                 .values(last_seen_at=P("now")))  # never backwards (another hub's clock)
    reap_node = nodes.delete().where(  # only while the row still says: offline too long
        nodes.c.name == P("name"), nodes.c.kind == NODE, nodes.c.revoked_at.is_(None),
        nodes.c.ephemeral_seconds.isnot(None), nodes.c.last_seen_at.isnot(None),
        nodes.c.last_seen_at + nodes.c.ephemeral_seconds <= P("now"))
    insert_tombstone = removed_nodes.insert().values(
        name=P("name"), credential_sha256=P("sha"), removed_at=P("now"), offline_seconds=P("offline"))
    tombstone_by_credential = (sa.select(removed_nodes.c.name, removed_nodes.c.credential_sha256,
                                         removed_nodes.c.removed_at, removed_nodes.c.offline_seconds)
                               .where(removed_nodes.c.credential_sha256 == P("sha"))
                               .order_by(removed_nodes.c.removed_at.desc()).limit(1))
    tombstones_in_order = (sa.select(removed_nodes.c.name, removed_nodes.c.credential_sha256,
                                     removed_nodes.c.removed_at, removed_nodes.c.offline_seconds)
                           .order_by(removed_nodes.c.removed_at, removed_nodes.c.id))
    prune_tombstones = removed_nodes.delete().where(removed_nodes.c.removed_at < P("before"))
    tombstoned_names = sa.select(removed_nodes.c.name).distinct()
    # what a node's host file follows, for every row (hubs too: their names are taken); the
    # hub's follower compares these plain tuples with the ones it last wrote (hostfiles.py)
    host_facts = sa.select(nodes.c.name, nodes.c.address, nodes.c.public_key, nodes.c.revoked_at,
                           nodes.c.kind).order_by(nodes.c.address_int)
    host_facts_of = (sa.select(nodes.c.name, nodes.c.address, nodes.c.public_key,
                               nodes.c.revoked_at, nodes.c.kind).where(nodes.c.name == P("name")))
    exposures_in_order = (sa.select(exposures.c.id, exposures.c.node_name, exposures.c.node_port,
                                    exposures.c.listen_address, exposures.c.listen_port,
                                    exposures.c.proto, exposures.c.snat, exposures.c.created_at,
                                    nodes.c.address, nodes.c.revoked_at)
                          .select_from(exposures.join(nodes, exposures.c.node_name == nodes.c.name))
                          .order_by(exposures.c.id))
    max_exposure_id = sa.select(sa.func.max(exposures.c.id))
    insert_exposure = exposures.insert().values({c.name: sa.bindparam(c.name) for c in exposures.c})
    delete_exposure = exposures.delete().where(exposures.c.id == P("id"))
    delete_exposures_of = exposures.delete().where(exposures.c.node_name == P("name"))
    write_lock = sa.select(sa.func.pg_advisory_xact_lock(WRITE_LOCK_KEY))
    notify_changes = sa.select(sa.func.pg_notify(CHANGES_CHANNEL, ""))


Q = _Statements


class _Compiled:
    """One statement compiled for one dialect: its SQL and how to lay out its parameters."""

    __slots__ = ("sql", "compiled", "positions")

    def __init__(self, statement: Any, dialect: Any) -> None:
        self.compiled = statement.compile(dialect=dialect)
        self.sql = str(self.compiled)
        self.positions = tuple(self.compiled.positiontup) if self.compiled.positional else None

    def parameters(self, values: Dict[str, Any]) -> Any:
        full = self.compiled.construct_params(values)  # adds the literals (e.g. uses_left > 0)
        return [full[name] for name in self.positions] if self.positions is not None else full


class _Runner:
    """Runs the prebuilt statements on one pooled driver connection. SQLAlchemy builds and
    compiles each statement once per dialect (cached); the driver runs it. The registry's values
    are plain ints, strings and booleans that both drivers take and return as they are, and an
    enrolment runs a dozen statements, for which SQLAlchemy's execution and result layers cost
    more than SQLite itself (measured: 2.1 ms against 0.7 ms per enrolment)."""

    def __init__(self, pooled: Any, cache: Dict[int, _Compiled], dialect: Any) -> None:
        self.pooled = pooled  # the pool's proxy: invalidate() drops a broken connection
        self.driver = pooled.dbapi_connection
        self._cache = cache
        self._dialect = dialect

    def _compiled(self, statement: Any) -> _Compiled:
        found = self._cache.get(id(statement))
        if found is None:
            found = self._cache[id(statement)] = _Compiled(statement, self._dialect)
        return found

    def _run(self, statement: Any, values: Dict[str, Any]) -> Any:
        compiled = self._compiled(statement)
        cursor = self.driver.cursor()
        cursor.execute(compiled.sql, compiled.parameters(values))
        return cursor

    def rows(self, statement: Any, **values: Any) -> List[tuple]:
        cursor = self._run(statement, values)
        try:
            return cursor.fetchall()
        finally:
            cursor.close()

    def first(self, statement: Any, **values: Any) -> Optional[tuple]:
        rows = self.rows(statement, **values)
        return rows[0] if rows else None

    def rowcount(self, statement: Any, **values: Any) -> int:
        cursor = self._run(statement, values)
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    def many(self, statement: Any, rows: List[Dict[str, Any]]) -> None:
        compiled = self._compiled(statement)
        cursor = self.driver.cursor()
        try:
            cursor.executemany(compiled.sql, [compiled.parameters(r) for r in rows])
        finally:
            cursor.close()


class RegistryView:
    """The read queries, over the one connection of a :meth:`Registry.reading` or
    :meth:`Registry.snapshot` block (do not keep it past the block)."""

    def __init__(self, runner: _Runner) -> None:
        self._db = runner

    # -- tokens ------------------------------------------------------------------------
    def get_token(self, secret_sha256: str) -> Optional[TokenRow]:
        r = self._db.first(Q.token_by_hash, sha=secret_sha256)
        return _token_row(r) if r else None

    def list_tokens(self) -> List[TokenRow]:
        return [_token_row(r) for r in self._db.rows(Q.tokens_in_order)]

    def tokens_with_prefix(self, prefix: str) -> List[TokenRow]:
        """Tokens whose stored hash starts with ``prefix`` (lowercase hex, checked here)."""
        if not prefix or any(c not in "0123456789abcdef" for c in prefix):
            raise ValueError(f"token id prefix must be lowercase hex, not {prefix!r}")
        return [_token_row(r) for r in self._db.rows(Q.tokens_by_prefix, length=len(prefix), prefix=prefix)]

    def node_names_by_token(self) -> Dict[str, List[str]]:
        """token hash -> names of the nodes it last enrolled or re-keyed."""
        out: Dict[str, List[str]] = {}
        for sha, name in self._db.rows(Q.names_by_token):
            out.setdefault(sha, []).append(name)
        return out

    # -- nodes -------------------------------------------------------------------------
    def get_node(self, name: str) -> Optional[NodeRow]:
        r = self._db.first(Q.node_by_name, name=name)
        return _node_row(r) if r else None

    def get_node_by_key(self, public_key: str) -> Optional[NodeRow]:
        r = self._db.first(Q.node_by_key, key=public_key)
        return _node_row(r) if r else None

    def list_nodes(self) -> List[NodeRow]:
        """Every node (not the hubs) in address order."""
        return [_node_row(r) for r in self._db.rows(Q.nodes_in_order)]

    def listed_nodes(self) -> List[tuple]:
        """Every node (not the hubs) in address order as plain tuples of the
        :data:`LISTED_NODE_FIELDS` (a listing: 50,000 NodeRow objects cost more than the query).
        registry_read.listed_nodes_sqlite() is the same on a SQLite file, without SQLAlchemy."""
        return self._db.rows(Q.nodes_listed)

    def names_ignoring_case(self, name: str) -> List[str]:
        """The names of node and hub rows equal to ``name`` but for case (revoked too)."""
        return [row[0] for row in self._db.rows(Q.names_ignoring_case, name=name)]

    def used_address_ints(self) -> Set[int]:
        """Addresses held by any node row, revoked ones included (they are never reused)."""
        return {r[0] for r in self._db.rows(Q.address_ints)}

    def count_nodes(self) -> int:
        return self._db.rows(Q.count_nodes)[0][0]

    def count_active_up_to(self, limit: int) -> int:
        """How many rows (nodes and hubs) are not revoked, counting no further than ``limit``
        (the work is bounded by ``limit``, not by the registry's size)."""
        return self._db.rows(Q.count_active_up_to, limit=limit)[0][0]

    def address_floor(self, network: "ipaddress.IPv4Network") -> int:
        """The lowest address of ``network`` that may be free: every host address below it is
        held by a row (or was passed over as reserved). The recorded floor when it is this
        network's, else the first host address."""
        first = int(network.network_address) + 1
        r = self._db.first(Q.setting, key=ADDRESS_FLOOR)
        if r:
            recorded, _, value = r[0].partition(" ")
            if recorded == str(network) and value.isdigit():
                return max(first, int(value))
        return first

    def _first_unheld(self, start: int, last: int) -> int:
        """The lowest address >= ``start`` that no row holds (``last`` + 1: none up to
        ``last``), read in batches along the unique index of address_int."""
        while True:
            held = [r[0] for r in self._db.rows(Q.held_addresses_from, start=start, last=last)]
            for address in held:
                if address != start:
                    return start
                start += 1
            if len(held) < ADDRESS_SCAN_BATCH:
                return start

    def list_rows(self) -> List[NodeRow]:
        """Every row of ``nodes``: the nodes and the hubs (registry copy)."""
        return [_node_row(r) for r in self._db.rows(Q.rows_in_order)]

    def node_credential(self, name: str) -> Optional[str]:
        """The sha256 of node ``name``'s credential (None: no such node, or none issued)."""
        r = self._db.first(Q.credential_of, name=name)
        return r[0] if r else None

    # -- hubs and settings -------------------------------------------------------------
    def list_hubs(self) -> List[HubRow]:
        """Every hub, removed ones too, in the order they joined."""
        return [HubRow(*r) for r in self._db.rows(Q.hubs_in_order) if r[0] is not None]

    def settings(self) -> Dict[str, str]:
        """net, vpn_subnet (once a hub recorded them) and generation."""
        return dict(self._db.rows(Q.all_settings))

    def generation(self) -> int:
        """Bumped by every write transaction (hubs follow the registry by it)."""
        r = self._db.first(Q.setting, key="generation")
        return int(r[0]) if r else 0

    def count_tokens(self) -> int:
        return self._db.rows(Q.count_tokens)[0][0]

    # -- tombstones --------------------------------------------------------------------
    def tombstone_for(self, credential_sha256: str) -> Optional[Tombstone]:
        """The latest removal of a node that had this credential (None: none recorded)."""
        r = self._db.first(Q.tombstone_by_credential, sha=credential_sha256)
        return Tombstone(*r) if r else None

    def list_tombstones(self) -> List[Tombstone]:
        """Every recorded removal, oldest first."""
        return [Tombstone(*r) for r in self._db.rows(Q.tombstones_in_order)]

    def tombstoned_names(self) -> Set[str]:
        """The names of every recorded removal (a name may be held again by a row since)."""
        return {r[0] for r in self._db.rows(Q.tombstoned_names)}

    # -- host files ----------------------------------------------------------------------
    def host_facts(self) -> List[tuple]:
        """(name, address, public_key, revoked_at, kind) of every row (nodes and hubs) in
        address order: what a host file follows, as the driver's plain tuples (no row objects:
        the follower compares them at every generation)."""
        return self._db.rows(Q.host_facts)

    def host_facts_of(self, name: str) -> Optional[tuple]:
        """:meth:`host_facts` of the row named ``name`` (None: no such row)."""
        return self._db.first(Q.host_facts_of, name=name)

    # -- exposures ---------------------------------------------------------------------
    def list_exposures(self) -> List[ExposureRow]:
        """Every exposure in id order, with its node's VPN address and revocation."""
        return [ExposureRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8], r[9] is not None)
                for r in self._db.rows(Q.exposures_in_order)]


class RegistryTransaction(RegistryView):
    """The reads and the writes, inside the write transaction of a :meth:`Registry.transaction`
    block (committed when the block ends without an exception)."""

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the transaction undone alone: an exception in the block rolls back what
        the block wrote (the transaction goes on) and is raised. Driver errors inside are
        raw: wrap in ``url.translate_errors()`` for RegistryErrors (group commit, enroll.py)."""
        driver = self._db.driver
        driver.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            driver.execute("ROLLBACK TO SAVEPOINT part")
            driver.execute("RELEASE SAVEPOINT part")
            raise
        driver.execute("RELEASE SAVEPOINT part")

    # -- tokens ------------------------------------------------------------------------
    def insert_token(self, row: TokenRow) -> None:
        self.insert_tokens([row])

    def insert_tokens(self, rows: List[TokenRow]) -> None:
        """Many at once (registry copy)."""
        if rows:
            self._db.many(Q.insert_token, [dict(r.__dict__, allow_replace=bool(r.allow_replace)) for r in rows])

    def revoke_token(self, secret_sha256: str, now: int) -> bool:
        """Set revoked_at (once); False when the token was already revoked or is unknown."""
        return self._db.rowcount(Q.revoke_token, sha=secret_sha256, now=now) == 1

    def spend_token_use(self, secret_sha256: str) -> bool:
        """Decrement uses_left if positive and not revoked; False when nothing was left."""
        return self._db.rowcount(Q.spend_token_use, sha=secret_sha256) == 1

    # -- nodes -------------------------------------------------------------------------
    def insert_node(self, row: NodeRow) -> None:
        self.insert_nodes([row])

    def insert_nodes(self, rows: List[NodeRow]) -> None:
        """Many at once (registry copy)."""
        if rows:
            self._db.many(Q.insert_node, [dict(r.__dict__) for r in rows])

    def replace_node_key(self, name: str, public_key: str, token_sha256: str, now: int) -> None:
        self._db.rowcount(Q.replace_node_key, name=name, key=public_key, token=token_sha256, now=now)

    def mark_revoked(self, name: str, now: int) -> None:
        self._db.rowcount(Q.mark_revoked, name=name, now=now)

    def delete_node(self, name: str) -> None:
        held = self._db.first(Q.address_of, name=name)
        if self._db.rowcount(Q.delete_node, name=name) == 1 and held:
            self._lower_address_floor(held[0])

    def mark_seen(self, seen: Dict[str, int], now: Optional[int] = None) -> None:
        """Ephemeral nodes last seen online at the given times (``seen``: name -> time; or a
        list of names, all seen at ``now``): one batched UPDATE (last_seen_at never moves
        backwards; ordinary nodes are not written)."""
        times = seen if isinstance(seen, dict) else {name: now for name in seen}
        if times:
            self._db.many(Q.mark_seen, [{"name": name, "now": at} for name, at in sorted(times.items())])

    def reap_node(self, name: str, now: int) -> bool:
        """Delete ephemeral node ``name`` only if the row still says it has been offline for
        its whole duration at ``now`` (another hub may have seen it meanwhile, or removed it).
        Its exposures go first. True when it was deleted."""
        node = self.get_node(name)
        if node is None or node.kind != NODE:
            return False
        self._db.rowcount(Q.delete_exposures_of, name=name)
        if self._db.rowcount(Q.reap_node, name=name, now=now) != 1:
            return False
        self._lower_address_floor(node.address_int)
        return True

    # -- addresses ---------------------------------------------------------------------
    # The lowest free host address of the VPN is handed out; removed rows' addresses are reused,
    # revoked rows keep theirs. Without reading every address: settings[ADDRESS_FLOOR] records
    # "NETWORK FLOOR", every host address below FLOOR being held by a row, so the search starts
    # there and reads the index of address_int only up to the first gap. An allocation raises the
    # floor to the address it found; every write that frees an address (delete_node, reap_node,
    # update_hub moving a hub) lowers it. It lives in the registry and changes only under the
    # write lock, so every hub of a shared registry sees the same one. (A registry written by a
    # tinc-hub older than revision 0005 has none: the first allocation searches from the start.)
    def allocate_address_int(self, network: "ipaddress.IPv4Network",
                             reserved: AbstractSet[int] = frozenset()) -> Optional[int]:
        """The lowest host address of ``network`` (network and broadcast excluded) that no row
        holds and ``reserved`` does not name, recorded as the new floor; None when the network
        is full. The caller inserts the row holding it in this transaction."""
        last = int(network.broadcast_address) - 1
        candidate = self.address_floor(network)
        passed_over: Optional[int] = None  # the lowest reserved address found free
        while True:
            candidate = self._first_unheld(candidate, last)
            if candidate > last or candidate not in reserved:
                break
            if passed_over is None:
                passed_over = candidate
            candidate += 1
        found = candidate if candidate <= last else None
        floor = min(candidate, passed_over if passed_over is not None else candidate)
        self._put_address_floor(network, floor)
        return found

    def _put_address_floor(self, network: "ipaddress.IPv4Network", floor: int) -> None:
        value = f"{network} {floor}"
        if self._db.rowcount(Q.update_setting, key=ADDRESS_FLOOR, value=value) == 0:
            self._db.rowcount(Q.insert_setting, key=ADDRESS_FLOOR, value=value)

    def _lower_address_floor(self, freed: int) -> None:
        """Address ``freed`` is no longer held: the floor goes down to it."""
        r = self._db.first(Q.setting, key=ADDRESS_FLOOR)
        if not r:
            return  # no floor: the search starts at the first address anyway
        recorded, _, value = r[0].partition(" ")
        if not value.isdigit() or int(value) > freed:
            self._db.rowcount(Q.update_setting, key=ADDRESS_FLOOR, value=f"{recorded} {freed}")

    def add_tombstone(self, tombstone: Tombstone) -> None:
        self._db.rowcount(Q.insert_tombstone, name=tombstone.name, sha=tombstone.credential_sha256,
                          now=tombstone.removed_at, offline=tombstone.offline_seconds)

    def prune_tombstones(self, before: int) -> int:
        """Forget removals older than ``before``; returns how many."""
        return self._db.rowcount(Q.prune_tombstones, before=before)

    def set_credential(self, name: str, credential_sha256: str) -> None:
        """A newly issued credential (not used yet)."""
        self._db.rowcount(Q.set_credential, name=name, sha=credential_sha256)

    def mark_credential_used(self, name: str, credential_sha256: str, now: int) -> None:
        """The node showed this credential: it has it (only the first time is recorded)."""
        self._db.rowcount(Q.mark_credential_used, name=name, sha=credential_sha256, now=now)

    # -- hubs and settings -------------------------------------------------------------
    def insert_hub(self, hub: HubRow, now: int) -> None:
        """A new hub: its ``nodes`` row (kind hub) and its ``hubs`` row."""
        self.insert_nodes([NodeRow(name=hub.name, address=hub.address, address_int=hub.address_int,
                                   public_key=hub.public_key, token_sha256="", enrolled_at=now,
                                   updated_at=now, revoked_at=None, kind=HUB)])
        self.insert_hub_rows([hub])

    def insert_hub_rows(self, rows: List[HubRow]) -> None:
        """``hubs`` rows of hubs whose ``nodes`` rows exist (registry copy)."""
        if rows:
            self._db.many(Q.insert_hub, [{c.name: getattr(r, c.name) for c in hubs.c} for r in rows])

    def update_hub(self, hub: HubRow, now: int) -> None:
        """Record a hub's new public address, ports, pin, key or VPN address (a re-run of its
        init; the VPN address only while it is alone in a net without nodes)."""
        self._db.rowcount(Q.update_hub, name=hub.name, public_address=hub.public_address,
                          tinc_port=hub.tinc_port, api_port=hub.api_port, tls_pin=hub.tls_pin)
        held = self._db.first(Q.address_of, name=hub.name)
        if held and held[0] != hub.address_int:  # the hub moved: its old address is free
            self._lower_address_floor(held[0])
        self._db.rowcount(Q.update_hub_key, name=hub.name, key=hub.public_key, address=hub.address,
                          address_int=hub.address_int, now=now)

    def remove_hub(self, name: str, now: int) -> bool:
        """Retire a hub (its name, address and key stay taken); False if already removed."""
        done = self._db.rowcount(Q.remove_hub, name=name, now=now) == 1
        self._db.rowcount(Q.revoke_hub_row, name=name, now=now)
        return done

    def put_setting(self, key: str, value: str) -> None:
        if self._db.first(Q.setting, key=key) is None:
            self._db.rowcount(Q.insert_setting, key=key, value=value)
        else:
            self._db.rowcount(Q.update_setting, key=key, value=value)

    def insert_exposure(self, row: ExposureRow) -> int:
        """A new exposure with the next id (max + 1, under the write lock); returns the id."""
        last = self._db.first(Q.max_exposure_id)
        new_id = (last[0] or 0) + 1 if last else 1
        values = {c.name: getattr(row, c.name) for c in exposures.c}
        values.update(id=new_id, snat=bool(row.snat))
        self._db.rowcount(Q.insert_exposure, **values)
        return new_id

    def insert_exposure_rows(self, rows: Sequence[ExposureRow]) -> None:
        """Exposures with their own ids (registry copy)."""
        for row in rows:
            values = {c.name: getattr(row, c.name) for c in exposures.c}
            values.update(snat=bool(row.snat))
            self._db.rowcount(Q.insert_exposure, **values)

    def delete_exposure(self, exposure_id: int) -> bool:
        return self._db.rowcount(Q.delete_exposure, id=exposure_id) == 1

    def delete_exposures_of(self, name: str) -> int:
        """Remove every exposure of node ``name`` (revoke); returns how many."""
        return self._db.rowcount(Q.delete_exposures_of, name=name)

    def bump_generation(self) -> None:
        self._db.rowcount(Q.bump_generation)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.close()


class Registry:
    """Access to the registry database: owns an engine (a pool of connections: kept open for
    ``serve`` with ``keep_connections``, one per block for CLI commands) and hands out query
    objects per block.

    ``Registry(db_path, lock_path)`` is the SQLite file; :meth:`Registry.open` takes a
    :class:`~tinc_hub.registry_url.RegistryURL` (SQLite or PostgreSQL)."""

    def __init__(self, db_path: "os.PathLike[str] | str | None", lock_path: "os.PathLike[str] | str",
                 keep_connections: bool = False, *, url: "Optional[RegistryURL]" = None) -> None:
        if url is None:
            from .registry_url import RegistryURL

            url = RegistryURL.sqlite(Path(db_path))  # type: ignore[arg-type]
        self.url = url
        self.dialect = url.dialect
        self.db_path: Optional[Path] = url.path  # the SQLite file; None for PostgreSQL
        self.lock_path = Path(lock_path)
        self.keep_connections = keep_connections
        self._thread_lock = threading.Lock()
        self._engine: Optional[sa.Engine] = None
        self._engine_lock = threading.Lock()
        self._compiled: Dict[int, _Compiled] = {}  # id(statement of Q) -> its SQL for this dialect

    @classmethod
    def open(cls, url: "RegistryURL", lock_path: "os.PathLike[str] | str",
             keep_connections: bool = False) -> "Registry":
        return cls(None, lock_path, keep_connections, url=url)

    @classmethod
    def for_state(cls, state: "StateDir", url: Optional[str] = None, password_file: Optional[str] = None,
                  keep_connections: bool = False) -> "Registry":
        """The hub's registry: ``url`` (--registry / TINC_HUB_REGISTRY), else the one hub.json
        records, else registry.sqlite3 in the state dir. The password comes from
        ``password_file``, else (with hub.json's registry) the file hub.json names, else libpq's
        own PGPASSWORD / .pgpass / PGPASSFILE."""
        from .registry_url import registry_url_of_state

        return cls.open(registry_url_of_state(state, url, password_file), state.lock_file, keep_connections)

    def describe(self) -> str:
        """The registry for messages: the file, or the URL without any password."""
        return self.url.display()

    # -- connections -------------------------------------------------------------------
    @property
    def engine(self) -> sa.Engine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._make_engine()
            return self._engine

    def _make_engine(self) -> sa.Engine:
        """Autocommit at the driver: every transaction is begun explicitly (_begin)."""
        size = SQLITE_POOL_SIZE if self.dialect == "sqlite" else POSTGRES_POOL_SIZE
        pool: Dict[str, Any] = ({"poolclass": sa.pool.NullPool} if not self.keep_connections else
                                {"pool_size": size, "max_overflow": 0, "pool_timeout": BUSY_TIMEOUT_MS / 1000,
                                 "pool_pre_ping": self.dialect == "postgresql"})
        if self.dialect == "sqlite":
            engine = sa.create_engine(self.url.sqlalchemy_url(), isolation_level="AUTOCOMMIT",
                                      connect_args={"timeout": BUSY_TIMEOUT_MS / 1000,
                                                    "check_same_thread": False}, **pool)
            sa.event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return sa.create_engine(self.url.sqlalchemy_url(), isolation_level="AUTOCOMMIT",
                                connect_args=self.url.connect_args(), **pool)

    def dispose(self) -> None:
        """Close every pooled connection (the registry can still be used: it reconnects)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    @contextmanager
    def _connection(self) -> Iterator[sa.Connection]:
        with self.url.translate_errors():
            with self.engine.connect() as conn:
                yield conn

    @contextmanager
    def _runner(self) -> Iterator[_Runner]:
        """A pooled driver connection (autocommit) for one block."""
        with self.url.translate_errors():
            engine = self.engine
            pooled = engine.raw_connection()
            try:
                yield _Runner(pooled, self._compiled, engine.dialect)
            finally:
                pooled.close()

    @contextmanager
    def _begin(self, write: bool) -> Iterator[_Runner]:
        """One explicit transaction (write: the registry write transaction; else a read-only
        snapshot); COMMIT at the end, ROLLBACK on any exception."""
        with self._runner() as runner:
            driver = runner.driver
            if self.dialect == "sqlite":
                driver.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            elif write:
                driver.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
                runner.rows(Q.write_lock)
            else:
                driver.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield runner
                driver.execute("COMMIT")
            except BaseException:
                try:  # a pooled connection must never stay mid-transaction
                    driver.execute("ROLLBACK")
                except Exception:
                    runner.pooled.invalidate()  # the pool opens a new one
                raise

    def create(self) -> bool:
        """Create the database and schema if missing; True when created.

        An existing SQLite file is not even opened (opening a WAL database creates and removes
        side files, touching the directory), so re-running ``init`` changes nothing on disk."""
        if not self.lock_path.exists():
            os.close(os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600))
        if self.db_path is not None:
            if self.db_path.exists():
                return False
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.db_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
            with self._connection() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        elif self.schema_revision() is not None:
            return False
        self._migrate()
        return True

    def ensure_schema(self) -> None:
        """Create the registry if missing, bring an older schema to this code's (``serve``)."""
        self.create()
        self.upgrade_schema()

    def exists(self) -> bool:
        """The SQLite file exists / the PostgreSQL database holds a registry schema."""
        if self.db_path is not None:
            return self.db_path.exists()
        return self.schema_revision() is not None

    def schema_revision(self) -> Optional[str]:
        """The Alembic revision of the registry; "legacy" for a registry made before Alembic
        (tables, no version table); None for an empty database."""
        with self._connection() as conn:
            inspector = sa.inspect(conn)
            if inspector.has_table(VERSION_TABLE):
                return conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
            return "legacy" if inspector.has_table("tokens") else None

    def peek_schema_revision(self) -> Optional[str]:
        """schema_revision() without touching an existing SQLite file or its directory (read
        as immutable: no lock, no -wal/-shm made or removed), so that a re-run of ``init``
        can refuse a newer schema up front and still change nothing. It may miss what a
        running process has not yet checkpointed: writers check again (upgrade_schema)."""
        if self.db_path is None:
            return self.schema_revision()
        if not self.db_path.exists():
            return None
        import sqlite3
        from urllib.parse import quote

        uri = f"file:{quote(str(self.db_path.resolve()))}?immutable=1"
        try:
            with closing(sqlite3.connect(uri, uri=True)) as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if VERSION_TABLE in tables:
                    row = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
                    return row[0] if row else None
                return "legacy" if "tokens" in tables else None
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"cannot read registry {self.describe()}: {exc}",
                                      "is it a tinc-hub registry (SQLite), readable by this user?") from None

    def refuse_newer_schema(self) -> None:
        """RegistrySchemaError (one line) when a newer tinc-hub wrote the registry; reads it
        as peek_schema_revision() does."""
        from .migrations import refuse_unknown_revision

        refuse_unknown_revision(self.peek_schema_revision(), self.describe())

    def upgrade_schema(self) -> List[str]:
        """Migrate a registry made by an older tinc-hub to this code's schema; returns the
        revisions applied. A current registry is only read (nothing written, no lock taken);
        a missing SQLite file is left alone (the command that needs it reports that); a newer
        schema is refused (RegistrySchemaError) and left as it is."""
        if self.db_path is not None and not self.db_path.exists():
            return []
        revision = self.schema_revision()
        if revision == SCHEMA_REVISION:
            return []
        from .migrations import refuse_unknown_revision

        refuse_unknown_revision(revision, self.describe())  # before waiting for the lock
        with self.exclusive():  # another command may be migrating: it waits, then finds it done
            applied = self._migrate()
        if applied:
            logging.getLogger("tinc_hub.registry").info(
                "registry %s upgraded in place from schema %s to %s", self.describe(),
                revision, applied[-1])
        return applied

    def _migrate(self) -> List[str]:
        from .migrations import upgrade_to_head

        with self._connection() as conn:
            return upgrade_to_head(conn, self.describe())

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold this machine's registry write lock (threads of this process and other
        processes); across hubs, :meth:`transaction` serialises writers in the database."""
        with self._thread_lock:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    @contextmanager
    def transaction(self, bump: bool = True) -> Iterator[RegistryTransaction]:
        """Reads and writes in one write transaction (see the module doc), COMMIT at the end,
        ROLLBACK on any exception. Writers hold :meth:`exclusive` around it. ``bump=False``
        only for writes no hub follows (an ephemeral node's last_seen_at): the generation
        stays, so no hub re-mirrors its files for it."""
        with self._begin(write=True) as runner:
            tx = RegistryTransaction(runner)
            yield tx
            if not bump:
                return
            tx.bump_generation()
            if self.dialect == "postgresql":
                runner.rows(Q.notify_changes)  # delivered to listeners at COMMIT

    @contextmanager
    def reading(self) -> Iterator[RegistryView]:
        """Reads in autocommit mode: each statement sees the latest commit."""
        with self._runner() as runner:
            yield RegistryView(runner)

    @contextmanager
    def snapshot(self) -> Iterator[RegistryView]:
        """Reads in one read transaction: every statement sees the same commit. Takes no lock
        that a writer waits for, and is not the registry write lock."""
        with self._begin(write=False) as runner:
            yield RegistryView(runner)
