"""Upgrades from the previous release (commit 6563dec, tinc-hub 0.1.0): its registry, kept as a
fixture (tests/fixtures/registry/make_release_registry.py: tokens of every state, nodes with a
revoked one and a used credential, three hubs with one removed, exposures, the net's settings),
is upgraded in place to this code's schema by the first command, with nothing lost. Every
command that opens the registry refuses a newer schema in one line and leaves it alone. Two
commands started at once on the old registry migrate it once: one migrates under the lock, the
other waits and finds it done. (The head revision is whatever migrations/ holds: the tests
compare data, never a revision number; the concurrent test uses a registry older than any
head, main's of commit 65e21c3.)"""

import argparse
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from bootstrap import bootstrap
from tinc_hub.cli import build_parser, main
from tinc_hub.registry import SCHEMA_REVISION
from tinc_hub.tls import pin_of_cert_file
from hub_fixtures import HubEnv, init_hub, install_main_registry, rsa_public_pem, wait_until

FIXTURE = Path(__file__).parent / "fixtures" / "registry" / "registry-release-6563dec.sqlite3"
RELEASE = json.loads(FIXTURE.with_suffix(".json").read_text())
RELEASE_SUBNET = next(r["value"] for r in RELEASE["tables"]["settings"] if r["key"] == "vpn_subnet")
TABLE_KEYS = {"tokens": "secret_sha256", "nodes": "name", "hubs": "name", "exposures": "id",
              "settings": "key"}
TINC_HUB = Path(sys.executable).parent / "tinc-hub"
MAIN = json.loads((FIXTURE.parent / "registry-main-65e21c3.json").read_text())
NEWER = "9999_from_a_newer_tinc_hub"


def cli(capsys, env: HubEnv, *argv: str) -> Tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--state-dir", str(env.state.root)] + list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def sql(path: Path, query: str) -> List[tuple]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(query).fetchall()


def release_rows_now(path: Path) -> Dict[str, List[dict]]:
    """The release's tables as they are in ``path`` now, each row cut to the release's columns
    (columns a later revision added are not the release's data)."""
    out = {}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        for table, key in TABLE_KEYS.items():
            columns = list(RELEASE["tables"][table][0])
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
            out[table] = [{c: row[c] for c in columns} for row in rows]
    return out


def release_expected() -> Dict[str, List[dict]]:
    """The fixture's rows; the generation counter may only have grown (every write bumps it)."""
    return {t: RELEASE["tables"][t] for t in TABLE_KEYS}


def without_generation(tables: Dict[str, List[dict]]) -> Dict[str, List[dict]]:
    return dict(tables, settings=[r for r in tables["settings"] if r["key"] != "generation"])


@pytest.fixture
def release_hub(tmp_path: Path) -> HubEnv:
    """A hub (init --no-start) whose registry.sqlite3 is a copy of the release's."""
    env = init_hub(tmp_path, vpn_subnet=RELEASE_SUBNET, net=RELEASE["net"])
    assert env.config.name == RELEASE["hub"]
    for suffix in ("-wal", "-shm"):
        Path(str(env.state.registry_file) + suffix).unlink(missing_ok=True)
    shutil.copyfile(FIXTURE, env.state.registry_file)
    return env


def test_the_fixture_is_the_release_schema_with_every_kind_of_row() -> None:
    tables = RELEASE["tables"]
    assert tables["alembic_version"] == [{"version_num": "0003"}]
    assert sorted(RELEASE["token_statuses"].values()) == ["active", "active", "expired", "revoked", "spent"]
    assert [n["name"] for n in tables["nodes"] if n["revoked_at"]] == ["gamma", "hub3"]
    assert any(n["credential_used_at"] for n in tables["nodes"])
    assert [(h["name"], h["removed_at"] is None) for h in tables["hubs"]] == [
        ("hub1", True), ("hub2", True), ("hub3", False)]
    assert {e["proto"] for e in tables["exposures"]} == {"tcp", "udp"}
    with closing(sqlite3.connect(f"file:{FIXTURE}?immutable=1", uri=True)) as conn:  # no -shm
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]


