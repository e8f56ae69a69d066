"""`tinc-hub rotate-key` without namespaces: the refusal with one hub, the steps and their
resumption on two hubs of a real PostgreSQL registry (init --no-start: no tincd runs, so the
switch installs the key and restarts nothing), and the host file write that keeps a
connection across a key change (bootstrap.write_host_file). The rotation under traffic, with
real tincd and nodes: tests/test_several_hubs_rotate_key.py."""

import os
import stat
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from cryptography.hazmat.primitives import serialization

from bootstrap import bootstrap
from hub_fixtures import HubEnv, dump_registry, hub, rsa_public_pem  # noqa: F401 (fixture)
from labkit import postgres
from tinc_hub.cli import main
from tinc_hub.key_rotation import (STAGED_KEY_FILE, HubKeyRotation, default_wait,
                                   public_key_to_record)
from tinc_hub.registry import Registry
from tinc_hub.registry_follower import mirror_registry
from tinc_hub.state import StateDir

PG_MISSING = postgres.unavailable_reason()


def public_of(path: Path) -> str:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.PKCS1).decode()


def recorded_key(registry: Registry, name: str) -> str:
    with registry.reading() as view:
        return next(h for h in view.list_hubs() if h.name == name).public_key


# ------------------------------------------------------------------ the host file write

def host_file(address: str, key_index: int) -> str:
    return bootstrap.render_host_file([f"Address = {address}", "Port = 655",
                                       "Subnet = 10.9.0.1/32"], rsa_public_pem(key_index))


def test_a_new_key_alone_keeps_the_host_file_mtime_anything_else_does_not(tmp_path: Path) -> None:
    path = tmp_path / "erebor"
    assert bootstrap.write_host_file(str(path), host_file("192.0.2.1", 0))
    old = 1_000_000_000
    os.utime(path, (old, old))
    # the key changes: new bytes, old mtime (tincd's SIGHUP keeps the connection)
    assert bootstrap.write_host_file(str(path), host_file("192.0.2.1", 1))
    assert path.read_text() == host_file("192.0.2.1", 1) and path.stat().st_mtime == old
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # the same bytes: nothing written
    assert not bootstrap.write_host_file(str(path), host_file("192.0.2.1", 1))
    # the address changes (with or without the key): a fresh mtime (the connection is dropped)
    assert bootstrap.write_host_file(str(path), host_file("192.0.2.9", 1))
    assert path.stat().st_mtime > old
    assert not bootstrap.only_key_differs(host_file("192.0.2.1", 0), host_file("192.0.2.9", 1))
    assert not bootstrap.only_key_differs(None, host_file("192.0.2.1", 0))
    assert not bootstrap.only_key_differs("Subnet = 10.9.0.1/32\n", host_file("192.0.2.1", 0))


def test_the_default_wait_is_two_sync_intervals_and_a_margin() -> None:
    assert default_wait(10) == 30 and default_wait(30) == 70


# ------------------------------------------------------------------ one hub: refused

