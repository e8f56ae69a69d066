"""The hub at fleet size, scaled down for CI (bench/enrol_scale.py measures 50,000 nodes):

- an enrolment into a registry of 20,000 nodes makes SQLite do about the same work as one into
  an empty registry (SQLite's VM steps and statements counted: deterministic, not a timing);
- the address allocation hands out the lowest free host address (gaps left by removed rows
  reused lowest first, revoked rows keep theirs, the hub's address skipped, a full subnet a
  409) on SQLite and on PostgreSQL;
- ``tinc-hub nodes --json`` with 20,000 nodes (and a liveness record each) costs little CPU per
  node beyond its start-up (tests/test_listing.py guards what the start-up imports).
"""

import json
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator

import pytest

from hub_fixtures import HubEnv, init_hub, rsa_public_pem
from labkit import postgres
from labkit.registry_fill import fill_registry
from tinc_hub.enroll import Enroller
from tinc_hub.registry import ADDRESS_FLOOR, Registry
from tinc_hub.registry_url import RegistryURL

WIDE = "10.96.0.0/16"
FULL = 20_000  # above bootstrap.MAX_NAMES (16384): the names are not sent, as with 50,000
PASSWORD = "pw-" + uuid.uuid4().hex


def counting_registry(env: HubEnv) -> "tuple[Registry, Dict[str, int]]":
    """env's SQLite registry with every pooled connection counting its statements and VM steps."""
    counts = {"steps": 0, "statements": 0}
    registry = Registry(env.state.registry_file, env.state.lock_file, keep_connections=True)

    def step() -> int:
        counts["steps"] += 1
        return 0

    def on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.set_progress_handler(step, 10)
        dbapi_connection.set_trace_callback(lambda _sql: counts.__setitem__("statements", counts["statements"] + 1))

    import sqlalchemy as sa

    sa.event.listen(registry.engine, "connect", on_connect)
    return registry, counts


