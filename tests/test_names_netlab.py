"""NAME.NET on real machines (issue 12): a real hub (`tinc-hub init` + `serve`) and real
nodes (bootstrap.py, tincd, the sync loop tinc-up starts) in network namespaces
(labkit.netlab), each with a private copy-on-write /etc, so /etc/hosts is each host's own.

`getent hosts` and `ping` by name before and after a node joins (the loop brings the new name
within the sync interval, nothing run by hand), a revoked node's name disappears from the hub
and the nodes, `leave` takes the block away; lines outside the block never change."""

import re
import time

import pytest

from labkit import netlab

pytestmark = pytest.mark.netlab

NET = "middle-earth"
HUB = "erebor"
SHIRE, BREE, DALE = "shire", "bree", "Dale_Town"  # Dale_Town resolves as dale-town.middle-earth
SYNC_INTERVAL = 10  # s: serve --sync-interval (the nodes' lower bound), so the waits below are short
SYNC_WAIT = 30  # s: the sync interval (times 0.8-1.0), a round and a margin for a loaded machine
OUTSIDE = "192.0.2.200 sentinel.example  # a line of the admin's, kept byte for byte\n"


def etc_is_private(host) -> bool:
    """True when /etc in host is netlab's overlay (never the machine's own /etc/hosts)."""
    mounts = host.run(["cat", "/proc/self/mountinfo"]).stdout
    return any(line.split()[4] == "/etc" and " - overlay " in line for line in mounts.splitlines())


@pytest.fixture(scope="module")
def lab():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    topo = netlab.build_nat_topology(node_names=[SHIRE, BREE, "dale"], hub_name="hub")
    try:
        for host in [topo.hub] + list(topo.nodes):
            if not etc_is_private(host):
                pytest.fail("netlab could not give %s a private /etc: this test would write the "
                            "machine's /etc/hosts" % host.name)
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.sync_interval = SYNC_INTERVAL
        hub.serve()
        nodes = {SHIRE: topo.nodes[0], BREE: topo.nodes[1], DALE: topo.nodes[2]}
        original = {}
        for name, node in nodes.items():  # an admin's line before the block
            node.run(["sh", "-c", "cat >> /etc/hosts"], input=OUTSIDE)
            original[name] = node.read_bytes("/etc/hosts")
        yield {"topo": topo, "hub": hub, "nodes": nodes, "original": original, "tokens": {}}
    finally:
        topo.close()


