"""Registry schema migrations (Alembic) on SQLite: a registry.sqlite3 written by the
hand-written sqlite3 registry of main (tests/fixtures/registry, with revoked tokens and nodes)
and one of the first release's schema (no tokens.revoked_at) are upgraded in place with nothing
lost; a registry of a NEWER schema is refused with one line and left byte for byte as it was."""

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import List, Tuple

import pytest

from bootstrap import bootstrap
from tinc_hub.cli import main
from tinc_hub.migrations import head_revision, script_directory
from tinc_hub.registry import SCHEMA_REVISION, Registry
from tinc_hub.tls import pin_of_cert_file
from tinc_hub.tokens import hash_secret, new_secret
from hub_fixtures import HubEnv, init_hub, install_main_registry, rsa_public_pem

FIXTURES = Path(__file__).parent / "fixtures" / "registry"
MAIN_EXPECTED = json.loads((FIXTURES / "registry-main-65e21c3.json").read_text())


def cli(capsys, env: HubEnv, *argv: str) -> Tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--state-dir", str(env.state.root)] + list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def sql(path: Path, query: str) -> List[tuple]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(query).fetchall()


def table_shape(path: Path) -> List[tuple]:
    """(table, column, type, notnull, default, pk) of the registry tables, and their indexes."""
    shape = []
    for table in ("tokens", "nodes"):
        # A new table spells its TEXT PRIMARY KEY NOT NULL (SQLite alone would allow NULL in
        # one); the code never writes NULL there, so the two count as the same.
        shape += [(table, r[1], r[2], r[3] or r[5], r[4], r[5])
                  for r in sql(path, f"PRAGMA table_info({table})")]
        shape += [(table, "unique", tuple(c[2] for c in sql(path, f"PRAGMA index_info('{r[1]}')")))
                  for r in sql(path, f"PRAGMA index_list({table})") if r[2]]
    return sorted(shape, key=repr)


@pytest.fixture
def main_hub(tmp_path: Path) -> HubEnv:
    """A hub whose registry.sqlite3 is a copy of the fixture written by main's code (token
    expiries moved to a day from now, in MAIN_EXPECTED too: install_main_registry)."""
    env = init_hub(tmp_path, net=MAIN_EXPECTED["net"])
    MAIN_EXPECTED.update(install_main_registry(env.state))
    return env


def test_schema_revision_constant_is_the_head_of_the_migration_scripts() -> None:
    assert SCHEMA_REVISION == head_revision()
    assert len(script_directory().get_heads()) == 1  # one line of history, no branches


def test_registry_written_by_main_is_upgraded_in_place_with_nothing_lost(main_hub: HubEnv, capsys) -> None:
    path = main_hub.state.registry_file
    assert "alembic_version" not in {r[0] for r in sql(path, "SELECT name FROM sqlite_master")}
    code, out, err = cli(capsys, main_hub, "token", "list", "--json")
    assert code == 0, err
    assert sql(path, "SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]
    with main_hub.registry.reading() as view:
        tokens = [t.__dict__ for t in view.list_tokens()]
        nodes = [n.__dict__ for n in view.list_nodes()]
    # revision 0004 adds tokens.ephemeral_seconds, nodes.ephemeral_seconds and last_seen_at (NULL)
    assert tokens == [dict(t, ephemeral_seconds=None) for t in MAIN_EXPECTED["tokens"]]
    # revision 0002 adds kind, credential_sha256 and credential_used_at: every node of main is a node, without one
    assert nodes == [dict(n, kind="node", credential_sha256=None, credential_used_at=None,
                          ephemeral_seconds=None, last_seen_at=None) for n in MAIN_EXPECTED["nodes"]]
    listed = {row["id"]: row["status"] for row in json.loads(out)}
    assert sorted(listed.values()) == ["active", "active", "active", "revoked"]
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]

    # The registry still works: the revoked node stays revoked, the revoked token refused, the
    # active token enrols the next free address (after the revoked node's, never reused).
    code, out, _ = cli(capsys, main_hub, "nodes", "--json")
    assert {n["name"]: n["revoked"] for n in json.loads(out)} == {"alpha": False, "beta": False, "gamma": True}
    secret = MAIN_EXPECTED["active_token_secret"]
    token = bootstrap.encode_token(bootstrap.Token(
        main_hub.config.address, main_hub.config.api_port, pin_of_cert_file(main_hub.state.cert_file),
        main_hub.config.net, main_hub.config.name, secret))
    status, answer = main_hub.enroll(token, "zeta", rsa_public_pem(7))
    assert (status, answer["address"]) == (200, "10.77.0.5")
    assert main_hub.enroll(token, "gamma", rsa_public_pem(8))[0] == 403  # revoked node
    revoked_hash = next(t["secret_sha256"] for t in MAIN_EXPECTED["tokens"] if t["revoked_at"])
    with main_hub.registry.reading() as view:
        assert view.get_token(revoked_hash).revoked


