"""NAME.NET on booted machines (issue 12): the installed hub under systemd, whose sandboxed API
cannot write /etc/hosts, and a systemd node that joins with the printed one-liner.

The hub's names reach its /etc/hosts through its root side (tinc-hub-names.path starts
tinc-hub-names.service when the API rewrites names.json); the node writes its own block.
Group `boot` (booted containers, labkit.nspawn)."""

import re
import time

import pytest

from labkit import netlab, nspawn

pytestmark = [pytest.mark.netlab, pytest.mark.boot]

NET = "middle-earth"
HUB, NODE, RESOLVED_NODE, SYSV_NODE = "erebor", "hobbiton", "rivendell", "bree"
SYNC_WAIT = 45  # s: the hub's sync interval (30 s, times 0.8-1.0) and a margin
HUB_VPN = "10.0.0.1"
EXPOSURE_LIMIT = 2.0  # as tinc-hub.service's (tests/test_boot.py)


@pytest.fixture(scope="module")
def machines():
    topo = netlab.build_nat_topology(node_names=[NODE, RESOLVED_NODE, SYSV_NODE], hub_name="hub")
    try:
        work = topo.workdir
        hub = nspawn.Container(topo.prefix + "-hub", nspawn.systemd_hub_spec(work), topo.hub,
                               work, hostname=HUB)
        node = nspawn.Container(topo.prefix + "-sd", nspawn.systemd_node_spec(), topo.nodes[0],
                                work)
        resolved = nspawn.Container(topo.prefix + "-rs", resolved_node_spec(), topo.nodes[1], work,
                                    hostname=RESOLVED_NODE)
        sysv = nspawn.Container(topo.prefix + "-sv", nspawn.sysv_node_spec(), topo.nodes[2], work,
                                hostname=SYSV_NODE)
        with nspawn.booted([hub, node, resolved, sysv], hub=hub):
            nspawn.install_hub(hub, timeout=180)
            hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB, "--address",
                     netlab.HUB_PUBLIC, "--vpn-subnet", "10.0.0.0/24", "--key-size", "2048"],
                    timeout=180)
            netlab.wait_until(lambda: hub.run(["curl", "-fsk", "https://127.0.0.1:8655/healthz"],
                                              check=False).returncode == 0, 30, 0.2,
                              what="tinc-hub.service answering /healthz")
            yield {"hub": hub, "node": node, "resolved": resolved, "sysv": sysv}
    finally:
        topo.close()


def resolved_node_spec() -> nspawn.RootfsSpec:
    """A systemd node whose names go through systemd-resolved (Debian's package: its stub
    resolver in resolv.conf, nss-resolve in nsswitch.conf)."""
    return nspawn.RootfsSpec("systemd-resolved-node", "systemd", nspawn.SYSTEMD_PACKAGES
                             + nspawn.NODE_PACKAGES + ("systemd-resolved", "libnss-resolve"))


def one_liner(hub):
    out = hub.run(["tinc-hub", "token", "create"]).stdout.splitlines()
    return out[out.index("run on the node as root:") + 1] + " --key-size 2048"


def resolve(machine, fqdn):
    done = machine.run(["getent", "hosts", fqdn], check=False)
    return done.stdout.split()[0] if done.returncode == 0 else None


