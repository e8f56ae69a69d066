"""Booted machines (issue 11): a systemd node's sync loop survives a reboot, and a change of
the net made on the hub side after the reboot reaches the node with nothing run on it.

A hub container (systemd, the installed hub, as in test_boot.py) and one systemd node
container on the netlab NAT topology. The node joins with the printed one-liner; its tinc-up
starts `bootstrap.py sync --daemon`, which detaches the loop (`bootstrap.py sync --net NET
--log LOG`, holding /run/tinc-bootstrap-sync.NET.pid) and the hub logs each sync
(`sync result=ok ... name=NODE`). The node is rebooted (a second boot of the same tree): its
tinc@NET.service runs tinc-up again, which must start exactly one loop, which syncs at once.

The change after the reboot is a second hub recorded in the registry, the change the sync
exists for (a real one, answered by `POST /v1/sync` from the registry, not a file edited on
the node). A second hub needs PostgreSQL (a SQLite registry serves one hub; a single hub
cannot change its own address while nodes depend on it alone), so the hub goes the README's
way: a labkit.postgres cluster of the test machine, its socket directory bind-mounted into
the hub container (nspawn.Container binds=), the hub moved onto it with `tinc-hub registry
copy` and its service restarted; then hub `rivendell` is recorded from the test machine
(`tinc-hub init --no-start --registry ...` in a temp dir; it need not run). Its address
192.0.2.77 is on the topology's public segment, where nobody answers: the node's tincd may
try it, and the packets stay in the test's namespaces. While the test waits for the node's
next round (every 30 s x 0.8-1.0) it reads the node's files from the container's overlay
upper layer on the test machine: nothing at all runs in the node. The last test checks the
hub's own side of that change under its systemd sandbox (a known bug: strict xfail).

Group: marker `boot` (~70 s, a third of it the node's sync interval).
"""

import json
import os
import re
import shlex
import subprocess
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest

from labkit import netlab, nspawn, postgres
from tinc_hub.state import StateDir
from tinc_hub.tls import pin_of_cert_file

pytestmark = [pytest.mark.netlab, pytest.mark.boot]

NET = "middle-earth"
HUB_NAME = "erebor"
NODE = "hobbiton"
SECOND_HUB = "rivendell"
SECOND_HUB_ADDRESS = "192.0.2.77"  # the topology's public segment; nothing answers there
VPN_SUBNET = "10.0.0.0/24"
HUB_VPN = "10.0.0.1"
PG_SOCKET_INSIDE = "/run/postgresql"  # where the hub container sees the cluster's socket dir
PG_DATABASE, PG_USER = "registry", "hub"
SYNC_LOOP_PID_FILE = "/run/tinc-bootstrap-sync.%s.pid" % NET
NODE_SCRIPT = "/etc/tinc/%s/bootstrap.py" % NET
NODE_LOG = "/var/log/tinc-bootstrap.log"
LOOP_STARTED = "== sync loop for net %s started (pid " % NET
SYNC_DEADLINE = 90.0  # change recorded -> on the node (interval 30 s x 0.8-1.0, then a round)
AUDIT_OK = re.compile(r"tinc_hub\.audit INFO sync result=ok status=200 name=%s client=(\S+)$"
                      % NODE, re.M)


class Lab(NamedTuple):
    topo: "netlab.NatTopology"
    pg: postgres.ThrowawayPostgres
    hub: nspawn.Container
    node: nspawn.Container
    state: Dict[str, object]  # what earlier tests learnt

    def netlab_diagnostics(self) -> str:
        return "\n".join([self.hub.diagnostics(), self.node.diagnostics(),
                          self.topo.diagnostics()])


