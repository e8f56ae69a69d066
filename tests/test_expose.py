"""tinc-hub expose, for real: a client on the public side reaches an HTTP server and a UDP echo
on a node behind the NAT through the hub (real tincd, real nftables, real bootstrap.py, in
network namespaces); the node sees the client's own address (no source NAT) with strict
rp_filter, or the hub's VPN address with --snat; unexpose and revoke close the port; a foreign
nftables table of the hub is byte-identical throughout; a node cannot use the hub as a router.

Tests run in file order and share one topology (revocation last).
"""

import json
import time

import pytest

from labkit import netlab
from expose_scripts import HOSTILE_SEND, UDP_SINK

pytestmark = pytest.mark.netlab

NET = "exponet"
HUB = "gate"
NODE = "web"
CLIENT_NET_HUB, CLIENT = "203.0.113.1", "203.0.113.10"  # the client's link to the hub
HTTP_PORT, HTTP_LISTEN = 8000, 8080
ECHO_PORT, ECHO_LISTEN = 7007, 7070
SINK_PORT = 5555  # on the client: what a hostile node sends must never arrive here
FOREIGN = "table inet foreign_fw"
FOREIGN_RULESET = """
table inet foreign_fw {
    chain input {
        type filter hook input priority filter + 5; policy accept;
        tcp dport 4444 counter drop
    }
    chain forward {
        type filter hook forward priority filter + 5; policy accept;
        ip saddr 198.18.0.0/15 counter drop
    }
}
"""

ECHO_SERVER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[2], int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    print("echo from %s:%d" % peer, flush=True)
    s.sendto(data, peer)
"""

UDP_ASK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
for _ in range(3):
    s.sendto(b"ping-42", (sys.argv[1], int(sys.argv[2])))
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    print(data.decode()); sys.exit(0)
sys.exit(1)
"""




class Env:
    def __init__(self, topo, hub, client, node):
        self.topo, self.hub, self.client, self.node = topo, hub, client, node
        self.node_vpn = None
        self.http = self.echo = None
        self.foreign_before = None

    def netlab_diagnostics(self):
        return self.topo.diagnostics()


def _foreign(host):
    return host.run(["nft", "list"] + FOREIGN.split(), timeout=10).stdout


@pytest.fixture(scope="module")
def env():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    topo = netlab.build_nat_topology(node_names=[NODE], hub_name="hub")
    try:
        # the client's own link to the hub: a host on the internet with its own address
        client = topo.add_public_client("client", CLIENT_NET_HUB, CLIENT)
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.serve()
        e = Env(topo, hub, client, topo.nodes[0])
        # the hub's own firewall, made before any exposure: must stay byte for byte
        topo.hub.run(["nft", "-f", "-"], input=FOREIGN_RULESET)
        e.foreign_before = _foreign(topo.hub)
        # strict reverse path filtering on the node (the replies' policy routing must pass it)
        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
            e.node.sysctl(key, 1)
        token = hub.token_create()["token"]
        proc = netlab.start_bootstrap(e.node, token, name=NODE, key_size=2048, init="none", timeout=60)
        assert proc.wait(timeout=150) == 0, proc.output()
        e.node_vpn = netlab.printed_address(proc.output())
        e.node.wait_ping(hub.vpn_address(), timeout=30)
        e.http = e.node.popen(["python3", "-m", "http.server", str(HTTP_PORT)], log="web.http.log")
        # bound to the VPN address: an unconnected UDP socket on 0.0.0.0 answers from the address
        # of the route back (the LAN's), which only works with --snat (see README)
        e.echo = e.node.popen(["python3", "-c", ECHO_SERVER, str(ECHO_PORT), e.node_vpn],
                              log="web.echo.log")
        e.node.wait_listening(HTTP_PORT, timeout=10)
        e.node.wait_listening(ECHO_PORT, timeout=10, proto="udp")
        yield e
    finally:
        topo.close()


