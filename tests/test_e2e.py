"""End to end: the real hub (tinc-hub init/serve/token/nodes/revoke), the real bootstrap.py on
nodes behind a NAT, real tincd, in network namespaces (labkit.netlab).

Tests run in file order and share one topology per module; the destructive ones (hostile node,
revocation) come last.
"""

import datetime
import json
import ipaddress
import re
import time

import pytest

from labkit import netlab

pytestmark = pytest.mark.netlab

NET = "e2enet"
HUB = "erebor"
VPN = ipaddress.ip_network("10.0.0.0/24")
A, B, C = "alpha", "bravo", "charlie"  # node host names = tinc names
PIDFILE = "/var/run/tinc.%s.pid" % NET
NETDIR = "/etc/tinc/%s" % NET


class Env:
    """The shared state of this module: topology, hub driver, enrolment results."""

    def __init__(self, topo, hub):
        self.topo = topo
        self.hub = hub
        self.nodes = {n.name: n for n in topo.nodes}
        self.hub_vpn = None
        self.before = {}
        self.results = {}   # node name -> (rc, output, seconds, token)
        self.addr = {}      # node name -> VPN address printed by bootstrap

    def netlab_diagnostics(self):
        return self.topo.diagnostics()


@pytest.fixture(scope="module")
def env():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    t0 = time.monotonic()
    topo = netlab.build_nat_topology(node_names=[A, B, C], hub_name="hub")
    try:
        netlab.record_timing("topology (hub, router, 3 nodes)", time.monotonic() - t0)
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        e = Env(topo, hub)
        t = time.monotonic()
        hub.init(key_size=2048, init="none")
        netlab.record_timing("tinc-hub init", time.monotonic() - t)
        t = time.monotonic()
        hub.serve()
        netlab.record_timing("tinc-hub serve until /healthz answers", time.monotonic() - t)
        e.hub_vpn = hub.vpn_address()
        yield e
    finally:
        topo.close()


def _diag(env):
    return "\n" + env.topo.diagnostics()


def _bootstrap_argv(name):
    return netlab.bootstrap_argv(name=name, key_size=2048, init="none", timeout=60)


@pytest.fixture(scope="module")
def enrolled(env):
    """Two nodes bootstrapped at the same time (env TINC_BOOTSTRAP_TOKEN), one token each."""
    hub = env.hub
    # state before: no VPN
    for n in (A, B):
        env.before[n] = env.nodes[n].ping(env.hub_vpn, 1, 1)
    env.before["hub->vpn"] = any(env.topo.hub.ping(str(VPN.network_address + i), 1, 1)
                                 for i in (2, 3))
    tokens = {n: hub.token_create()["token"] for n in (A, B)}
    t0 = time.monotonic()
    procs = {n: netlab.start_bootstrap(env.nodes[n], tokens[n], name=n, key_size=2048,
                                       init="none", timeout=60) for n in (A, B)}
    for n, p in procs.items():
        try:
            rc = p.wait(timeout=150)
        except netlab.CommandError:
            p.stop()
            rc = "timeout"
        env.results[n] = (rc, p.output(), time.monotonic() - t0, tokens[n])
        env.addr[n] = netlab.printed_address(p.output()) if rc == 0 else None
    netlab.record_timing("2 concurrent bootstraps (both done)", time.monotonic() - t0)
    return env


# --------------------------------------------------------------------------- the hub alone

