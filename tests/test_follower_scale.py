"""The registry follower of ``tinc-hub serve`` at fleet size, scaled down for CI (bench/
enrol_scale.py measures 50,000 nodes): after its first full pass, a round touches only the host
files of the rows that changed and reads the rows without the registry write lock (an
enrolment completes while a round reads); and it follows what other hubs write: a new node,
a key replaced twice in one second, a revocation, a removal (tombstone), a name taken again.
"""

import dataclasses
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Set

import pytest

from hub_fixtures import HubEnv, init_hub, rsa_public_pem
from labkit.registry_fill import distinct_public_keys, fill_registry
from tinc_hub.enroll import Enroller
from tinc_hub.hostfiles import render_node_host_file
from tinc_hub.registry import Registry, Tombstone
from tinc_hub.registry_follower import RegistryFollower

WIDE = "10.96.0.0/16"
FULL = 20_000

# host files opened by this process while ``_opened`` is not None (an audit hook: every
# open() and os.open() of the follower is seen, none is intercepted)
_opened: Optional[List[str]] = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, Path)):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


def opened_during(action) -> List[str]:
    global _opened
    _opened = []
    try:
        action()
        return _opened
    finally:
        _opened = None


class Follower:
    """A RegistryFollower of env's hub on a Registry of its own (its own lock file handle,
    as serve's), with the SIGHUPs it asked for counted."""

    def __init__(self, env: HubEnv, registry: Optional[Registry] = None) -> None:
        self.sighups = 0
        self.registry = registry or Registry(env.state.registry_file, env.state.lock_file)
        self.follower = RegistryFollower(env.config, self.registry, self._sighup)

    def _sighup(self) -> bool:
        self.sighups += 1
        return True

    def round(self) -> bool:
        return self.follower.catch_up()


def other_hub(env: HubEnv, root: Path) -> Enroller:
    """Another hub's enroller on env's registry: it writes the registry and its own hosts/."""
    config = dataclasses.replace(env.config, tinc_dir=str(root / "tinc"))
    root.mkdir(parents=True)
    return Enroller(config, Registry(env.state.registry_file, root / "other.lock"))


def test_a_round_touches_only_the_changed_rows_without_the_write_lock(tmp_path: Path) -> None:
    env = init_hub(tmp_path / "hub", vpn_subnet=WIDE)
    hosts = env.config.hosts_dir
    rows = fill_registry(env.registry, WIDE, FULL, hosts_dir=hosts, reserved=[env.config.hub_address])
    names: Set[str] = {row.name for row in rows}
    follower = Follower(env)
    started = time.monotonic()
    follower.round()  # serve start: every row and every file, under the lock
    full = time.monotonic() - started

    # another hub replaces one node's key: this hub's next round touches that file alone
    rotated = rows[7]
    new_key = next(distinct_public_keys(1))
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.replace_node_key(rotated.name, new_key, rotated.token_sha256, int(time.time()))
    before = (hosts / rotated.name).stat().st_mtime_ns
    started = time.monotonic()
    opened = opened_during(follower.round)
    one_round = time.monotonic() - started
    touched = {Path(path).name for path in opened} & names
    assert touched == {rotated.name}
    assert (hosts / rotated.name).read_text() == render_node_host_file(rotated.address, new_key)
    assert (hosts / rotated.name).stat().st_mtime_ns == before  # a new key alone keeps the mtime
    assert follower.sighups == 1
    print(f"\nfollower at {FULL} nodes: full pass {full:.2f} s, one changed row {one_round:.3f} s")
    assert one_round < max(full / 3, 0.5), (one_round, full)

    # an enrolment on this hub completes while a round reads the rows (no write lock held)
    reading, enrolled = threading.Event(), threading.Event()
    token = env.token(uses=1).token
    answers: list = []

    def enrol() -> None:
        answers.append(env.enroll(token, "newcomer", rsa_public_pem(3)))
        enrolled.set()

    def on_statement(sql: str) -> None:
        if not reading.is_set() and "nodes.kind" in sql and "ORDER BY nodes.address_int" in sql:
            reading.set()  # the round's read of every row starts: enrol now, on another thread
            threading.Thread(target=enrol, daemon=True).start()
            enrolled.wait(60)

    import sqlalchemy as sa

    traced = Registry(env.state.registry_file, env.state.lock_file)
    sa.event.listen(traced.engine, "connect",
                    lambda conn, _record: conn.set_trace_callback(on_statement))
    watched = Follower(env, traced)
    watched.follower.host_files = follower.follower.host_files  # past its first pass
    watched.follower.host_files.registry = traced
    with env.registry.exclusive(), env.registry.transaction():
        pass  # a new generation: the round reads the rows
    watched.round()
    assert reading.is_set() and enrolled.is_set(), "the enrolment waited for the round"
    assert answers[0][0] == 200, answers
    watched.round()  # finds the enrolment's file in place: nothing written, no SIGHUP
    assert watched.sighups == 0


@pytest.fixture
def small(tmp_path: Path) -> HubEnv:
    return init_hub(tmp_path / "hub")


