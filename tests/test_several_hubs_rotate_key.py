"""`tinc-hub rotate-key` on one of two hubs (issue 13), for real: hubs erebor and rivendell on
a throwaway PostgreSQL registry, serving with --sync-interval 10, three nodes behind a NAT
router, real tincd and bootstrap.py sync loops (labkit.multihub).

A ping hobbiton -> bree every 0.1 s runs through the whole rotation, whose traffic erebor
relays (nodes prefer the lowest-named hub): the first rotate-key stages and publishes the
key and is killed in its wait (a crash); every node and rivendell learn the new host file
and keep their connection to erebor (the file keeps its mtime); the re-run resumes and
switches. Afterwards every node and rivendell are connected to erebor again (new
connections: its restarted tincd holds only the new key), the largest ping gap stays within
a second, and a tinc peer logging in as erebor with the old key is refused by rivendell and
by a node while the new key is accepted.
"""

import sys
import time
from typing import Iterator, Set

import pytest
from cryptography.hazmat.primitives import serialization

from bootstrap import bootstrap
from labkit import multihub, netlab, postgres

PG_MISSING = postgres.unavailable_reason()
pytestmark = [pytest.mark.skipif(PG_MISSING is not None, reason=str(PG_MISSING)),
              pytest.mark.netlab]

NET = "middle-earth"
VPN_SUBNET = "10.63.0.0/24"
EREBOR, RIVENDELL = "erebor", "rivendell"
HOBBITON, BREE, DALE = "hobbiton", "bree", "dale"
NODES = [HOBBITON, BREE, DALE]
SYNC_INTERVAL = 10  # serve --sync-interval: nodes sync every 8-10 s
LEARN_S = 2 * SYNC_INTERVAL + 10  # rotate-key's default wait for this interval
RECONNECT_S = 20.0  # tinc retries 5 s after the hub's restart; slack for a loaded machine
MAX_GAP_S = 1.0  # the bound held: measured ~0.1-0.3 s (one or two lost pings)

# a tinc 1.0 peer (labkit.hostile_tinc) logging in as NAME with KEY to the tincd at ADDRESS
LOGIN = r"""
import sys
from labkit.hostile_tinc import MetaConnection
name, key, peer_key, address = sys.argv[1:5]
try:
    MetaConnection(name, key, peer_key, address)
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
else:
    print("accepted")
"""


@pytest.fixture(scope="module")
def lab(pg) -> Iterator[multihub.MultiHubLab]:
    """erebor and rivendell serving with --sync-interval 10; hobbiton and dale enrolled
    through erebor, bree through rivendell; every node connected to both hubs."""
    with multihub.MultiHubLab([EREBOR, RIVENDELL], NODES, NET, VPN_SUBNET, pg=pg) as made:
        for name in (EREBOR, RIVENDELL):
            hub = made.add_hub(name, serve=False)
            hub.serve_proc = hub.host.popen(
                [hub.tinc_hub, "serve", "--sync-interval", str(SYNC_INTERVAL)],
                log="%s.tinc-hub-serve.log" % name, env={"PYTHONUNBUFFERED": "1"})
            hub.wait_healthy(30)
        for node, via in ((HOBBITON, EREBOR), (BREE, RIVENDELL), (DALE, EREBOR)):
            made.enrol(node, made.hub(via).token_create()["token"])
        netlab.wait_until(lambda: all(made.node_connected(n, h) for n in NODES
                                      for h in (EREBOR, RIVENDELL)), 45, 0.5,
                          what="every node connected to both hubs")
        yield made


def meta_ports(lab: multihub.MultiHubLab, node: str, hub: str) -> Set[str]:
    """The node's local ports of its established meta connections to the hub (a new
    connection has a new port)."""
    cp = lab.host(node).run(["ss", "-Htn", "state", "established", "dst", lab.hub(hub).address,
                             "dport", "=", ":655"], check=False)
    return {line.split()[2].rsplit(":", 1)[1] for line in cp.stdout.splitlines() if line.strip()}


def hubs_connected(lab: multihub.MultiHubLab) -> bool:
    """rivendell has an established meta connection with erebor (either one made it)."""
    cp = lab.host(RIVENDELL).run(["ss", "-Htn", "state", "established", "(", "sport", "=", ":655",
                                  "or", "dport", "=", ":655", ")"], check=False)
    return lab.hub(EREBOR).address in cp.stdout


def public_of_private(pem: str) -> str:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.PKCS1).decode().strip()


def holds_key(host: netlab.Host, path: str, public: str) -> bool:
    return bootstrap.public_key_block(host.read_file(path)) == public


