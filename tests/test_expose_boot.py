"""tinc-hub expose on a booted hub (issue 12): a published service works again after the hub
reboots, with no command run, and after nftables.service flushes the ruleset.

The hub is a booted systemd container (labkit.nspawn, the tree with nftables:
systemd_nft_hub_spec) in the hub namespace of the netlab NAT topology; `tinc-hub init` under
systemd installs tinc-hub.service and the exposure units. The node is a namespace node behind
the NAT router (bootstrap.py --init none) running an HTTP server bound to its VPN address; the
client is a namespace on the public side with a link of its own to the hub (as in
test_expose.py). The client reaches the node through `tinc-hub expose web:8000 --listen 8080`
and the node's server logs the client's own address.

A reboot is a poweroff and a second boot of the same tree. The network namespace outlives the
container, so the kernel state a real reboot loses is reset by the test while the hub is off:
the nftables ruleset flushed and net.ipv4.ip_forward 0. nftables.service is enabled on the hub
(an admin's firewall; its /etc/nftables.conf begins with `flush ruleset`), so the boot and the
later restart and reload of it flush the ruleset as on a real machine.

Group: marker `boot` (one hub boot, one reboot; ~40 s on the cached tree).
"""

import json
import re
import subprocess
import time
from typing import NamedTuple

import pytest

from labkit import netlab, nspawn

pytestmark = [pytest.mark.netlab, pytest.mark.boot]

NET = "exponet"
HUB = "gate"
NODE = "web"
VPN_SUBNET = "10.0.0.0/24"
HUB_VPN = "10.0.0.1"
CLIENT_NET_HUB, CLIENT = "203.0.113.1", "203.0.113.10"  # the client's link to the hub
HTTP_PORT, HTTP_LISTEN = 8000, 8080
TABLE = "tinc_hub_" + NET
NFT_UNIT = "tinc-hub-expose-nftables.service"
REBOOT_DEADLINE = 90.0  # hub boot start -> the client reaches the node (the node's tincd
# reconnects with its own back-off: 5 s, 10 s, ...)
REAPPLY_DEADLINE = 15.0  # nftables.service restarted/reloaded -> our table back


class Lab(NamedTuple):
    topo: "netlab.NatTopology"
    hub: nspawn.Container
    node: "netlab.Host"
    client: "netlab.Host"
    state: dict  # what earlier tests learnt

    def netlab_diagnostics(self) -> str:
        return "\n".join([self.hub.diagnostics(), self.topo.diagnostics()])


@pytest.fixture(scope="module")
def lab():
    t0 = time.monotonic()
    topo = netlab.build_nat_topology(node_names=[NODE], hub_name="hub")
    try:
        # the client's own link to the hub: a host on the internet with its own address
        client = topo.add_public_client("client", CLIENT_NET_HUB, CLIENT)
        work = topo.workdir
        hub = nspawn.Container(topo.prefix + "-hub", nspawn.systemd_nft_hub_spec(work),
                               topo.hub, work, hostname=HUB)
        # net.ipv4.ip_forward writable in the hub, as on a real machine
        with nspawn.booted([hub], hub=hub,
                           created=lambda: nspawn.make_net_sysctls_writable(hub)) as ready:
            netlab.record_timing("expose boot: tree and first boot ready (hub ready %.1f s)"
                                 % ready[HUB], time.monotonic() - t0)
            yield Lab(topo, hub, topo.nodes[0], client, {})
    finally:
        topo.close()


# ------------------------------------------------------------------------------- helpers

def curl_code(lab: Lab) -> str:
    """The HTTP status the client gets from the hub's public port ("000": no answer)."""
    return lab.client.run(["curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w",
                           "%{http_code}", "http://%s:%d/" % (CLIENT_NET_HUB, HTTP_LISTEN)],
                          check=False, timeout=10).stdout.strip()


def our_table(lab: Lab) -> subprocess.CompletedProcess:
    """`nft -a list table ip tinc_hub_exponet` in the hub (-a: with the table's handle)."""
    return lab.hub.run(["nft", "-a", "list", "table", "ip", TABLE], check=False, timeout=10)


def table_handle(lab: Lab) -> int:
    """The kernel's handle of our table: a new one each time the table is made again."""
    listing = our_table(lab)
    assert listing.returncode == 0, listing.stderr
    return int(re.search(r"^table ip %s \{ # handle (\d+)$" % TABLE, listing.stdout,
                         re.M).group(1))


def ip_forward(lab: Lab) -> str:
    return lab.hub.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()


def client_lines(lab: Lab, after: int) -> list:
    """The node server's log lines for requests from the client's own address, after line
    ``after``."""
    return [line for line in lab.state["http"].output().splitlines()[after:]
            if line.startswith(CLIENT + " - - [")]


def wait_for_client(lab: Lab, timeout: float, what: str) -> None:
    netlab.wait_until(lambda: curl_code(lab) == "200", timeout, 0.5, what=what)


def unit_ran_ok(lab: Lab, unit: str) -> None:
    result = lab.hub.run(["systemctl", "show", "-p", "Result", "--value", unit]).stdout.strip()
    assert result == "success", (unit, result)


# --------------------------------------------------------------------------------- tests