def test_the_follower_follows_other_hubs(small: HubEnv, tmp_path: Path) -> None:
    env, hosts = small, small.config.hosts_dir
    other = other_hub(env, tmp_path / "other")
    follower = Follower(env)
    follower.round()
    token = env.token(uses=3).token

    def enrol_elsewhere(name: str, index: int) -> str:
        assert other.process("Bearer " + token, _body(name, rsa_public_pem(index))).status == 200
        return name

    # a new node enrolled on another hub: its file written here
    enrol_elsewhere("frodo", 11)
    enrol_elsewhere("sam", 12)
    assert follower.round()
    with env.registry.reading() as view:
        frodo, sam = view.get_node("frodo"), view.get_node("sam")
    assert (hosts / "frodo").read_text() == render_node_host_file(frodo.address, frodo.public_key)
    assert (hosts / "sam").exists()
    assert follower.round() is False  # nothing moved: nothing done

    # a key replaced twice within one second, between two rounds and before one
    keys = list(distinct_public_keys(3))
    now = int(time.time())
    for key in keys[:2]:
        with env.registry.exclusive(), env.registry.transaction() as tx:
            tx.replace_node_key("frodo", key, frodo.token_sha256, now)
    follower.round()
    assert (hosts / "frodo").read_text() == render_node_host_file(frodo.address, keys[1])
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.replace_node_key("frodo", keys[2], frodo.token_sha256, now)
    follower.round()
    assert (hosts / "frodo").read_text() == render_node_host_file(frodo.address, keys[2])

    # revoked on another hub: removed here
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.mark_revoked("sam", now)
    follower.round()
    assert not (hosts / "sam").exists()

    # removed with its name released (a tombstone): removed here; a file of a name the
    # registry never knew stays
    (hosts / "stranger").write_text("not the registry's\n")
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.delete_node("frodo")
        tx.add_tombstone(Tombstone("frodo", None, now, None))
    (other.config.hosts_dir / "frodo").unlink()  # as that hub's own removal does
    follower.round()
    assert not (hosts / "frodo").exists()
    assert (hosts / "stranger").exists()

    # the name taken again after its tombstone: the new node's file is kept
    enrol_elsewhere("frodo", 13)
    follower.round()
    with env.registry.reading() as view:
        again = view.get_node("frodo")
    assert (hosts / "frodo").read_text() == render_node_host_file(again.address, again.public_key)
    assert follower.round() is False


def test_removed_and_taken_again_between_two_rounds(small: HubEnv, tmp_path: Path) -> None:
    env, hosts = small, small.config.hosts_dir
    other = other_hub(env, tmp_path / "other")
    follower = Follower(env)
    follower.round()
    token = env.token(uses=2).token
    assert other.process("Bearer " + token, _body("pippin", rsa_public_pem(21))).status == 200
    follower.round()
    now = int(time.time())
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.delete_node("pippin")
        tx.add_tombstone(Tombstone("pippin", None, now, None))
    (other.config.hosts_dir / "pippin").unlink()  # as that hub's own removal does
    assert other.process("Bearer " + token, _body("pippin", rsa_public_pem(22))).status == 200
    follower.round()
    with env.registry.reading() as view:
        again = view.get_node("pippin")
    assert (hosts / "pippin").read_text() == render_node_host_file(again.address, again.public_key)


def test_a_verifying_round_repairs_a_file_changed_behind_the_hub(small: HubEnv, tmp_path: Path) -> None:
    env, hosts = small, small.config.hosts_dir
    token = env.token(uses=1).token
    assert env.enroll(token, "merry", rsa_public_pem(31))[0] == 200
    follower = Follower(env)
    follower.round()
    expected = (hosts / "merry").read_text()
    (hosts / "merry").write_text("tampered\n")
    with env.registry.exclusive(), env.registry.transaction():
        pass  # a new generation
    follower.round()  # rounds trust what they wrote
    assert (hosts / "merry").read_text() == "tampered\n"
    follower.follower.host_files.verify_interval = 0.0
    with env.registry.exclusive(), env.registry.transaction():
        pass
    follower.round()
    assert (hosts / "merry").read_text() == expected


def test_a_round_skips_the_files_this_hubs_enrolments_wrote(small: HubEnv) -> None:
    """serve's enrolments tell the follower the rows whose files they wrote: its next round
    opens none of them, and a row changed after its note is followed all the same."""
    env, hosts = small, small.config.hosts_dir
    follower = Follower(env)
    follower.round()
    enroller = Enroller(env.config, env.registry, names=follower.follower.names,
                        host_files=follower.follower.host_files)
    token = env.token(uses=3).token
    for index, name in enumerate(("gimli", "legolas")):
        assert enroller.process("Bearer " + token, _body(name, rsa_public_pem(41 + index))).status == 200
    opened = opened_during(follower.round)
    assert not {Path(path).name for path in opened} & {"gimli", "legolas"}, opened
    assert follower.sighups == 0

    # noted, then re-keyed by another hub before the next round: the round follows the new key
    assert enroller.process("Bearer " + token, _body("boromir", rsa_public_pem(43))).status == 200
    with env.registry.reading() as view:
        boromir = view.get_node("boromir")
    key = next(distinct_public_keys(1))
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.replace_node_key("boromir", key, boromir.token_sha256, int(time.time()))
    follower.round()
    assert (hosts / "boromir").read_text() == render_node_host_file(boromir.address, key)
    assert follower.sighups == 1


def _body(name: str, key: str) -> bytes:
    import json

    return json.dumps({"name": name, "public_key": key}).encode()