def test_hub_initialised_and_running(env):
    hub = env.topo.hub
    conf = hub.read_file(NETDIR + "/tinc.conf")
    assert re.search(r"(?im)^\s*Name\s*=\s*%s\s*$" % HUB, conf), conf
    assert re.search(r"(?im)^\s*TunnelServer\s*=\s*yes\s*$", conf), conf
    hostfile = hub.read_file("%s/hosts/%s" % (NETDIR, HUB))
    assert re.search(r"(?im)^\s*Address\s*=\s*192\.0\.2\.1\s*$", hostfile), hostfile
    assert re.search(r"(?im)^\s*Subnet\s*=\s*10\.0\.0\.0/24\s*$", hostfile), hostfile
    assert "BEGIN RSA PUBLIC KEY" in hostfile
    pid = env.hub.tincd_pid()
    assert pid and netlab.pid_alive(pid) and pid in hub.pids(), \
        "hub tincd not running after `tinc-hub init --init none` (pidfile %s: %s)" % (PIDFILE, pid)
    assert env.hub_vpn and ipaddress.ip_address(env.hub_vpn) in VPN
    assert hub.wait_ping(env.hub_vpn, 5), "hub does not hold its own VPN address" + _diag(env)


def test_token_json_and_pin(env):
    tok = env.hub.token_create()
    assert set(tok) >= {"token", "expires_at", "command"}, tok
    data = netlab.decode_token(tok["token"])
    assert data["a"] == netlab.HUB_PUBLIC and int(data["p"]) == netlab.API_PORT
    assert data["n"] == NET and data["h"] == HUB
    assert data["k"].startswith("sha256//")
    assert tok["token"] in tok["command"] and data["k"] in tok["command"], tok["command"]
    expires = datetime.datetime.fromisoformat(tok["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.datetime.now(datetime.timezone.utc), tok["expires_at"]
    node = env.nodes[C]
    # the pin in the token matches the certificate the hub serves, seen from behind the NAT
    cp = env.hub.healthz(pin=data["k"], from_host=node)
    assert cp.returncode == 0 and cp.stdout.strip() == "200", (cp.returncode, cp.stdout, cp.stderr)
    wrong = "sha256//" + "A" * 43 + "="
    cp = env.hub.healthz(pin=wrong, from_host=node)
    assert cp.returncode == 90, "curl accepted a wrong pin: %s %s" % (cp.returncode, cp.stderr)


# --------------------------------------------------------------------------- enrolment

def test_no_vpn_before_enrolment(enrolled):
    assert enrolled.before == {A: False, B: False, "hub->vpn": False}


def test_concurrent_bootstrap_succeeds(enrolled):
    for n in (A, B):
        rc, out, secs, _ = enrolled.results[n]
        assert rc == 0, "bootstrap on %s: exit %s after %.1fs\n%s%s" % (n, rc, secs, out,
                                                                       _diag(enrolled))
        assert enrolled.addr[n], "bootstrap on %s did not print its address last:\n%s" % (n, out)
        netlab.record_timing("bootstrap %s (concurrent)" % n, secs)


def test_addresses_distinct_and_listed(enrolled):
    a, b = enrolled.addr[A], enrolled.addr[B]
    assert a and b and a != b
    for x in (a, b):
        assert ipaddress.ip_address(x) in VPN and x != enrolled.hub_vpn
    listed = {n.get("name"): n for n in enrolled.hub.nodes()}
    for n in (A, B):
        assert n in listed, "tinc-hub nodes --json lacks %s: %s" % (n, listed)
        got = str(listed[n].get("address", "")).split("/")[0]
        assert got == enrolled.addr[n], (n, listed[n])
    # and the node's own files agree
    for n in (A, B):
        hostfile = enrolled.nodes[n].read_file("%s/hosts/%s" % (NETDIR, n))
        assert re.search(r"(?im)^\s*Subnet\s*=\s*%s/32\s*$" % re.escape(enrolled.addr[n]),
                         hostfile), hostfile


def test_hub_and_nodes_ping_both_ways(enrolled):
    hub = enrolled.topo.hub
    for n in (A, B):
        node = enrolled.nodes[n]
        assert node.wait_ping(enrolled.hub_vpn, 10), "%s -> hub VPN failed%s" % (n, _diag(enrolled))
        assert hub.wait_ping(enrolled.addr[n], 10), "hub -> %s failed%s" % (n, _diag(enrolled))


def test_node_to_node_through_hub(enrolled):
    a, b = enrolled.nodes[A], enrolled.nodes[B]
    assert a.wait_ping(enrolled.addr[B], 15), "alpha -> bravo failed" + _diag(enrolled)
    assert b.wait_ping(enrolled.addr[A], 15), "bravo -> alpha failed" + _diag(enrolled)


def test_rerun_is_idempotent(enrolled):
    node = enrolled.nodes[A]
    before = node.snapshot("/etc/tinc")
    pid = node.read_pidfile(PIDFILE)
    assert pid and netlab.pid_alive(pid)
    token = enrolled.results[A][3]
    t = time.monotonic()
    cp = node.run(_bootstrap_argv(A), env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=150,
                  check=False)
    netlab.record_timing("bootstrap re-run (idempotent)", time.monotonic() - t)
    assert cp.returncode == 0, "re-run exit %s\nstdout:\n%s\nstderr:\n%s" % (
        cp.returncode, cp.stdout, cp.stderr)
    assert netlab.printed_address(cp.stdout) == enrolled.addr[A], cp.stdout
    after = node.snapshot("/etc/tinc")
    changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
               if before.get(k) != after.get(k)}
    assert not changed, "re-run changed files under /etc/tinc: %s" % changed
    assert node.read_pidfile(PIDFILE) == pid and netlab.pid_alive(pid), "tincd was restarted"
    assert node.ping(enrolled.hub_vpn)


def test_one_liner_from_token_json(enrolled):
    """The literal `command` of `token create --json`, run by sh -c on a fresh node."""
    node = enrolled.nodes[C]
    tok = enrolled.hub.token_create()
    t = time.monotonic()
    cp = node.run(["sh", "-c", tok["command"]], timeout=300, check=False)
    secs = time.monotonic() - t
    netlab.record_timing("one-liner (curl | python3, defaults)", secs)
    assert cp.returncode == 0, "one-liner %r: exit %s\nstdout:\n%s\nstderr:\n%s%s" % (
        tok["command"], cp.returncode, cp.stdout, cp.stderr, _diag(enrolled))
    addr = netlab.printed_address(cp.stdout)
    assert addr and addr not in (enrolled.addr[A], enrolled.addr[B], enrolled.hub_vpn), cp.stdout
    assert node.wait_ping(enrolled.hub_vpn, 10)
    assert enrolled.topo.hub.wait_ping(addr, 10)
    listed = {n.get("name"): n for n in enrolled.hub.nodes()}
    assert C in listed, "node enrolled by the one-liner is not listed as %s: %s" % (C, listed)


def _status(node):
    cp = node.run(["python3", str(netlab.BOOTSTRAP_PY), "status", "--json"], check=False, timeout=30)
    return cp.returncode, (json.loads(cp.stdout) if cp.stdout.strip() else None), cp.stderr


def test_status_reports_net_address_service_and_hub(enrolled):
    rc, report, err = _status(enrolled.nodes[A])
    assert rc == 0, err
    assert report == {"net": NET, "name": A, "address": enrolled.addr[A], "prefix": 24,
                      "hub": HUB, "init": "none", "service": "running",
                      "hub_reachable": True, "sync": "running"}


def test_leave_stops_unregisters_and_removes(enrolled):
    """charlie joined with the one-liner's defaults (--init auto: sysv here, nets.boot)."""
    node = enrolled.nodes[C]
    pid = node.read_pidfile(PIDFILE)
    assert pid and netlab.pid_alive(pid)
    assert NET in node.read_file("/etc/tinc/nets.boot").split()
    cp = node.run(["python3", str(netlab.BOOTSTRAP_PY), "leave"], check=False, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert not netlab.pid_alive(pid), "tincd still runs after leave"
    assert node.run(["test", "-e", NETDIR], check=False).returncode == 1
    assert NET not in node.read_file("/etc/tinc/nets.boot").split()
    rc, report, err = _status(node)
    assert rc == 2 and "no nets joined here" in err
    assert not node.ping(enrolled.hub_vpn)


# --------------------------------------------------------------------------- hostile node

def _tun_of(node, addr):
    ifname = node.iface_of(addr)
    assert ifname, "no interface holds %s in %s" % (addr, node.name)
    return ifname


def _ping_count(host, addr, count=5):
    cp = host.run(["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", addr], check=False,
                  timeout=30)
    m = re.search(r"(\d+) received", cp.stdout)
    return int(m.group(1)) if m else 0, cp.stdout + cp.stderr


def test_hostile_subnet_claim_captures_nothing(enrolled):
    a, b, hub = enrolled.nodes[A], enrolled.nodes[B], enrolled.topo.hub
    addr_a, addr_b = enrolled.addr[A], enrolled.addr[B]
    assert addr_a and addr_b
    a.append_file("%s/hosts/%s" % (NETDIR, A),
                  "Subnet = %s/32\nSubnet = 0.0.0.0/0\n" % addr_b)
    old = netlab.stop_tincd(a, NET)
    assert old, "no tincd pid in %s on %s" % (PIDFILE, A)
    new = netlab.start_tincd(a, NET, timeout=15)
    assert new != old, "tincd on alpha was not restarted"
    assert a.wait_ping(enrolled.hub_vpn, 30), "alpha did not reconnect" + _diag(enrolled)
    tun = _tun_of(a, addr_a)
    a.run(["ip", "addr", "add", "%s/32" % addr_b, "dev", tun])

    rx0 = a.rx_packets(tun)
    got, out = _ping_count(hub, addr_b)
    rx1 = a.rx_packets(tun)
    assert got >= 4, "hub -> bravo broken by alpha's claim:\n" + out + _diag(enrolled)
    assert rx1 == rx0, "alpha's tun received %d packets while the hub pinged bravo's address" \
        % (rx1 - rx0)
    got, out = _ping_count(b, enrolled.hub_vpn)
    assert got >= 4, "bravo -> hub broken by alpha's claim:\n" + out + _diag(enrolled)
    # the default-route claim captures nothing either: the hub owns the VPN prefix
    rx0 = a.rx_packets(tun)
    hub.ping(str(VPN.network_address + 250), 2, 1)
    assert a.rx_packets(tun) == rx0
    # seen from the other node: bravo's packets to unassigned VPN addresses, and to outside
    # the VPN, never reach alpha (its 0.0.0.0/0 is believed by nobody but itself)
    rx0 = a.rx_packets(tun)
    b.ping(str(VPN.network_address + 250), 2, 1)
    b.ping("192.0.2.77", 1, 1)
    assert a.rx_packets(tun) == rx0, "alpha's tun received bravo's packets"


# --------------------------------------------------------------------------- revocation

def test_revoke_cuts_node_off_within_10s(enrolled):
    b = enrolled.nodes[B]
    assert b.wait_ping(enrolled.hub_vpn, 10)
    enrolled.hub.cli("revoke", B)
    took = b.wait_no_ping(enrolled.hub_vpn, timeout=10, confirm=3)
    assert took is not None, "bravo still reaches the hub 10 s after `tinc-hub revoke %s`%s" % (
        B, _diag(enrolled))
    netlab.record_timing("revoke -> bravo's first failed ping", took)
    # the other nodes are unaffected
    assert enrolled.nodes[A].wait_ping(enrolled.hub_vpn, 5), "alpha lost the hub after revoke"


def test_revoked_node_cannot_reenrol(enrolled):
    """After revocation the hub answers 403 and bootstrap stops for good (exit 4)."""
    b = enrolled.nodes[B]
    cp = b.run(_bootstrap_argv(B), env={"TINC_BOOTSTRAP_TOKEN": enrolled.results[B][3]},
               timeout=150, check=False)
    assert cp.returncode == 4, "re-enrolling a revoked node: exit %s\nstdout:\n%s\nstderr:\n%s" % (
        cp.returncode, cp.stdout, cp.stderr)
    listed = {n.get("name"): n for n in enrolled.hub.nodes()}
    assert B not in listed or listed[B].get("revoked"), listed.get(B)
    assert not b.ping(enrolled.hub_vpn)