def test_the_client_reaches_the_node_through_the_booted_hub(lab):
    hub, node = lab.hub, lab.node
    t = time.monotonic()
    nspawn.install_hub(hub, timeout=180)
    hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB, "--address", netlab.HUB_PUBLIC,
             "--vpn-subnet", VPN_SUBNET, "--key-size", "2048"], timeout=180)
    netlab.record_timing("expose boot: install + tinc-hub init under systemd",
                         time.monotonic() - t)
    for unit in ("tinc-hub-expose.service", "tinc-hub-expose.path", NFT_UNIT):
        assert hub.unit_state("is-enabled", unit) == "enabled", unit
    assert hub.unit_state("is-active", NFT_UNIT) == "active"  # it gets nftables' propagation
    # the admin's firewall: loaded at every boot, its file flushes the whole ruleset
    hub.run(["systemctl", "enable", "--now", "nftables.service"])
    netlab.wait_until(lambda: hub.run(["curl", "-fsk", "https://127.0.0.1:8655/healthz"],
                                      check=False).returncode == 0, 30, 0.2,
                      what="tinc-hub.service answering")
    token = json.loads(hub.run(["tinc-hub", "token", "create", "--json"]).stdout)["token"]
    proc = netlab.start_bootstrap(node, token, name=NODE, key_size=2048, init="none",
                                  timeout=60)
    assert proc.wait(timeout=150) == 0, proc.output()
    address = netlab.printed_address(proc.output())
    assert address and node.wait_ping(HUB_VPN, timeout=30)
    lab.state["http"] = node.popen(["python3", "-m", "http.server", str(HTTP_PORT), "--bind",
                                    address], log="web.http.log")
    node.wait_listening(HTTP_PORT, timeout=10)
    assert curl_code(lab) == "000"
    out = hub.run(["tinc-hub", "expose", "%s:%d" % (NODE, HTTP_PORT), "--listen",
                   str(HTTP_LISTEN)]).stdout
    assert "exposure 1: tcp *:%d -> %s %s:%d" % (HTTP_LISTEN, NODE, address, HTTP_PORT) in out
    assert curl_code(lab) == "200"
    assert client_lines(lab, 0), lab.state["http"].output()  # the client's own address
    assert ip_forward(lab) == "1"


def test_after_a_hub_reboot_the_exposure_works_with_no_command(lab):
    hub = lab.hub
    hub.poweroff()
    # what a real reboot loses with the kernel: the namespace outlives the container
    lab.topo.hub.run(["nft", "flush", "ruleset"], timeout=10)
    lab.topo.hub.sysctl("net.ipv4.ip_forward", 0)
    assert lab.topo.hub.run(["nft", "list", "table", "ip", TABLE], check=False,
                            timeout=10).returncode != 0
    assert curl_code(lab) == "000"
    seen = len(lab.state["http"].output().splitlines())
    hub.start()
    # only the client acts from here: nothing is run in the hub until it is reached
    wait_for_client(lab, REBOOT_DEADLINE, "the client reaching the node after the hub's reboot")
    netlab.record_timing("expose boot: hub reboot: boot start -> the client reaches the node",
                         time.monotonic() - hub.boot_started)
    assert client_lines(lab, seen)
    hub.wait_ready(60)
    listing = our_table(lab).stdout
    assert "dnat to " in listing and "tcp dport %d" % HTTP_LISTEN in listing, listing
    assert ip_forward(lab) == "1"
    assert hub.unit_state("is-active", "nftables.service") == "active"
    for unit in ("tinc-hub-expose.service", NFT_UNIT):
        unit_ran_ok(lab, unit)


@pytest.mark.parametrize("verb", ["restart", "reload"])
def test_nftables_service_flushing_the_ruleset_brings_our_table_back(lab, verb):
    hub = lab.hub
    before = table_handle(lab)
    t = time.monotonic()
    hub.run(["systemctl", verb, "nftables.service"], timeout=60)
    # a new handle: nftables' file flushed our table and the unit made it again; the unit's
    # job done (a reload that comes while its start job runs is merged into that job)
    netlab.wait_until(lambda: our_table(lab).returncode == 0 and table_handle(lab) != before
                      and hub.unit_state("is-active", NFT_UNIT) == "active",
                      REAPPLY_DEADLINE, 0.1, what="table %s made again after %s" % (TABLE, verb))
    netlab.record_timing("expose boot: systemctl %s nftables -> our table back" % verb,
                         time.monotonic() - t)
    assert "dnat to " in our_table(lab).stdout
    assert "table inet filter" in hub.run(["nft", "list", "tables"]).stdout  # theirs is there
    unit_ran_ok(lab, NFT_UNIT)
    seen = len(lab.state["http"].output().splitlines())
    assert curl_code(lab) == "200" and client_lines(lab, seen)


def test_unexpose_closes_the_port(lab):
    hub = lab.hub
    out = hub.run(["tinc-hub", "unexpose", "%s:%d" % (NODE, HTTP_PORT)]).stdout
    assert "removed" in out, out
    assert curl_code(lab) == "000"
    assert our_table(lab).returncode != 0
    assert ip_forward(lab) == "0"  # as it was before the first exposure
    # and a restart of nftables brings nothing back
    hub.run(["systemctl", "restart", "nftables.service"], timeout=60)
    unit_ran_ok(lab, NFT_UNIT)
    assert our_table(lab).returncode != 0 and curl_code(lab) == "000"