def join(lab, name):
    token = lab["hub"].token_create("--name", name)["token"]
    done = lab["nodes"][name].run(
        netlab.bootstrap_argv(name=name, key_size=2048, init="none", timeout=60,
                              python="/usr/bin/python3"),
        env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return netlab.printed_address(done.stdout)


def resolve(host, fqdn):
    """The address `getent hosts` gives for fqdn in host (glibc, nsswitch `files`), or None."""
    done = host.run(["getent", "hosts", fqdn], check=False)
    return done.stdout.split()[0] if done.returncode == 0 else None


def block_of(host):
    text = host.read_file("/etc/hosts")
    found = re.search(r"^# BEGIN tinc-bootstrap %s .*?^# END tinc-bootstrap %s\n" % (NET, NET),
                      text, re.S | re.M)
    return found.group(0) if found else None


def outside_block(host):
    block = block_of(host)
    data = host.read_bytes("/etc/hosts")
    return data.replace(block.encode(), b"") if block else data


def test_joined_nodes_and_the_hub_resolve_and_ping_each_other_by_name(lab):
    shire, bree, hub = lab["nodes"][SHIRE], lab["nodes"][BREE], lab["hub"]
    addresses = {SHIRE: join(lab, SHIRE), BREE: join(lab, BREE)}
    hub_vpn = hub.vpn_address()
    # bree joined after shire: the enrolment answer gave bree every name at once
    assert resolve(bree, "shire.middle-earth") == addresses[SHIRE]
    assert resolve(bree, "erebor.middle-earth") == hub_vpn
    assert resolve(bree, "bree.middle-earth") == addresses[BREE]
    assert resolve(bree, "Shire.Middle-Earth") == addresses[SHIRE]  # DNS names: any case
    assert bree.run(["ping", "-n", "-c1", "-W5", "shire.middle-earth"], check=False).returncode == 0
    assert bree.run(["ping", "-n", "-c1", "-W5", "erebor.middle-earth"], check=False).returncode == 0
    # the hub (its registry follower) resolves both
    assert netlab.wait_until(lambda: resolve(hub.host, "bree.middle-earth") == addresses[BREE], 10)
    assert resolve(hub.host, "shire.middle-earth") == addresses[SHIRE]
    assert hub.host.run(["ping", "-n", "-c1", "-W5", "bree.middle-earth"], check=False).returncode == 0
    # shire learns bree's name from its sync loop (started by tinc-up)
    started = time.monotonic()
    assert netlab.wait_until(lambda: resolve(shire, "bree.middle-earth") == addresses[BREE],
                             SYNC_WAIT), shire.read_file("/var/log/tinc-bootstrap.log")
    netlab.record_timing("names: a joined node's name on an older node", time.monotonic() - started)
    assert shire.run(["ping", "-n", "-c1", "-W5", "bree.middle-earth"], check=False).returncode == 0
    for name in (SHIRE, BREE):  # the admin's lines are untouched
        assert outside_block(lab["nodes"][name]) == lab["original"][name]
    lab["addresses"] = addresses


def test_a_new_node_appears_everywhere_within_the_sync_interval(lab):
    shire, hub = lab["nodes"][SHIRE], lab["hub"]
    joined = time.monotonic()
    dale = join(lab, DALE)
    assert resolve(lab["nodes"][DALE], "shire.middle-earth") == lab["addresses"][SHIRE]
    assert netlab.wait_until(lambda: resolve(hub.host, "dale-town.middle-earth") == dale, 10)
    netlab.record_timing("names: a new node's name on the hub (from the start of its join)", time.monotonic() - joined)
    assert netlab.wait_until(lambda: resolve(shire, "dale-town.middle-earth") == dale, SYNC_WAIT), \
        shire.read_file("/var/log/tinc-bootstrap.log")
    netlab.record_timing("names: a new node's name on another node (from the start of its join)", time.monotonic() - joined)
    assert shire.run(["ping", "-n", "-c1", "-W5", "dale-town.middle-earth"], check=False).returncode == 0
    assert "/etc/hosts" in shire.read_file("/var/log/tinc-bootstrap.log")  # the loop said so
    lab["addresses"][DALE] = dale


def test_a_revoked_nodes_name_disappears(lab):
    shire, bree, hub = lab["nodes"][SHIRE], lab["nodes"][BREE], lab["hub"]
    hub.cli("revoke", DALE)
    revoked = time.monotonic()
    assert netlab.wait_until(lambda: resolve(hub.host, "dale-town.middle-earth") is None, 10)
    netlab.record_timing("names: a revoked node's name gone from the hub", time.monotonic() - revoked)
    for node in (shire, bree):
        assert netlab.wait_until(lambda: resolve(node, "dale-town.middle-earth") is None, SYNC_WAIT)
    netlab.record_timing("names: a revoked node's name gone from the nodes", time.monotonic() - revoked)
    assert resolve(shire, "bree.middle-earth") == lab["addresses"][BREE]
    for name in (SHIRE, BREE):
        assert outside_block(lab["nodes"][name]) == lab["original"][name]


def test_a_sync_round_with_the_same_names_writes_nothing(lab):
    shire = lab["nodes"][SHIRE]
    before = shire.run(["stat", "-c", "%i %Y", "/etc/hosts"]).stdout
    done = shire.run(["/usr/bin/python3", "/etc/tinc/%s/bootstrap.py" % NET, "sync", "--once"],
                     check=False, timeout=60)
    assert done.returncode == 0 and "nothing changed" in done.stderr, done.stderr
    assert shire.run(["stat", "-c", "%i %Y", "/etc/hosts"]).stdout == before


def test_leave_takes_the_block_away(lab):
    bree = lab["nodes"][BREE]
    done = bree.run(["/usr/bin/python3", str(netlab.BOOTSTRAP_PY), "leave", "--net", NET],
                    check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert bree.read_bytes("/etc/hosts") == lab["original"][BREE]
    assert resolve(bree, "shire.middle-earth") is None