def _curl(env, port, host=CLIENT_NET_HUB):
    return env.client.run(["curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                           "http://%s:%d/" % (host, port)], check=False, timeout=10)


def _udp(env, port, host=CLIENT_NET_HUB):
    return env.client.run(["python3", "-c", UDP_ASK, host, str(port)], check=False, timeout=10)


def _ip_forward(env):
    return env.topo.hub.read_file("/proc/sys/net/ipv4/ip_forward").strip()


def _our_table(env):
    return env.topo.hub.run(["nft", "list", "table", "ip", "tinc_hub_" + NET], check=False, timeout=10)


def _claims(env):
    return "Subnet = 0.0.0.0/0" in env.topo.hub.read_file("/etc/tinc/%s/hosts/%s" % (NET, HUB))


def test_closed_before_expose(env):
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "000"
    assert _ip_forward(env) == "0"
    assert not _claims(env)  # the hub claims 0.0.0.0/0 only behind its drops


def test_refusals_say_why_and_change_nothing(env):
    cases = [("%s:655" % NODE, [], "tinc port"),
             ("%s:80" % NODE, ["--listen", str(netlab.API_PORT)], "API port"),
             ("%s:22" % NODE, [], "ssh"),
             ("nobody:80", [], "no enrolled node named 'nobody'"),
             ("%s:80" % HUB, [], "no enrolled node named"),
             ("%s:80" % NODE, ["--listen", "127.0.0.1:80"], "not a unicast address"),
             ("%s:99999" % NODE, [], "not a number"),
             ("%s:80;reboot" % NODE, [], "not a number")]
    for target, extra, why in cases:
        cp = env.hub.cli("expose", target, *extra, check=False)
        assert cp.returncode != 0 and why in cp.stderr, (target, cp.stderr)
        assert len(cp.stderr.strip().splitlines()) == 1 and "hint:" in cp.stderr, cp.stderr
    assert json.loads(env.hub.cli("expose", "list", "--json").stdout) == []
    assert _our_table(env).returncode != 0


def test_client_reaches_http_and_udp_and_node_sees_its_address(env):
    cp = env.hub.cli("expose", "%s:%d" % (NODE, HTTP_PORT), "--listen", str(HTTP_LISTEN))
    assert "exposure 1: tcp *:%d -> %s %s:%d" % (HTTP_LISTEN, NODE, env.node_vpn, HTTP_PORT) in cp.stdout
    env.hub.cli("expose", "%s:%d" % (NODE, ECHO_PORT), "--proto", "udp", "--listen",
                "%s:%d" % (netlab.HUB_PUBLIC, ECHO_LISTEN))
    assert _ip_forward(env) == "1" and _claims(env)
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "200"
    assert '%s - - [' % CLIENT in env.http.output()  # the server logs the client's own address
    # the UDP exposure listens on 192.0.2.1 only (the client routes there through the hub)
    cp = _udp(env, ECHO_LISTEN, netlab.HUB_PUBLIC)
    assert cp.returncode == 0 and cp.stdout.strip() == "ping-42", cp.stderr
    assert "echo from %s:" % CLIENT in env.echo.output()
    assert _udp(env, ECHO_LISTEN, CLIENT_NET_HUB).returncode == 1  # not on the other address
    rows = json.loads(env.hub.cli("expose", "list", "--json").stdout)
    assert [(r["id"], r["proto"], r["listen_address"], r["listen_port"], r["snat"]) for r in rows] == \
        [(1, "tcp", None, HTTP_LISTEN, False), (2, "udp", netlab.HUB_PUBLIC, ECHO_LISTEN, False)]
    assert _foreign(env.topo.hub) == env.foreign_before


def test_node_own_traffic_keeps_its_route(env):
    # only what leaves from the VPN address takes the VPN; the node's own traffic does not
    own = env.node.run(["ip", "-4", "route", "get", CLIENT], timeout=10).stdout
    assert "dev eth0" in own, own
    reply = env.node.run(["ip", "-4", "route", "get", CLIENT, "from", env.node_vpn], timeout=10).stdout
    assert "dev " + NET in reply, reply


def test_duplicate_listen_port_is_refused(env):
    cp = env.hub.cli("expose", "%s:9" % NODE, "--listen", str(HTTP_LISTEN), check=False)
    assert cp.returncode == 1 and "already published (exposure 1" in cp.stderr, cp.stderr
    cp = env.hub.cli("expose", "%s:9" % NODE, "--proto", "udp", "--listen", str(HTTP_LISTEN))
    assert "exposure 3" in cp.stdout  # the same port in the other protocol is another service
    env.hub.cli("unexpose", "3")


def test_hostile_node_cannot_route_through_the_hub(env):
    sink = env.client.popen(["python3", "-u", "-c", UDP_SINK, str(SINK_PORT)], log="client.sink.log")
    try:
        netlab.wait_until(lambda: "ready" in sink.output(), 10, what="the client's UDP sink")
        # from the VPN address (policy routing puts it into the VPN; the hub claims 0.0.0.0/0)
        env.node.run(["python3", "-c", HOSTILE_SEND, env.node_vpn, CLIENT, str(SINK_PORT)], timeout=10)
        # and from the exposed service's own port, as if it were a reply
        env.node.run(["python3", "-c", HOSTILE_SEND, env.node_vpn, CLIENT, str(SINK_PORT), "escape",
                      str(ECHO_PORT)], check=False, timeout=10)
        # a ping through the VPN proves the path is live while nothing arrived
        env.node.wait_ping(env.hub.vpn_address(), timeout=10)
        time.sleep(1.0)  # the datagrams' time to arrive, were they forwarded (bounded)
        assert "got" not in sink.output(), sink.output()
        # control (the test can fail): our forward chain emptied by hand -> the path opens
        env.topo.hub.run(["nft", "flush", "chain", "ip", "tinc_hub_" + NET, "forward"], timeout=10)

        def sent_and_seen():
            env.node.run(["python3", "-c", HOSTILE_SEND, env.node_vpn, CLIENT, str(SINK_PORT)],
                         timeout=10)
            return "got" in sink.output()
        netlab.wait_until(sent_and_seen, 20, 0.5, what="the control datagrams at the client")
        env.hub.cli("expose", "apply")
    finally:
        sink.stop()


def test_snat_option_shows_the_hub_address(env):
    env.hub.cli("unexpose", "%s:%d" % (NODE, HTTP_PORT))
    env.hub.cli("expose", "%s:%d" % (NODE, HTTP_PORT), "--listen", str(HTTP_LISTEN), "--snat")
    before = env.http.output().count("\n")
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "200"
    new_lines = env.http.output().splitlines()[before:]
    assert any(line.startswith(env.hub.vpn_address() + " - - [") for line in new_lines), new_lines


def test_unexpose_closes_and_restores(env):
    out = env.hub.cli("unexpose", "%s:%d" % (NODE, HTTP_PORT)).stdout
    assert "removed" in out
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "000"
    assert _ip_forward(env) == "1"  # the UDP exposure is still there
    env.hub.cli("unexpose", "2")
    assert _udp(env, ECHO_LISTEN, netlab.HUB_PUBLIC).returncode == 1
    assert _ip_forward(env) == "0"  # as it was before the first exposure
    assert _our_table(env).returncode != 0  # our table is gone
    assert not _claims(env)  # and the claim before it
    assert _foreign(env.topo.hub) == env.foreign_before
    cp = env.hub.cli("unexpose", "2", check=False)
    assert cp.returncode == 1 and "no exposure '2'" in cp.stderr


def test_apply_is_idempotent_and_reapplies(env):
    env.hub.cli("expose", "%s:%d" % (NODE, HTTP_PORT), "--listen", str(HTTP_LISTEN))
    first = _our_table(env).stdout
    # a lost table (reboot, nft flush of ours) comes back from the registry
    env.topo.hub.run(["nft", "delete", "table", "ip", "tinc_hub_" + NET], timeout=10)
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "000"
    env.hub.cli("expose", "apply")
    env.hub.cli("expose", "apply")
    assert _our_table(env).stdout == first
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "200"
    assert _foreign(env.topo.hub) == env.foreign_before


def test_revoke_closes_the_port_at_once(env):
    out = env.hub.cli("revoke", NODE).stdout
    assert "1 exposure(s) of %s removed" % NODE in out, out
    assert _curl(env, HTTP_LISTEN).stdout.strip() == "000"
    assert json.loads(env.hub.cli("expose", "list", "--json").stdout) == []
    assert _ip_forward(env) == "0"
    cp = env.hub.cli("expose", "%s:%d" % (NODE, HTTP_PORT), check=False)
    assert cp.returncode == 1 and "is revoked" in cp.stderr
    assert _foreign(env.topo.hub) == env.foreign_before
