"""Tests of the harness itself: the NAT holds, hosts are private, cleanup is complete, and
plain tinc 1.0 (the walkthrough, by hand) works in the topology."""

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from labkit import netlab

pytestmark = pytest.mark.netlab

PEER_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7777)); s.listen(1); s.settimeout(15)
print("ready", flush=True)
c, peer = s.accept()
print("peer", peer[0], flush=True)
c.close()
"""

CLIENT = ("import socket; socket.create_connection(('192.0.2.1', 7777), timeout=5).close()")


def test_nodes_reach_hub_through_masquerade(nat_topology):
    topo = nat_topology
    for node in topo.nodes:
        assert node.ping(netlab.HUB_PUBLIC), "%s cannot ping the hub" % node.name
    # the hub sees the router's public address, not the node's LAN address
    server = topo.hub.popen(["python3", "-u", "-c", PEER_SERVER])
    netlab.wait_until(lambda: "ready" in server.output() or server.poll() is not None, 10,
                      what="peer server")
    topo.nodes[0].run(["python3", "-c", CLIENT], timeout=15)
    assert server.wait(timeout=10) == 0, server.output()
    assert "peer %s" % netlab.ROUTER_PUBLIC in server.output(), server.output()


def test_hub_cannot_reach_the_lan(nat_topology):
    topo = nat_topology
    node_lan = topo.nodes[0].addresses["lan"]
    assert topo.router.ping(node_lan), "router cannot reach the node (broken LAN)"
    cp = topo.hub.run(["ping", "-n", "-c", "1", "-W", "1", node_lan], check=False)
    assert cp.returncode != 0
    assert "unreachable" in (cp.stdout + cp.stderr).lower(), cp.stdout + cp.stderr
    # even with a route via the router, the router forwards nothing new into the LAN
    topo.hub.run(["ip", "route", "add", str(netlab.LAN_NET), "via", netlab.ROUTER_PUBLIC])
    try:
        assert not topo.hub.ping(node_lan), "hub reached a node behind the NAT"
    finally:
        topo.hub.run(["ip", "route", "del", str(netlab.LAN_NET)])
    # no default route on the hub
    assert "default" not in topo.hub.run(["ip", "route"]).stdout


def test_forwarding_only_in_router(nat_topology):
    topo = nat_topology
    assert topo.router.read_file("/proc/sys/net/ipv4/ip_forward").strip() == "1"
    for h in [topo.hub] + list(topo.nodes):
        assert h.read_file("/proc/sys/net/ipv4/ip_forward").strip() == "0", h.name


def test_nodes_share_one_lan(nat_topology):
    a, b = nat_topology.nodes
    assert a.ping(b.addresses["lan"])


@pytest.mark.parametrize("directory", ["/etc/tinc", "/var/lib/tinc-hub", "/run", "/var/log",
                                       "/etc"])
def test_private_directories(nat_topology, directory):
    topo = nat_topology
    name = "netlab-marker-%s" % secrets.token_hex(4)
    path = os.path.join(directory, name)
    topo.hub.write_file(path, "hub only\n")
    try:
        assert topo.hub.read_file(path) == "hub only\n"
        for other in [topo.router] + list(topo.nodes):
            assert not other.exists(path), "%s visible in %s" % (path, other.name)
        assert not os.path.exists(path), "%s visible in the root namespace" % path
        if directory != "/run":  # /var/run is /run
            assert os.path.realpath("/var/run") == "/run"
    finally:
        topo.hub.run(["rm", "-f", path])


def test_var_run_is_private_run(nat_topology):
    hub, node = nat_topology.hub, nat_topology.nodes[0]
    hub.write_file("/var/run/tinc.x.pid", "123\n")
    assert hub.read_file("/run/tinc.x.pid") == "123\n"
    assert not node.exists("/var/run/tinc.x.pid")
    hub.run(["rm", "-f", "/run/tinc.x.pid"])


def test_hostnames_and_repo_visible(nat_topology):
    for h in nat_topology.hosts.values():
        assert h.run(["hostname"]).stdout.strip() == h.name
        assert h.exists(str(netlab.REPO_ROOT / "labkit" / "labkit" / "netlab.py"))


def test_run_reports_failures(nat_topology):
    with pytest.raises(netlab.CommandError) as e:
        nat_topology.hub.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert e.value.returncode == 3 and "oops" in str(e.value) and "hub" in str(e.value)
    with pytest.raises(netlab.CommandError) as e:
        nat_topology.hub.run(["sleep", "5"], timeout=0.5)
    assert "timed out" in str(e.value)


def test_close_leaves_nothing_behind(make_topology):
    topo = make_topology(1)
    names = topo.netns_names()
    pids = []
    for h in topo.hosts.values():
        p = h.popen(["sleep", "300"])
        pids.append(p.pid)
        # a daemon that escapes its parent (like tincd)
        h.run("setsid sh -c 'sleep 301 & echo $! > /run/daemon.pid' </dev/null >/dev/null 2>&1")
        pid = netlab.wait_until(lambda: h.read_pidfile("/run/daemon.pid"), 5, what="daemon pid")
        pids.append(pid)
        pids.append(h.anchor_pid)
    assert all(netlab.pid_alive(p) for p in pids)
    topo.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for n in names:
        assert n not in listed
        assert not os.path.exists("/run/netns/" + n)
    alive = [p for p in pids if netlab.pid_alive(p)]
    assert not alive, "processes left behind: %s" % alive
    topo.close()  # idempotent


def test_plain_tinc_walkthrough(make_topology):
    """The seed walkthrough by hand (with `ip` instead of ifconfig) in the NAT topology."""
    net = "middle-earth"
    topo = make_topology(node_names=["hobbiton", "rivendell"], hub_name="erebor")
    hub, n1, n2 = topo.hub, topo.nodes[0], topo.nodes[1]
    addrs = {"erebor": "10.0.0.1", "hobbiton": "10.0.0.3", "rivendell": "10.0.0.4"}
    hub_file = netlab.plain_tinc_setup(hub, net, "erebor", addrs["erebor"],
                                       address=netlab.HUB_PUBLIC)
    assert "BEGIN RSA PUBLIC KEY" in hub_file
    assert hub.run(["stat", "-c", "%a", "/etc/tinc/%s/rsa_key.priv" % net]).stdout.strip() == "600"
    for node in (n1, n2):
        node_file = netlab.plain_tinc_setup(node, net, node.name, addrs[node.name],
                                            connect_to="erebor")
        hub.write_file("/etc/tinc/%s/hosts/%s" % (net, node.name), node_file)
        node.write_file("/etc/tinc/%s/hosts/erebor" % net, hub_file)

    assert not n1.ping(addrs["erebor"]) and not hub.ping(addrs["hobbiton"])
    pids = {}
    try:
        for h in (hub, n1, n2):
            pids[h.name] = netlab.start_tincd(h, net)
        t0 = time.monotonic()
        assert n1.wait_ping(addrs["erebor"], timeout=20), topo.diagnostics()
        assert n2.wait_ping(addrs["erebor"], timeout=20), topo.diagnostics()
        elapsed = time.monotonic() - t0
        assert hub.ping(addrs["hobbiton"]) and hub.ping(addrs["rivendell"])
        # spokes holding only the hub's host file reach each other through the hub
        assert n1.wait_ping(addrs["rivendell"], timeout=10), topo.diagnostics()
        print("plain tinc: VPN up %.2fs after tincd start" % elapsed)
    finally:
        for h in (n1, n2, hub):
            if h.name in pids:
                assert netlab.stop_tincd(h, net) == pids[h.name]
    for h in (hub, n1, n2):
        assert not netlab.pid_alive(pids[h.name])
    assert not n1.ping(addrs["erebor"])


EXITS_WITHOUT_CLOSE = r"""
import json
from labkit import netlab
topo = netlab.build_nat_topology(1)
node = topo.nodes[0]
stubborn = node.popen(["sh", "-c", "trap '' TERM; : > /run/trapped; while :; do sleep 1; done"])
netlab.wait_until(lambda: node.exists("/run/trapped"), 10, what="the trap")
print(json.dumps({"netns": topo.netns_names(), "pids": [stubborn.pid] + [
    h.anchor_pid for h in topo.hosts.values()]}), flush=True)
"""


def test_exit_without_close_removes_everything():
    """A process that forgets close(): the at-exit list removes its namespaces, and a
    process ignoring SIGTERM is killed after the grace period."""
    cp = subprocess.run([sys.executable, "-c", EXITS_WITHOUT_CLOSE], capture_output=True,
                        text=True, timeout=120, cwd="/")
    assert cp.returncode == 0, cp.stderr
    made = json.loads(cp.stdout.splitlines()[-1])
    assert len(made["netns"]) == 3
    for name in made["netns"]:
        assert not os.path.exists("/run/netns/" + name), name
    alive = [p for p in made["pids"] if netlab.pid_alive(p)]
    assert not alive, "processes left behind: %s\n%s" % (alive, cp.stderr)