def test_release_registry_is_upgraded_in_place_with_nothing_lost(release_hub: HubEnv, capsys, caplog) -> None:
    path = release_hub.state.registry_file
    caplog.set_level("INFO", logger="tinc_hub.registry")
    code, out, err = cli(capsys, release_hub, "token", "list", "--json")
    assert code == 0, err
    assert sql(path, "SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]
    upgraded = [r.getMessage() for r in caplog.records if "upgraded in place" in r.getMessage()]
    assert len(upgraded) == (SCHEMA_REVISION != "0003"), upgraded  # once, when there was a step
    if upgraded:
        assert upgraded[0].endswith("upgraded in place from schema 0003 to " + SCHEMA_REVISION)
    assert release_rows_now(path) == release_expected()
    assert sql(path, "PRAGMA journal_mode") == [("wal",)]
    assert {t["id"]: t["status"] for t in json.loads(out)} == RELEASE["token_statuses"]

    # what every command shows of it
    code, out, _ = cli(capsys, release_hub, "nodes", "--json")
    assert {n["name"]: n["revoked"] for n in json.loads(out)} == {
        n["name"]: n["revoked_at"] is not None for n in RELEASE["tables"]["nodes"]
        if n["name"] not in ("hub1", "hub2", "hub3")}
    code, out, _ = cli(capsys, release_hub, "hubs", "--json")
    assert [(h["name"], h["removed"]) for h in json.loads(out)] == [
        ("hub1", False), ("hub2", False), ("hub3", True)]
    code, out, _ = cli(capsys, release_hub, "expose", "list", "--json")
    assert [(e["node"], e["node_port"], e["proto"], e["snat"]) for e in json.loads(out)] == [
        ("alpha", 80, "tcp", False), ("Web_01", 53, "udp", True)]

    # and it still works: the active fleet token enrols the lowest address never used (a
    # revoked node's is kept), the revoked node stays refused
    config = release_hub.config
    token = bootstrap.encode_token(bootstrap.Token(
        config.address, config.api_port, pin_of_cert_file(release_hub.state.cert_file),
        config.net, config.name, RELEASE["active_token_secret"]))
    used = {n["address_int"] for n in RELEASE["tables"]["nodes"]}
    network = ipaddress.IPv4Network(RELEASE_SUBNET)
    free = next(str(a) for a in network.hosts() if int(a) not in used)
    status, answer = release_hub.enroll(token, "zeta", rsa_public_pem(31))
    assert (status, answer["address"]) == (200, free)
    assert release_hub.enroll(token, "gamma", rsa_public_pem(32))[0] == 403
    assert without_generation(release_rows_now(path))["tokens"] != RELEASE["tables"]["tokens"]  # a use spent


def leaf_commands() -> List[str]:
    """Every command of the CLI ("token create", "nodes", ...)."""
    found = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            found.append(prefix.strip())
        for action in subparsers:
            for name, child in action.choices.items():
                walk(child, f"{prefix} {name}")

    walk(build_parser(), "")
    return sorted(found)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_lines(env: HubEnv) -> Dict[str, List[str]]:
    """A command line of every command that opens the registry."""
    config = env.config
    return {
        "init": ["init", "--net", config.net, "--name", config.name, "--address", config.address,
                 "--vpn-subnet", config.vpn_subnet, "--api-port", str(config.api_port),
                 "--key-size", "2048", "--init", "none", "--tinc-dir", config.tinc_dir, "--no-start"],
        "token create": ["token", "create", "--uses", "3"],
        "token list": ["token", "list"],
        "token revoke": ["token", "revoke", next(iter(RELEASE["token_statuses"]))],
        "serve": ["serve", "--listen", "127.0.0.1", "--api-port", str(free_port())],
        "nodes": ["nodes"],
        "revoke": ["revoke", "alpha"],
        "expose": ["expose", "alpha:443"],
        "unexpose": ["unexpose", "1"],
        "hubs": ["hubs"],
        "hub remove": ["hub", "remove", "hub2"],
        "registry copy": ["registry", "copy", "--to", "postgresql://tinc@127.0.0.1:1/nowhere"],
        "rotate-key": ["rotate-key", "--force", "--wait", "0"],
        "backup": ["backup", str(env.root / "hub-backup.tgz")],
    }


# commands that never open this hub's registry: names apply reads names.json that serve wrote;
# restore refuses a hub that has state, and checks the archive's registry (a newer one too:
# tests/test_hub_backup.py)
NOT_OPENING_THE_REGISTRY = {"names apply", "restore"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_command_refuses_a_newer_schema_in_one_line_and_leaves_it_alone(release_hub: HubEnv, capsys) -> None:
    lines = command_lines(release_hub)
    lines.update({"expose list": ["expose", "list"], "expose apply": ["expose", "apply"]})
    missing = set(leaf_commands()) - set(lines) - NOT_OPENING_THE_REGISTRY
    assert not missing, f"add these commands to command_lines() (or NOT_OPENING_THE_REGISTRY): {missing}"
    path = release_hub.state.registry_file
    with closing(sqlite3.connect(path)) as conn:
        with conn:
            conn.execute("UPDATE alembic_version SET version_num = ?", (NEWER,))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = (digest(path), path.stat().st_mtime_ns)
    tinc_before = release_hub.hosts_snapshot()
    for name, argv in sorted(lines.items()):
        code, out, err = cli(capsys, release_hub, *argv)
        assert (code, out) == (1, ""), (name, code, out, err)
        assert err.count("\n") == 1 and NEWER in err and "newer than this tinc-hub knows" in err, (name, err)
        assert "(hint: upgrade tinc-hub" in err, (name, err)
    assert (digest(path), path.stat().st_mtime_ns) == before
    assert release_hub.hosts_snapshot() == tinc_before  # init, revoke: nothing written to tinc


def blocked_on(lock_file: Path) -> int:
    """How many processes wait for an flock on ``lock_file`` (the '->' lines of /proc/locks)."""
    inode = os.stat(lock_file).st_ino
    waiting = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[6].rsplit(":", 1)[-1] == str(inode):
            waiting += 1
    return waiting


def test_two_commands_at_once_migrate_an_older_registry_once(tmp_path: Path) -> None:
    """Real processes, on a registry older than any head (main's of 65e21c3, before Alembic:
    every revision to apply). The test holds the registry lock until both commands wait for
    it (as a third writer would), then lets go: one migrates, the other waits for it and finds
    it done; both answer from the upgraded registry."""
    assert TINC_HUB.exists()
    env = init_hub(tmp_path, net=MAIN["net"])
    expected = install_main_registry(env.state)
    lock_file = env.state.lock_file
    with open(lock_file, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [subprocess.Popen([str(TINC_HUB), "--state-dir", str(env.state.root), *argv],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True)
                 for argv in (["token", "list", "--json"], ["nodes", "--json"])]
        try:
            assert wait_until(lambda: blocked_on(lock_file) == 2, 30), \
                f"both commands should wait for the lock: {Path('/proc/locks').read_text()}"
            assert "alembic_version" not in {r[0] for r in sql(env.state.registry_file,
                                                               "SELECT name FROM sqlite_master")}
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
        results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert len([err for _, err in results if "upgraded in place from schema legacy to" in err]) == 1, results
    assert sorted(t["status"] for t in json.loads(results[0][0])) == ["active", "active", "active", "revoked"]
    assert {n["name"]: n["revoked"] for n in json.loads(results[1][0])} == {
        n["name"]: n["revoked_at"] is not None for n in expected["nodes"]}
    path = env.state.registry_file
    assert sql(path, "SELECT version_num FROM alembic_version") == [(SCHEMA_REVISION,)]
    assert sql(path, "SELECT secret_sha256, uses_left, expires_at, revoked_at FROM tokens ORDER BY created_at, secret_sha256") == [
        (t["secret_sha256"], t["uses_left"], t["expires_at"], t["revoked_at"])
        for t in sorted(expected["tokens"], key=lambda t: (t["created_at"], t["secret_sha256"]))]