@pytest.fixture(scope="module")
def lab():
    reason = postgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    pg = postgres.ThrowawayPostgres().start()
    topo = None
    try:
        # The hub's service runs with PrivateUsers=yes: the cluster's owner is nobody there,
        # so the socket dir needs search permission for others (connecting needs no more).
        os.chmod(pg.socket_dir, 0o711)
        pg.create_database(PG_DATABASE, user=PG_USER)
        topo = netlab.build_nat_topology(node_names=[NODE], hub_name="hub")
        work = topo.workdir
        hub = nspawn.Container(topo.prefix + "-hub", nspawn.systemd_hub_spec(work), topo.hub,
                               work, hostname=HUB_NAME,
                               binds=[(str(pg.socket_dir), PG_SOCKET_INSIDE)])
        node = nspawn.Container(topo.prefix + "-sd", nspawn.systemd_node_spec(),
                                topo.nodes[0], work)
        with nspawn.booted([hub, node], hub=hub):
            netlab.record_timing("boot sync: PostgreSQL, trees and first boots ready",
                                 time.monotonic() - t0)
            yield Lab(topo, pg, hub, node, {})
    finally:
        if topo is not None:
            topo.close()
        pg.stop()


# ------------------------------------------------------------------------------- helpers

PROCESSES = r'''
import json, os
found = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except OSError:
            continue
        found.append([int(pid), [a.decode("utf-8", "replace") for a in argv]])
print(json.dumps(found))
'''


def sync_loops(node: nspawn.Container) -> List[Tuple[int, List[str]]]:
    """Every process in node running the installed bootstrap.py's `sync` (pid, argv)."""
    procs = json.loads(node.run(["python3", "-c", PROCESSES]).stdout)
    return [(pid, argv) for pid, argv in procs if argv[1:3] == [NODE_SCRIPT, "sync"]]


def the_sync_loop(node: nspawn.Container) -> int:
    """The pid of the one sync loop: the daemon tinc-up started (its launcher has exited),
    named in the pid file, whose lock it holds (`bootstrap.py status` says running)."""
    loops = sync_loops(node)
    assert len(loops) == 1, loops
    pid, argv = loops[0]
    assert argv[0].startswith("/") and argv[3:] == ["--net", NET, "--log", NODE_LOG], argv
    assert node.run(["cat", SYNC_LOOP_PID_FILE]).stdout == "%d\n" % pid
    status = json.loads(node.run(["python3", NODE_SCRIPT, "status", "--json"]).stdout)
    assert status["sync"] == "running", status
    return pid


def wait_for_one_sync_loop(node: nspawn.Container, timeout: float) -> int:
    netlab.wait_until(lambda: sync_loops(node), timeout, 0.2,
                      what="the sync loop started by tinc-up on %s" % node.hostname)
    return the_sync_loop(node)


def audited_syncs(hub: nspawn.Container) -> List[str]:
    """The client addresses of the hub's `sync result=ok` audit lines for NODE, in order."""
    journal = hub.run(["journalctl", "-u", "tinc-hub.service", "--no-pager", "-o", "cat"]).stdout
    return AUDIT_OK.findall(journal)


def wait_for_audited_sync(hub: nspawn.Container, after: int, timeout: float) -> List[str]:
    return netlab.wait_until(lambda: len(audited_syncs(hub)) > after and audited_syncs(hub),
                             timeout, 0.2, what="a `sync result=ok name=%s` line" % NODE)


def loop_starts(node: nspawn.Container) -> int:
    """How many times a sync loop started, by the node's log (kept across boots)."""
    return sum(1 for line in node.run(["cat", NODE_LOG]).stdout.splitlines()
               if LOOP_STARTED in line)


def upper_file(container: nspawn.Container, inside: str) -> Optional[str]:
    """A file the running container wrote, read on the test machine from its overlay upper
    layer (nothing runs in the container); None while it does not exist."""
    assert container.layers is not None
    try:
        return (container.layers / "upper" / inside.lstrip("/")).read_text()
    except FileNotFoundError:
        return None


def api_answers(hub: nspawn.Container) -> bool:
    return hub.run(["curl", "-fsk", "https://127.0.0.1:8655/healthz"],
                   check=False).returncode == 0


# --------------------------------------------------------------------------------- tests