def test_the_sandboxed_hub_and_a_systemd_node_resolve_each_other_by_name(machines):
    hub, node = machines["hub"], machines["node"]
    assert hub.unit_state("is-enabled", "tinc-hub-names.path") == "enabled"
    assert hub.unit_state("is-active", "tinc-hub-names.path") == "active"
    # the API itself may not write /etc (its sandbox), and says who does
    journal = hub.run(["journalctl", "-u", "tinc-hub.service", "--no-pager", "-o", "cat"]).stdout
    assert "tinc-hub-names.service writes the hub's names" in journal, journal
    assert netlab.wait_until(lambda: resolve(hub, "erebor.middle-earth") == HUB_VPN, 20), \
        hub.run(["journalctl", "-u", "tinc-hub-names.service", "--no-pager"], check=False).stdout

    done = node.run(["sh", "-c", one_liner(hub)], check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    joined = time.monotonic()
    address = netlab.printed_address(done.stdout)
    assert netlab.wait_until(lambda: resolve(hub, "hobbiton.middle-earth") == address, 20), \
        hub.run(["journalctl", "-u", "tinc-hub-names.service", "--no-pager"], check=False).stdout
    netlab.record_timing("names (booted): a joined node's name on the sandboxed hub (after "
                         "the join returned)", time.monotonic() - joined)
    assert resolve(node, "erebor.middle-earth") == HUB_VPN
    assert resolve(node, "hobbiton.middle-earth") == address
    assert node.run(["ping", "-n", "-c1", "-W5", "erebor.middle-earth"], check=False).returncode == 0
    assert hub.run(["ping", "-n", "-c1", "-W5", "hobbiton.middle-earth"], check=False).returncode == 0
    machines["address"] = address


def test_a_node_with_systemd_resolved_resolves_names_both_ways(machines):
    """nss (`files` first) and resolved's own answer (`resolvectl query`: its stub reads
    /etc/hosts) both give the block's addresses."""
    hub, node = machines["hub"], machines["resolved"]
    assert node.unit_state("is-active", "systemd-resolved.service") == "active"
    nsswitch = node.run(["grep", "^hosts:", "/etc/nsswitch.conf"]).stdout
    assert "resolve" in nsswitch, nsswitch
    done = node.run(["sh", "-c", one_liner(hub)], check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert resolve(node, "hobbiton.middle-earth") == machines["address"]
    assert resolve(node, "erebor.middle-earth") == HUB_VPN
    query = node.run(["resolvectl", "query", "--legend=no", "erebor.middle-earth"], check=False)
    assert query.returncode == 0 and HUB_VPN in query.stdout, query.stdout + query.stderr
    assert node.run(["ping", "-n", "-c1", "-W5", "hobbiton.middle-earth"], check=False).returncode == 0


def test_a_sysv_node_resolves_names(machines):
    hub, node = machines["hub"], machines["sysv"]
    done = node.run(["sh", "-c", one_liner(hub) + " --init rc.local"], check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert resolve(node, "hobbiton.middle-earth") == machines["address"]
    assert resolve(node, "erebor.middle-earth") == HUB_VPN
    assert node.run(["ping", "-n", "-c1", "-W5", "hobbiton.middle-earth"], check=False).returncode == 0


def test_a_revoked_nodes_name_leaves_the_sandboxed_hub_and_the_nodes(machines):
    hub = machines["hub"]
    hub.run(["tinc-hub", "revoke", NODE])
    revoked = time.monotonic()
    assert netlab.wait_until(lambda: resolve(hub, "hobbiton.middle-earth") is None, 20)
    netlab.record_timing("names (booted): a revoked node's name gone from the sandboxed hub",
                         time.monotonic() - revoked)
    assert resolve(hub, "erebor.middle-earth") == HUB_VPN
    for which in ("sysv", "resolved"):  # the sync loop under SysV init and under systemd
        assert netlab.wait_until(lambda: resolve(machines[which], "hobbiton.middle-earth") is None,
                                 SYNC_WAIT), machines[which].run(
            ["cat", "/var/log/tinc-bootstrap.log"], check=False).stdout
    netlab.record_timing("names (booted): a revoked node's name gone from the nodes",
                         time.monotonic() - revoked)
    assert resolve(machines["sysv"], "rivendell.middle-earth") is not None


def test_the_names_helper_is_sandboxed(machines, capsys):
    hub = machines["hub"]
    out = hub.run(["systemd-analyze", "security", "--no-pager", "tinc-hub-names.service"],
                  check=False).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    with capsys.disabled():
        print("\nsystemd-analyze security tinc-hub-names.service: %s" % match.group(1))
    assert float(match.group(1)) < EXPOSURE_LIMIT, out
    # an init run again changes nothing (units in place, the helper finds nothing to write)
    again = hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB, "--address",
                     netlab.HUB_PUBLIC, "--vpn-subnet", "10.0.0.0/24"], timeout=180).stdout
    assert "changed: nothing" in again, again
