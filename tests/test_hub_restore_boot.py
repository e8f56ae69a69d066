"""A hub rebuilt from its backup (issue 13, "Rebuilding a hub"), on booted machines.

A systemd hub container (`tinc-hub init`: tinc@NET, tinc-hub.service) and two systemd node
containers that joined with the printed one-liner; a token is made, then `tinc-hub backup`
runs while the API is up (the token is then only in the registry's WAL: the online copy
must hold it). The hub's container is destroyed; a new one, from the fresh cached tree, in the
same network namespace (the same public address), gets the backup file and runs
`tinc-hub restore`. Without anything run on the nodes (their tincd processes are the same),
both are back on the VPN, hub and each other, and a third machine joins with the token made
before the backup. The time from the restore command's start to every node back is recorded
(the nodes' tincd retries every 5..14 s: `MinTimeout = MaxTimeout`, per node).

Group `boot` (booted containers, labkit.nspawn; one hub lifecycle with an 80 s outage: ~2 min on cached trees).
"""

import time

import pytest

from labkit import netlab, nspawn

pytestmark = [pytest.mark.netlab, pytest.mark.boot]

NET = "rebuilt"
HUB = "phoenix"
NODES = ("ash", "birch")
NEWCOMER = "cedar"
HUB_VPN = "10.0.0.1"
BACKUP_INSIDE = "/root/hub-backup.tgz"
# The outage the nodes live through: a node's tincd retries every R s (MinTimeout = MaxTimeout
# = R, 5..14 by its name; a node of an older hub without `hubs` keeps tinc's 5, 10, 15 ... s
# backoff up to 900 s). Kept this short for the suite's time budget.
OUTAGE = 45.0
BACK_DEADLINE = 75.0  # s from restore's start: the restore, then one retry interval (<= 14 s)


def one_liner(hub: nspawn.Container, *options: str) -> str:
    out = hub.run(["tinc-hub", "token", "create", *options]).stdout.splitlines()
    return out[out.index("run on the node as root:") + 1] + " --key-size 2048"


def join(node: nspawn.Container, command: str) -> str:
    done = node.run(["sh", "-c", command], check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    address = netlab.printed_address(done.stdout)
    assert address, done.stdout
    return address


def tincd_pid(node: nspawn.Container) -> str:
    return node.run(["pidof", "tincd"], check=False).stdout.strip()


def healthy(hub: nspawn.Container) -> bool:
    return hub.run(["curl", "-fsk", "https://127.0.0.1:8655/healthz"], check=False).returncode == 0


@pytest.fixture(scope="module")
def lab():
    topo = netlab.build_nat_topology(node_names=list(NODES) + [NEWCOMER], hub_name="hub")
    try:
        work = topo.workdir
        spec = nspawn.systemd_hub_spec(work)
        hub = nspawn.Container(topo.prefix + "-hub", spec, topo.hub, work, hostname=HUB)
        nodes = [nspawn.Container(topo.prefix + "-" + name, nspawn.systemd_node_spec(),
                                  host, work, hostname=name)
                 for name, host in zip(NODES + (NEWCOMER,), topo.nodes)]
        with nspawn.booted([hub] + nodes, hub=hub):
            yield {"topo": topo, "spec": spec, "hub": hub, "nodes": nodes[:2],
                   "newcomer": nodes[2]}
    finally:
        topo.close()


def test_a_restored_hub_brings_every_node_back_and_keeps_its_tokens(lab):
    hub, nodes, topo = lab["hub"], lab["nodes"], lab["topo"]
    nspawn.install_hub(hub, timeout=180)
    hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB, "--address", netlab.HUB_PUBLIC,
             "--vpn-subnet", "10.0.0.0/24", "--key-size", "2048"], timeout=180)
    netlab.wait_until(lambda: healthy(hub), 30, 0.2, what="tinc-hub.service answering")
    command = one_liner(hub, "--uses", "2")
    addresses = [join(node, command) for node in nodes]
    assert nodes[0].ping(addresses[1]) and nodes[1].ping(HUB_VPN)
    later = one_liner(hub)  # made just before the backup: in the WAL, not yet checkpointed
    tokens_before = hub.run(["tinc-hub", "token", "list"]).stdout
    done = hub.run(["tinc-hub", "backup", BACKUP_INSIDE], timeout=60)
    assert "SECRETS" in done.stderr, done.stderr
    assert hub.run(["stat", "-c", "%a", BACKUP_INSIDE]).stdout.strip() == "600"
    backup = hub.path(BACKUP_INSIDE).read_bytes()  # the container's upper layer
    pids = [tincd_pid(node) for node in nodes]
    assert all(pids), pids

    hub.destroy()  # the disk is gone
    lost = time.monotonic()
    assert netlab.wait_until(lambda: not nodes[0].ping(HUB_VPN), 10), "the hub still answers"

    new = nspawn.Container(topo.prefix + "-hub2", lab["spec"], topo.hub, topo.workdir,
                           hostname=HUB)
    try:
        new.create()
        nspawn.stage_hub_project(new)
        target = new.path(BACKUP_INSIDE)
        target.write_bytes(backup)
        target.chmod(0o600)
        new.boot(90)
        nspawn.install_hub(new, timeout=180)  # the package; the hub itself comes from the file
        assert new.run(["test", "-e", "/var/lib/tinc-hub"], check=False).returncode != 0
        assert not nodes[0].ping(HUB_VPN)
        time.sleep(max(0.0, lost + OUTAGE - time.monotonic()))  # the outage is the scenario
        started = time.monotonic()
        restored = new.run(["tinc-hub", "restore", BACKUP_INSIDE], check=False, timeout=180)
        assert restored.returncode == 0, restored.stdout + restored.stderr + new.diagnostics()
        restore_seconds = time.monotonic() - started

        def all_back() -> bool:
            return (nodes[0].ping(HUB_VPN) and nodes[1].ping(HUB_VPN)
                    and nodes[0].ping(addresses[1]) and nodes[1].ping(addresses[0]))

        assert netlab.wait_until(all_back, BACK_DEADLINE, 0.2), new.diagnostics() + "\n".join(
            node.diagnostics() for node in nodes)
        back = time.monotonic() - started
        netlab.record_timing("restore (booted): tinc-hub restore itself", restore_seconds)
        netlab.record_timing("restore (booted): restore start -> every node back on the VPN "
                             "(hub down %.0f s before)" % (started - lost), back)
        assert [tincd_pid(node) for node in nodes] == pids  # nothing ran on the nodes
        for unit in ("tinc-hub.service", f"tinc@{NET}.service"):
            assert new.unit_state("is-active", unit) == "active", unit
            assert new.unit_state("is-enabled", unit) == "enabled", unit
        assert netlab.wait_until(lambda: healthy(new), 30, 0.2)
        assert new.run(["tinc-hub", "token", "list"]).stdout == tokens_before  # same tokens, same uses

        # the token made before the backup enrols a machine that never saw the old hub
        address = join(lab["newcomer"], later)
        assert lab["newcomer"].ping(HUB_VPN) and lab["newcomer"].ping(addresses[0])
        listed = new.run(["tinc-hub", "nodes"]).stdout
        assert all(name in listed for name in NODES + (NEWCOMER,)), listed
        assert address not in addresses
    finally:
        new.destroy()