def enrolment_work(env: HubEnv, prefix: str, count: int = 5) -> Dict[str, int]:
    """SQLite's work for ``count`` enrolments after a first one (per enrolment)."""
    registry, counts = counting_registry(env)
    enroller = Enroller(env.config, registry)
    enroller.names.clock = lambda: 0.0  # a "too many names" verdict is kept: no recount mid-test
    token = env.token(uses=count + 1).token
    keys = [rsa_public_pem(40 + i) for i in range(count + 1)]

    def enrol(i: int) -> None:
        body = json.dumps({"name": f"{prefix}{i}", "public_key": keys[i]}).encode()
        outcome = enroller.process("Bearer " + token, body)
        assert outcome.status == 200, outcome.body

    enrol(0)  # warm: connections made, statements compiled, names verdict taken
    before = dict(counts)
    for i in range(1, count + 1):
        enrol(i)
    registry.dispose()
    return {key: (counts[key] - before[key]) // count for key in counts}


def test_enrolment_work_does_not_grow_with_the_registry(tmp_path: Path) -> None:
    empty = init_hub(tmp_path / "empty", vpn_subnet=WIDE)
    full = init_hub(tmp_path / "full", vpn_subnet=WIDE)
    rows = fill_registry(full.registry, WIDE, FULL, reserved=[full.config.hub_address])
    assert len(rows) == FULL and rows[0].address == "10.96.0.2"
    small, big = enrolment_work(empty, "e"), enrolment_work(full, "f")
    # no more statements (the empty registry's names are computed, the full one's too many)
    assert big["statements"] <= small["statements"], (small, big)
    # before: the allocation read 20,000 addresses and the case check scanned every name,
    # about 10^5 steps per enrolment
    assert big["steps"] <= small["steps"] * 1.5 + 100, (small, big)


# -- the lowest free address, SQLite and PostgreSQL ----------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def small_net(request, tmp_path: Path) -> Iterator[HubEnv]:
    """A hub of a /29 (hosts .1-.6, the hub .1) on SQLite or on a new PostgreSQL database."""
    env = init_hub(tmp_path, vpn_subnet="10.88.0.0/29")
    if request.param == "sqlite":
        yield env
        return
    reason = postgres.unavailable_reason()
    if reason is not None:
        pytest.skip(f"PostgreSQL: {reason}")
    pg = request.getfixturevalue("pg")
    name = "scale_" + uuid.uuid4().hex[:12]
    url = pg.create_database(name, user="hub", password=PASSWORD)
    registry = Registry.open(RegistryURL.parse(url, PASSWORD), env.state.lock_file, keep_connections=True)
    try:
        registry.ensure_schema()
        yield env._replace(registry=registry, enroller=Enroller(env.config, registry))
    finally:
        registry.dispose()
        pg.drop_database(name)


def test_lowest_free_address_is_handed_out(small_net: HubEnv) -> None:
    env = small_net
    token = env.token(uses=20).token
    keys = iter(rsa_public_pem(60 + i) for i in range(20))

    def enrol(name: str) -> "tuple[int, str]":
        status, answer = env.enroll(token, name, next(keys))
        return status, answer.get("address") or answer.get("error", "")

    assert [enrol(f"n{i}")[1] for i in range(2, 7)] == [f"10.88.0.{i}" for i in range(2, 7)]
    status, error = enrol("n7")
    assert status == 409 and "is full" in error
    now = int(time.time())
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.mark_revoked("n3", now)  # a revoked node keeps its address
    assert enrol("n8")[0] == 409
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.delete_node("n5")  # revoke --release: the address is free again
        tx.delete_node("n3")  # revoked, then released
    assert enrol("n9") == (200, "10.88.0.3")  # the lowest gap first
    assert enrol("n10") == (200, "10.88.0.5")
    assert enrol("n11")[0] == 409
    with env.registry.exclusive(), env.registry.transaction() as tx:
        tx.delete_node("n6")
        tx.delete_node("n2")
    assert enrol("n12") == (200, "10.88.0.2")
    with env.registry.reading() as view:
        assert [n.address for n in view.list_nodes()] == \
            ["10.88.0.2", "10.88.0.3", "10.88.0.4", "10.88.0.5"]
        network, floor = view.settings()[ADDRESS_FLOOR].split()
    # .1 when the hub is not recorded in this registry (passed over as reserved), else .2
    assert network == "10.88.0.0/29" and 0x0A580001 <= int(floor) <= 0x0A580002


def test_an_ephemeral_node_reaped_frees_its_address_lowest_first(small_net: HubEnv) -> None:
    env = small_net
    token = env.token(uses=10).token
    for i in range(2, 5):
        assert env.enroll(token, f"n{i}", rsa_public_pem(70 + i))[1]["address"] == f"10.88.0.{i}"
    now = int(time.time())
    _make_ephemeral(env, "n3", last_seen=now - 100, seconds=10)
    with env.registry.exclusive(), env.registry.transaction() as tx:
        assert tx.reap_node("n3", now)
    assert env.enroll(token, "n5", rsa_public_pem(80))[1]["address"] == "10.88.0.3"
    assert env.enroll(token, "n6", rsa_public_pem(81))[1]["address"] == "10.88.0.5"


def _make_ephemeral(env: HubEnv, name: str, last_seen: int, seconds: int) -> None:
    from tinc_hub.registry import nodes

    with env.registry._connection() as conn:
        conn.execute(nodes.update().where(nodes.c.name == name)
                     .values(ephemeral_seconds=seconds, last_seen_at=last_seen))


# -- listings ---------------------------------------------------------------------------------

def listing_cpu_seconds(env: HubEnv) -> "tuple[float, list]":
    """CPU seconds (load-proof, unlike wall time) of a fresh ``tinc-hub nodes --json``, and its rows."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(env.state.root),
                          "nodes", "--json"], capture_output=True, text=True, timeout=60, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, json.loads(out.stdout)


def test_nodes_json_with_20000_nodes_is_quick(tmp_path: Path) -> None:
    env = init_hub(tmp_path, vpn_subnet=WIDE)
    start_up, listed = listing_cpu_seconds(env)  # the same command, no nodes: Python and imports
    assert listed == []
    rows = fill_registry(env.registry, WIDE, FULL, reserved=[env.config.hub_address])
    liveness = env.state.root / "liveness"  # a live fleet: a host-up/down record per node
    liveness.mkdir()
    for i, row in enumerate(rows):
        (liveness / row.name).write_text(f"{'up' if i % 2 else 'down'} {row.enrolled_at} 192.0.2.{i % 250}\n")
    seconds, listed = listing_cpu_seconds(env)
    assert len(listed) == FULL and listed[0]["name"] == "fill0" and listed[-1]["address"] == "10.96.78.33"
    assert listed[0]["last_seen"] is not None
    per_row = (seconds - start_up) / FULL
    # measured: 0.15-0.3 s start-up (SQLite: no SQLAlchemy, no cryptography; bytecode compiled
    # as the tests run without .pyc) and 15-20 us per row with its liveness record; before:
    # 0.5 s start-up and 60 us per row (NodeRow objects, JSON row by row, pathlib per record)
    print(f"nodes --json CPU: start-up {start_up:.2f} s, {per_row * 1e6:.0f} us per node")
    assert start_up < 0.8, f"nodes --json with no nodes took {start_up:.2f} s of CPU"
    assert per_row < 40e-6, (f"nodes --json took {seconds:.2f} s of CPU for {FULL} nodes (start-up"
                             f" {start_up:.2f} s): {per_row * 1e6:.0f} us per node")