def test_upgraded_registry_has_the_same_tables_as_a_new_one(main_hub: HubEnv, tmp_path: Path) -> None:
    main_hub.registry.upgrade_schema()
    fresh = Registry(tmp_path / "fresh.sqlite3", tmp_path / "fresh.lock")
    assert fresh.create() is True
    assert table_shape(tmp_path / "fresh.sqlite3") == table_shape(main_hub.state.registry_file)
    assert sql(tmp_path / "fresh.sqlite3", "SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]
    assert fresh.create() is False  # an existing file is left alone
    for path in (tmp_path / "fresh.sqlite3", main_hub.state.registry_file):  # the CHECK, in both
        with closing(sqlite3.connect(path)) as conn, pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("INSERT INTO tokens (secret_sha256, uses_total, uses_left, expires_at, bound_name,"
                         " allow_replace, created_at) VALUES ('x', 1, -1, 1, NULL, 0, 1)")


# The first release's schema (no tokens.revoked_at), as test_token_lifecycle.py builds it.
FIRST_RELEASE_SCHEMA = """
CREATE TABLE tokens (secret_sha256 TEXT PRIMARY KEY, uses_total INTEGER NOT NULL,
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0), expires_at INTEGER NOT NULL, bound_name TEXT,
    allow_replace INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
CREATE TABLE nodes (name TEXT PRIMARY KEY, address TEXT NOT NULL UNIQUE,
    address_int INTEGER NOT NULL UNIQUE, public_key TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, revoked_at INTEGER);
"""


def test_first_release_registry_gains_revoked_at_and_a_version(tmp_path: Path) -> None:
    path, now, sha = tmp_path / "old.sqlite3", int(time.time()), hash_secret(new_secret())
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(FIRST_RELEASE_SCHEMA)
        conn.execute("INSERT INTO tokens VALUES (?, 3, 2, ?, NULL, 0, ?)", (sha, now + 60, now))
        conn.execute("INSERT INTO nodes VALUES ('n1', '10.1.0.2', 167837698, 'k', ?, ?, ?, NULL)", (sha, now, now))
    registry = Registry(path, tmp_path / "lock")
    assert registry.schema_revision() == "legacy"
    assert registry.upgrade_schema() == ["0001", "0002", "0003", "0004", "0005"]
    assert registry.upgrade_schema() == []  # current: nothing to do
    with registry.reading() as view:
        token = view.get_token(sha)
        assert (token.uses_left, token.revoked_at) == (2, None)
        assert [n.name for n in view.list_nodes()] == ["n1"]
    assert "revoked_at" in [c[1] for c in sql(path, "PRAGMA table_info(tokens)")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_newer_schema_is_refused_in_one_line_and_left_alone(main_hub: HubEnv, capsys) -> None:
    path = main_hub.state.registry_file
    main_hub.registry.upgrade_schema()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = (digest(path), path.stat().st_mtime_ns)
    for argv in (["nodes"], ["token", "create"], ["token", "list"]):
        code, out, err = cli(capsys, main_hub, *argv)
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "9999_from_the_future" in err and "newer than this tinc-hub knows" in err
        assert "(hint: upgrade tinc-hub" in err
    assert (digest(path), path.stat().st_mtime_ns) == before
    assert sql(path, "SELECT COUNT(*) FROM tokens") == [(len(MAIN_EXPECTED["tokens"]),)]