def login_as_erebor(lab: multihub.MultiHubLab, key_pem: str, target: str, address: str) -> str:
    """From dale: a tinc peer logs in as erebor with key_pem to `target`'s tincd."""
    dale = lab.host(DALE)
    dale.write_file("/root/erebor.key", key_pem, mode=0o600)
    target_file = lab.host(target).read_file("/etc/tinc/%s/hosts/%s" % (NET, target))
    dale.write_file("/root/target.pub", bootstrap.public_key_block(target_file))
    cp = dale.run([sys.executable, "-c", LOGIN, EREBOR, "/root/erebor.key", "/root/target.pub",
                   address], timeout=60)
    return cp.stdout.strip()


def test_hub_key_rotation_keeps_node_traffic_flowing_and_retires_the_old_key(lab):
    erebor, rivendell = lab.hub(EREBOR), lab.hub(RIVENDELL)
    key_path, staged_path = erebor.net_dir + "/rsa_key.priv", erebor.net_dir + "/rsa_key.priv.new"
    old_private = erebor.host.read_file(key_path)
    hosts_erebor = "/etc/tinc/%s/hosts/%s" % (NET, EREBOR)
    before = {n: meta_ports(lab, n, EREBOR) for n in NODES}
    assert all(before.values()), before
    pinger = multihub.Pinger(lab.host(HOBBITON), lab.addresses[BREE], max_seconds=150)
    try:
        assert netlab.wait_until(lambda: len(pinger.replies()) >= 10, 10, 0.1), \
            "hobbiton -> bree does not flow before the rotation:\n" + pinger.proc.output()
        started = time.time()
        # the first run stages and publishes, then waits; killed there (a crash)
        first = erebor.host.popen([erebor.tinc_hub, "rotate-key", "--sync-interval",
                                   str(SYNC_INTERVAL)], log="rotate-key.first.log")
        netlab.wait_until(lambda: "waiting" in first.output() or first.poll() is not None, 60,
                          0.1, what="rotate-key to publish and wait")
        assert first.poll() is None and "2 x the nodes' sync interval %d s" % SYNC_INTERVAL \
            in first.output(), first.output()
        first.popen.kill()
        first.wait(10)
        new_public = public_of_private(erebor.host.read_file(staged_path))
        assert new_public != public_of_private(old_private)
        # rivendell (its follower) and every node (its sync) learn the new host file...
        took = multihub.wait_for(
            lambda: holds_key(rivendell.host, hosts_erebor, new_public)
            and all(holds_key(lab.host(n), hosts_erebor, new_public) for n in NODES),
            LEARN_S, "rivendell and every node to hold erebor's new key")
        netlab.record_timing("rotate-key: publication -> every node holds the new key", took)
        # ... without dropping their connection to erebor, which still runs the old key
        assert {n: meta_ports(lab, n, EREBOR) for n in NODES} == before
        assert erebor.host.read_file(key_path) == old_private
        # the re-run resumes (the key is published: no new one) and switches
        done = erebor.cli("rotate-key", "--wait", "0", timeout=120)
        switched = time.time()
        assert "resuming" in done.stdout and "tincd restarted" in done.stdout, done.stdout
        assert public_of_private(erebor.host.read_file(key_path)) == new_public
        assert not erebor.host.exists(staged_path)
        # every node and rivendell connect to erebor again: new connections, the new key
        took = multihub.wait_for(
            lambda: all(meta_ports(lab, n, EREBOR) - before[n] for n in NODES)
            and hubs_connected(lab), RECONNECT_S, "every node and rivendell back on erebor")
        netlab.record_timing("rotate-key: switch -> every node reconnected", took)
        assert netlab.wait_until(lambda: pinger.flowing(switched, 3.0), 15, 0.2), \
            "hobbiton -> bree does not flow after the switch"
    finally:
        replies = pinger.stop()
    gap = multihub.largest_gap([t for t in replies if t >= started - 1.0])
    netlab.record_timing("rotate-key: largest node<->node ping gap (0.1 s pings)", gap)
    print("largest hobbiton -> bree gap during the rotation: %.2f s" % gap)
    assert gap <= MAX_GAP_S, "node<->node outage of %.2f s during the rotation" % gap
    assert lab.host(HOBBITON).wait_ping(erebor.vpn_address(), 10)
    # the old key cannot pose as erebor, neither to rivendell nor to a node; the new one can
    node_address = lab.host(HOBBITON).addresses["lan"]
    assert login_as_erebor(lab, old_private, HOBBITON, node_address).startswith("refused")
    assert login_as_erebor(lab, old_private, RIVENDELL, rivendell.address).startswith("refused")
    assert login_as_erebor(lab, erebor.host.read_file(key_path), RIVENDELL,
                           rivendell.address) == "accepted"