def test_rotate_key_is_refused_with_one_hub_and_changes_nothing(hub: HubEnv, capsys) -> None:
    key_file = hub.config.net_dir / "rsa_key.priv"
    before_key, before_registry = key_file.read_bytes(), dump_registry(hub.registry)
    code = main(["--state-dir", str(hub.state.root), "rotate-key", "--wait", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "only active hub" in err and "--force" in err, err
    assert key_file.read_bytes() == before_key
    assert not (hub.config.net_dir / STAGED_KEY_FILE).exists()
    assert dump_registry(hub.registry) == before_registry
    # --force goes on, saying what it costs (no tincd runs here: the key is only installed)
    code = main(["--state-dir", str(hub.state.root), "rotate-key", "--wait", "0", "--force"])
    out, err = capsys.readouterr()
    assert code == 0 and "warning" in err and "only active hub" in err, err
    assert "installed the new key" in out and key_file.read_bytes() != before_key, out
    assert recorded_key(hub.registry, hub.config.name).strip() == public_of(key_file).strip()


# ------------------------------------------------------------------ two hubs on PostgreSQL

class Hub:
    def __init__(self, root: Path, name: str, address: str) -> None:
        self.root, self.name, self.address = root, name, address
        self.state = StateDir(root / "state")

    def init(self, url: str, *extra: str) -> None:
        assert main(["--state-dir", str(self.state.root), "init", "--no-start", "--name", self.name,
                     "--address", self.address, "--tinc-dir", str(self.root / "tinc"), "--init",
                     "none", "--key-size", "2048", "--registry", url, *extra]) == 0

    @property
    def net_dir(self) -> Path:
        return self.state.load_config().net_dir

    def registry(self) -> Registry:
        return Registry.for_state(self.state)

    def rotation(self, lines: List[str], **kwargs) -> HubKeyRotation:
        return HubKeyRotation(self.state, self.registry(), 10, say=lines.append, warn=lines.append,
                              **kwargs)


@pytest.fixture
def two_hubs(pg, tmp_path: Path) -> Iterator[Dict[str, Hub]]:
    database = "rotate_" + uuid.uuid4().hex[:10]
    pg.create_database(database, user="hub")
    url = pg.socket_url(database, "hub")
    erebor = Hub(tmp_path / "erebor", "erebor", "192.0.2.1")
    erebor.init(url, "--net", "rot" + uuid.uuid4().hex[:8], "--vpn-subnet", "10.79.0.0/24")
    rivendell = Hub(tmp_path / "rivendell", "rivendell", "192.0.2.2")
    rivendell.init(url)
    yield {"erebor": erebor, "rivendell": rivendell}
    pg.drop_database(database)


@pytest.mark.skipif(PG_MISSING is not None, reason=str(PG_MISSING))
def test_rotation_publishes_first_then_switches_and_the_other_hub_keeps_its_connection(two_hubs, capsys) -> None:
    erebor, rivendell = two_hubs["erebor"], two_hubs["rivendell"]
    key_file = erebor.net_dir / "rsa_key.priv"
    old_public = public_of(key_file)
    theirs = rivendell.net_dir / "hosts" / "erebor"
    old_mtime = 1_000_000_000
    os.utime(theirs, (old_mtime, old_mtime))
    code = main(["--state-dir", str(erebor.state.root), "rotate-key", "--wait", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "staged" in out and "published" in out and "is not running" in out, out
    new_public = public_of(key_file)
    assert new_public != old_public and "BEGIN RSA PRIVATE KEY" in key_file.read_text()
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert key.key_size == 2048 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not (erebor.net_dir / STAGED_KEY_FILE).exists()
    assert recorded_key(erebor.registry(), "erebor").strip() == new_public.strip()
    assert new_public.strip() in (erebor.net_dir / "hosts" / "erebor").read_text()
    # rivendell follows the registry: erebor's new key, the file's old mtime
    config = rivendell.state.load_config()
    done = mirror_registry(config, rivendell.registry())
    assert "erebor" in done["written"]
    assert new_public.strip() in theirs.read_text() and old_public.strip() not in theirs.read_text()
    assert theirs.stat().st_mtime == old_mtime


@pytest.mark.skipif(PG_MISSING is not None, reason=str(PG_MISSING))
def test_an_interrupted_rotation_resumes_with_the_staged_key(two_hubs) -> None:
    erebor = two_hubs["erebor"]
    key_file, staged = erebor.net_dir / "rsa_key.priv", erebor.net_dir / STAGED_KEY_FILE
    config = erebor.state.load_config()
    old_public = public_of(key_file)

    # a crash between staging and publishing: the re-run publishes that same key
    lines: List[str] = []
    erebor.rotation(lines, wait=0).stage(2048)
    assert stat.S_IMODE(staged.stat().st_mode) == 0o600
    first = public_of(staged)
    assert public_key_to_record(config, erebor.registry()).strip() == old_public.strip()

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        erebor.rotation(lines, wait=60, sleep=interrupted).run()
    assert any("resuming: publishing the key staged" in line for line in lines), lines
    assert any("waiting" in line and "2 x" not in line for line in lines), lines
    assert any("interrupted" in line for line in lines), lines
    # published, not switched: the registry has the staged key, serve records that one
    assert recorded_key(erebor.registry(), "erebor").strip() == first.strip()
    assert public_of(key_file) == old_public and public_of(staged) == first
    assert public_key_to_record(config, erebor.registry()).strip() == first.strip()

    # the re-run waits what is left of --wait (nothing with 0) and switches to that key
    lines.clear()
    assert erebor.rotation(lines, wait=0).run() == "not running"
    assert any("was published" in line for line in lines), lines
    assert public_of(key_file) == first and not staged.exists()
    assert public_key_to_record(config, erebor.registry()).strip() == first.strip()


@pytest.mark.skipif(PG_MISSING is not None, reason=str(PG_MISSING))
def test_a_staged_key_readable_by_others_is_refused(two_hubs, capsys) -> None:
    erebor = two_hubs["erebor"]
    staged = erebor.net_dir / STAGED_KEY_FILE
    erebor.rotation([], wait=0).stage(2048)
    staged.chmod(0o644)
    code = main(["--state-dir", str(erebor.state.root), "rotate-key", "--wait", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "0644" in err and "remove it and re-run" in err, err
    assert recorded_key(erebor.registry(), "erebor").strip() == public_of(
        erebor.net_dir / "rsa_key.priv").strip()


def test_a_kept_stamp_is_renewed_once_the_hub_has_switched(tmp_path: Path) -> None:
    """bootstrap.kept_key_stamps: a node's copy of a hub's file whose new key kept the old
    mtime is due, after the grace, for a fresh mtime (its SIGHUP then ends a connection made
    before the key, perhaps with the old one); a file written normally never is."""
    kept, plain = tmp_path / "erebor", tmp_path / "rivendell"
    for path in (kept, plain):
        assert bootstrap.write_host_file(str(path), host_file("192.0.2.1", 0))
    old = 1_000_000_000
    os.utime(kept, (old, old))
    assert bootstrap.write_host_file(str(kept), host_file("192.0.2.1", 1))  # the new key
    assert bootstrap.kept_key_stamps([str(kept), str(plain)], older_than=0) == [str(kept)]
    assert bootstrap.kept_key_stamps([str(kept)], older_than=3600) == []  # not yet
    os.utime(kept, None)  # what sync_round does when it is due
    assert bootstrap.kept_key_stamps([str(kept), str(plain)], older_than=0) == []
