"""The hub never becomes a router for a hostile node, whatever ip_forward was (issue 12).

The hub claims ``Subnet = 0.0.0.0/0`` (so that nodes send the replies of exposed services to
it) only while its nftables table with the forward drops is in place. Here the hub's
ip_forward is ON before tinc-hub is installed (tests/test_expose.py covers it OFF), and a
node sends datagrams from its VPN address to a host outside the VPN: they must never arrive,
before any exposure, with one, and after the table was lost (a reboot: the hub's tinc-up puts
the drops back before tincd lets any node in). Each case has its positive control: with the
claim or the drops taken away by hand, the same datagrams DO arrive (so the test can fail).
Real tincd, real nftables, real bootstrap.py, in network namespaces; tests run in file order.
"""

import time

import pytest

from labkit import netlab
from expose_scripts import HOSTILE_SEND, UDP_SINK

pytestmark = pytest.mark.netlab

NET = "guardnet"
HUB = "gate"
NODE = "web"
CLIENT_NET_HUB, CLIENT = "203.0.113.1", "203.0.113.10"
HTTP_PORT, HTTP_LISTEN = 8000, 8080
SINK_PORT = 5555
CLAIM = "Subnet = 0.0.0.0/0"




class Env:
    def __init__(self, topo, hub, client, node):
        self.topo, self.hub, self.client, self.node = topo, hub, client, node
        self.node_vpn = None
        self.sink = self.http = None

    def netlab_diagnostics(self):
        return self.topo.diagnostics()


@pytest.fixture(scope="module")
def env():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    topo = netlab.build_nat_topology(node_names=[NODE], hub_name="hub")
    try:
        # the client's own link to the hub: a host on the internet with its own address
        client = topo.add_public_client("client", CLIENT_NET_HUB, CLIENT)
        topo.hub.sysctl("net.ipv4.ip_forward", 1)  # a hub that routes already (docker, a router)
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.serve()
        e = Env(topo, hub, client, topo.nodes[0])
        token = hub.token_create()["token"]
        proc = netlab.start_bootstrap(e.node, token, name=NODE, key_size=2048, init="none", timeout=60)
        assert proc.wait(timeout=150) == 0, proc.output()
        e.node_vpn = netlab.printed_address(proc.output())
        e.node.wait_ping(hub.vpn_address(), timeout=30)
        e.http = e.node.popen(["python3", "-m", "http.server", str(HTTP_PORT)], log="web.http.log")
        e.node.wait_listening(HTTP_PORT, timeout=10)
        e.sink = client.popen(["python3", "-u", "-c", UDP_SINK, str(SINK_PORT)], log="client.sink.log")
        netlab.wait_until(lambda: "ready" in e.sink.output(), 10, what="the client's UDP sink")
        yield e
    finally:
        topo.close()


def _hub_file(env):
    return env.topo.hub.read_file("/etc/tinc/%s/hosts/%s" % (NET, HUB))


def _send(env, tag):
    env.node.run(["python3", "-c", HOSTILE_SEND, env.node_vpn, CLIENT, str(SINK_PORT), tag],
                 timeout=10)


def _arrived(env, tag):
    return ("got %r" % tag.encode()) in env.sink.output()


def assert_never_arrives(env, tag):
    """Datagrams sent from the node's VPN address to the client do not reach it, while the
    VPN is proven live by a ping through it."""
    _send(env, tag)
    env.node.wait_ping(env.hub.vpn_address(), timeout=10)
    time.sleep(1.0)  # the datagrams' time to arrive, were they forwarded (bounded)
    assert not _arrived(env, tag), env.sink.output()


def arrives(env, tag, timeout=20):
    """Positive control: keep sending until the datagrams arrive (bounded)."""
    def sent_and_seen():
        _send(env, tag)
        return _arrived(env, tag)
    netlab.wait_until(sent_and_seen, timeout, 0.5, what="the control datagrams at the client")