def test_the_join_starts_the_sync_loop_and_the_hub_logs_its_sync(lab):
    hub, node = lab.hub, lab.node
    nspawn.install_hub(hub, timeout=180)
    hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB_NAME, "--address",
             netlab.HUB_PUBLIC, "--vpn-subnet", VPN_SUBNET], timeout=180)
    netlab.wait_until(lambda: api_answers(hub), 30, 0.2, what="tinc-hub.service answering")
    out = hub.run(["tinc-hub", "token", "create"]).stdout
    lines = out.splitlines()
    command = lines[lines.index("run on the node as root:") + 1]
    proc = node.run(["sh", "-c", command], check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lab.state["address"] = netlab.printed_address(proc.stdout)
    assert node.ping(HUB_VPN)
    lab.state["pid"] = wait_for_one_sync_loop(node, 15)
    assert loop_starts(node) == 1
    # the loop's first round is at once, through the hub's public API address (the node is
    # behind the NAT router: the hub sees the router's address)
    clients = wait_for_audited_sync(hub, 0, 15)
    assert clients == [netlab.ROUTER_PUBLIC], clients
    tinc_up = node.run(["cat", "/etc/tinc/%s/tinc-up" % NET]).stdout
    launchers = [shlex.split(line) for line in tinc_up.splitlines() if "sync" in line
                 and not line.startswith("#")]
    hold = "/run/tinc-bootstrap-sync.%s.hold" % NET  # rotate-key's restart keeps the loop
    assert [argv[:5] + argv[6:] for argv in launchers] == [
        ["[", "-e", hold, "]", "||", NODE_SCRIPT, "sync", "--net", NET, "--daemon", "||", ":"]], tinc_up


def test_the_hub_moves_onto_postgresql_with_the_node(lab):
    hub = lab.hub
    url = "postgresql://%s@:%d/%s?host=%s" % (PG_USER, lab.pg.port, PG_DATABASE,
                                              PG_SOCKET_INSIDE)
    hub.run(["systemctl", "stop", "tinc-hub.service"], timeout=60)  # as copy asks
    out = hub.run(["tinc-hub", "registry", "copy", "--to", url], timeout=120).stdout
    assert "1 node(s)" in out and "hub.json now names" in out, out
    hub.run(["systemctl", "start", "tinc-hub.service"], timeout=60)
    netlab.wait_until(lambda: api_answers(hub), 30, 0.2,
                      what="tinc-hub.service answering on PostgreSQL")
    hubs = json.loads(hub.run(["tinc-hub", "hubs", "--json"]).stdout)
    assert [h["name"] for h in hubs] == [HUB_NAME], hubs
    with lab.pg.admin(PG_DATABASE) as conn:  # the registry the service reads is this one
        names = [row[0] for row in conn.execute("SELECT name FROM nodes ORDER BY name")]
    assert names == [HUB_NAME, NODE], names


def test_after_a_reboot_the_sync_loop_runs_again_exactly_once(lab):
    hub, node = lab.hub, lab.node
    syncs_before = len(audited_syncs(hub))
    node.poweroff()
    assert not hub.ping(lab.state["address"])
    node.start()
    seconds = node.wait_ping(HUB_VPN, 30)
    assert seconds is not None, "%s: VPN not back 30 s after boot start" % NODE
    pid = wait_for_one_sync_loop(node, 15)
    netlab.record_timing("boot sync: node reboot: boot start -> sync loop running",
                         time.monotonic() - node.boot_started)
    # its round at once after boot, answered from the registry on PostgreSQL
    wait_for_audited_sync(hub, syncs_before, 15)
    netlab.record_timing("boot sync: node reboot: boot start -> the hub logged its sync",
                         time.monotonic() - node.boot_started)
    node.wait_ready(30)  # every unit has started: a second tinc-up would have run by now
    assert the_sync_loop(node) == pid
    assert loop_starts(node) == 2  # one per boot
    assert node.unit_state("is-active", "tinc@%s.service" % NET) == "active"
    lab.state["pid"] = pid


def test_a_hub_recorded_after_the_reboot_reaches_the_node_by_itself(lab, tmp_path):
    hub, node = lab.hub, lab.node
    conf_path = "/etc/tinc/%s/tinc.conf" % NET
    host_path = "/etc/tinc/%s/hosts/%s" % (NET, SECOND_HUB)
    assert "ConnectTo = %s" % SECOND_HUB not in (upper_file(node, conf_path) or "")
    assert upper_file(node, host_path) is None
    # rivendell joins the net through the registry, from the test machine (it need not run)
    t = time.monotonic()
    subprocess.run([str(netlab.VENV / "bin" / "tinc-hub"), "--state-dir",
                    str(tmp_path / "state"), "init", "--no-start", "--init", "none",
                    "--registry", lab.pg.socket_url(PG_DATABASE, PG_USER),
                    "--name", SECOND_HUB, "--address", SECOND_HUB_ADDRESS,
                    "--tinc-dir", str(tmp_path / "tinc"), "--key-size", "2048"],
                   check=True, capture_output=True, text=True, timeout=120,
                   stdin=subprocess.DEVNULL)
    recorded = time.monotonic()
    netlab.record_timing("boot sync: tinc-hub init of a second hub (RSA 2048, registry)",
                         recorded - t)

    def arrived() -> bool:
        conf = upper_file(node, conf_path) or ""
        return ("ConnectTo = %s\n" % SECOND_HUB in conf
                and "Address = %s" % SECOND_HUB_ADDRESS in (upper_file(node, host_path) or ""))

    netlab.wait_until(arrived, SYNC_DEADLINE, 0.2,
                      what="hosts/%s and ConnectTo on the node" % SECOND_HUB)
    seconds = time.monotonic() - recorded
    netlab.record_timing("boot sync: second hub recorded -> in the node's tinc files "
                         "(interval 30 s x 0.8-1.0)", seconds)
    # the same loop did it, via the hub, and said so; the key is rivendell's own
    assert the_sync_loop(node) == lab.state["pid"]
    own_host_file = (tmp_path / "tinc" / NET / "hosts" / SECOND_HUB).read_text()
    key = own_host_file[own_host_file.index("-----BEGIN"):]
    assert upper_file(node, host_path).endswith(key)
    conf = upper_file(node, conf_path)
    assert conf.splitlines().count("ConnectTo = %s" % HUB_NAME) == 1, conf
    known = json.loads(upper_file(node, "/etc/tinc/%s/hubs.json" % NET))["hubs"]
    assert [(h["name"], h["host"]) for h in known] == [
        (HUB_NAME, netlab.HUB_PUBLIC), (SECOND_HUB, SECOND_HUB_ADDRESS)], known
    assert known[1]["pin"] == pin_of_cert_file(StateDir(str(tmp_path / "state")).cert_file)
    log = node.run(["cat", NODE_LOG]).stdout
    assert re.search(r"== sync: via %s: changed .*hosts/%s" % (HUB_NAME, SECOND_HUB), log), \
        log[-3000:]
    # tincd took the new tinc.conf (SIGHUP) and the VPN through erebor carries on
    assert node.ping(HUB_VPN) and hub.ping(lab.state["address"])



def test_the_hub_service_follows_the_registry_inside_its_sandbox(lab):
    """The hub's side of the same change, under systemd: erebor's conf.d/hubs.conf (the one
    place of the net dir besides hosts/ that the sandboxed API may write) names the hub
    recorded in the previous test (20 s and more ago; the contract is 5 s) and its follower
    logs no error. (Found by this test: the follower first wrote tinc.conf, read-only there.)"""
    hub = lab.hub
    conf = hub.run(["cat", "/etc/tinc/%s/conf.d/hubs.conf" % NET]).stdout
    journal = hub.run(["journalctl", "-u", "tinc-hub.service", "--no-pager", "-o", "cat"]).stdout
    errors = [line for line in journal.splitlines() if "tinc_hub.follow ERROR" in line]
    assert "ConnectTo = %s\n" % SECOND_HUB in conf and not errors, (conf, errors[-3:])