def _table(env):
    return env.topo.hub.run(["nft", "-a", "list", "table", "ip", "tinc_hub_" + NET], check=False,
                            timeout=10)


def _curl(env):
    return env.client.run(["curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                           "http://%s:%d/" % (CLIENT_NET_HUB, HTTP_LISTEN)], check=False,
                          timeout=10).stdout.strip()


def _sighup_hub(env):
    env.topo.hub.run(["kill", "-HUP", str(env.hub.tincd_pid())], timeout=10)


def test_before_any_exposure_the_hub_claims_nothing(env):
    assert env.topo.hub.read_file("/proc/sys/net/ipv4/ip_forward").strip() == "1"
    assert CLAIM not in _hub_file(env)
    assert _table(env).returncode != 0  # init touched no firewall
    assert_never_arrives(env, "no-claim")
    # control: the claim that init used to write, with forwarding on and no table: a router
    path = "/etc/tinc/%s/hosts/%s" % (NET, HUB)
    original = _hub_file(env)
    head, _, key = original.partition("\n\n")
    env.topo.hub.write_file(path, head + "\n" + CLAIM + "\n\n" + key)
    _sighup_hub(env)
    try:
        arrives(env, "control-claim")
    finally:
        env.topo.hub.write_file(path, original)
        _sighup_hub(env)


def test_with_an_exposure_the_drops_come_before_the_claim(env):
    env.hub.cli("expose", "%s:%d" % (NODE, HTTP_PORT), "--listen", str(HTTP_LISTEN))
    assert CLAIM in _hub_file(env)
    listing = _table(env).stdout
    assert 'iifname "%s" drop' % NET in listing and 'oifname "%s" drop' % NET in listing
    assert _curl(env) == "200"  # the node's replies come back through the claim
    assert_never_arrives(env, "with-exposure")
    # control: the drop of what comes in from the VPN, deleted by hand -> the hostile path opens
    handle = next(line.rsplit("# handle ", 1)[1] for line in listing.splitlines()
                  if line.strip().startswith('iifname "%s" drop' % NET))
    env.topo.hub.run(["nft", "delete", "rule", "ip", "tinc_hub_" + NET, "forward", "handle", handle],
                     timeout=10)
    arrives(env, "control-no-drop")
    env.hub.cli("expose", "apply")
    assert_never_arrives(env, "reapplied")


def test_after_a_lost_table_tinc_up_restores_the_drops_before_nodes_connect(env):
    # what a reboot does: no table, the host file still claims, tincd starts again
    netlab.stop_tincd(env.topo.hub, NET)
    env.topo.hub.run(["nft", "delete", "table", "ip", "tinc_hub_" + NET], timeout=10)
    netlab.start_tincd(env.topo.hub, NET)
    listing = _table(env).stdout
    assert 'iifname "%s" drop' % NET in listing and "dnat" not in listing, listing
    env.node.wait_ping(env.hub.vpn_address(), timeout=60)
    assert_never_arrives(env, "after-restart")
    assert _curl(env) == "000"  # the exposure itself waits for 'expose apply' (the boot unit)
    env.hub.cli("expose", "apply")
    assert _curl(env) == "200"


def test_without_exposures_the_claim_goes_first_and_forwarding_stays_on(env):
    env.hub.cli("unexpose", "%s:%d" % (NODE, HTTP_PORT))
    assert CLAIM not in _hub_file(env)
    assert env.topo.hub.read_file("/proc/sys/net/ipv4/ip_forward").strip() == "1"  # as it was
    assert_never_arrives(env, "after-unexpose")
    # the tinc-up guard loads nothing without the claim
    netlab.stop_tincd(env.topo.hub, NET)
    env.topo.hub.run(["nft", "delete", "table", "ip", "tinc_hub_" + NET], check=False, timeout=10)
    netlab.start_tincd(env.topo.hub, NET)
    assert _table(env).returncode != 0
