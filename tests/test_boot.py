"""Booted machines: Debian bookworm containers (systemd-nspawn -b) on the netlab NAT topology.

The hub container runs the installed hub (`pip install ./hub` into a venv, as in the README);
`tinc-hub init` registers tinc and `tinc-hub.service` for boot. A systemd node joins with the
literal one-liner `tinc-hub token create` printed (default `--init auto`); a SysV node
(sysvinit-core, the CentOS 6 path) joins with the same line plus `--init rc.local`. Then
each machine is rebooted (a second boot of the same tree) and must come back on the VPN
with nothing re-run. Tests run in file order and share the machines of this module.

Group: marker `boot` (slow: ~2-3 min). `tests/run -m boot` runs only these,
`tests/run -m 'not boot'` everything else.
"""

import json
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

import netlab
import nspawn

pytestmark = [pytest.mark.netlab, pytest.mark.boot]

NET = "middle-earth"
HUB_NAME = "erebor"
SYSTEMD_NODE = "hobbiton"  # container hostnames = tinc node names
SYSV_NODE = "bree"
VPN_SUBNET = "10.0.0.0/24"
HUB_VPN = "10.0.0.1"
UNIT = "tinc@%s.service" % NET
REBOOT_DEADLINE = 30.0  # node boot start -> VPN answers
HUB_REBOOT_DEADLINE = 60.0  # hub boot start -> every node reaches it again


class Machines(NamedTuple):
    topo: "netlab.NatTopology"
    hub: nspawn.Container
    systemd_node: nspawn.Container
    sysv_node: nspawn.Container
    state: Dict[str, object]  # what earlier tests learnt (one-liner, addresses, pins)

    def netlab_diagnostics(self) -> str:
        parts = [c.diagnostics() for c in (self.hub, self.systemd_node, self.sysv_node)]
        return "\n".join(parts + [self.topo.diagnostics()])


def _copy_hub_source(container: nspawn.Container) -> None:
    """The hub's source as a plain tree (the bootstrap.py symlink resolved), like a clone."""
    shutil.copytree(netlab.REPO_ROOT / "hub", container.path("/root/tinc-hub-src"),
                    symlinks=False,
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))


@pytest.fixture(scope="module")
def machines():
    t0 = time.monotonic()
    topo = netlab.build_nat_topology(node_names=[SYSTEMD_NODE, SYSV_NODE], hub_name="hub")
    made: List[nspawn.Container] = []
    try:
        work = topo.workdir
        hub = nspawn.Container(topo.prefix + "-hub", nspawn.systemd_hub_spec(work), topo.hub,
                               work, hostname=HUB_NAME)
        sd_node = nspawn.Container(topo.prefix + "-sd", nspawn.systemd_node_spec(),
                                   topo.nodes[0], work)
        sv_node = nspawn.Container(topo.prefix + "-sv", nspawn.sysv_node_spec(),
                                   topo.nodes[1], work)
        for container in (hub, sd_node, sv_node):
            made.append(container)
            container.create()
        _copy_hub_source(hub)
        netlab.record_timing("boot: root trees ready (cached mmdebstrap trees + overlays)",
                             time.monotonic() - t0)
        for container in made:
            container.start()
        for container in made:
            seconds = container.wait_ready(90)
            netlab.record_timing("boot: %s first boot until ready (%s)"
                                 % (container.hostname, container.spec.init), seconds)
        yield Machines(topo, hub, sd_node, sv_node, {})
    finally:
        errors = []
        for container in reversed(made):
            try:
                container.destroy()
            except Exception as exc:
                errors.append("%s: %s" % (container.name, exc))
        topo.close()
        if errors:
            raise RuntimeError("container cleanup: " + "; ".join(errors))


def _one_liner(hub: nspawn.Container) -> str:
    """Make a token; return the node command exactly as `tinc-hub token create` printed it."""
    out = hub.run(["tinc-hub", "token", "create"]).stdout
    lines = out.splitlines()
    assert "run on the node as root:" in lines, out
    command = lines[lines.index("run on the node as root:") + 1]
    assert command.startswith("curl ") and "--pinnedpubkey" in command, command
    assert re.search(r"\| TINC_BOOTSTRAP_TOKEN='tinc1\.[^']+' python3 -$", command), command
    return command


def _join(node: nspawn.Container, command: str) -> str:
    """Run the one-liner in node; return the VPN address it printed."""
    proc = node.run(["sh", "-c", command], check=False, timeout=300)
    assert proc.returncode == 0, "join on %s failed (%s):\n%s\n%s" % (
        node.hostname, proc.returncode, proc.stdout, proc.stderr)
    address = netlab.printed_address(proc.stdout)
    assert address, proc.stdout
    return address


def _address_on(node: nspawn.Container, ifname: str) -> List[str]:
    proc = node.run(["ip", "-j", "-4", "addr", "show", "dev", ifname], check=False)
    if proc.returncode != 0:
        return []
    return [a["local"] for link in json.loads(proc.stdout) for a in link.get("addr_info", [])]


def _tincd_pids(node: nspawn.Container) -> List[int]:
    return [int(p) for p in node.run(["pgrep", "-x", "tincd"], check=False).stdout.split()]


def _unit_main_pid(node: nspawn.Container, unit: str) -> int:
    return int(node.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout)


def _comm(node: nspawn.Container, pid: int) -> str:
    return node.run(["cat", "/proc/%d/comm" % pid], check=False).stdout.strip()


def _snapshot(node: nspawn.Container, *roots: str) -> dict:
    """Content hash, mode and mtime of every file under roots (netlab's snapshot, in node)."""
    return {root: netlab.Host.snapshot(node, root) for root in roots}


# ----------------------------------------------------------------------------------- the hub

def test_hub_init_registers_tinc_and_its_own_service(machines):
    hub = machines.hub
    hub.run(["/opt/tinc-hub/bin/pip", "install", "-q", "--no-index", "--no-deps",
             "--no-build-isolation", "/root/tinc-hub-src"], timeout=180)
    hub.run(["ln", "-sf", "/opt/tinc-hub/bin/tinc-hub", "/usr/local/bin/tinc-hub"])
    t = time.monotonic()
    out = hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB_NAME, "--address",
                   netlab.HUB_PUBLIC, "--vpn-subnet", VPN_SUBNET], timeout=180).stdout
    netlab.record_timing("boot: tinc-hub init (RSA 4096, systemd units)", time.monotonic() - t)
    assert "boot: systemd" in out, out
    for unit in ("tinc.service", UNIT, "tinc-hub.service"):
        assert hub.unit_state("is-enabled", unit) == "enabled", unit
    assert hub.unit_state("is-active", UNIT) == "active"
    assert _comm(hub, _unit_main_pid(hub, UNIT)) == "tincd"
    assert _address_on(hub, NET) == [HUB_VPN]
    exec_start = hub.run(["systemctl", "show", "-p", "ExecStart", "--value",
                          "tinc-hub.service"]).stdout
    assert "path=/opt/tinc-hub/bin/tinc-hub " in exec_start, exec_start
    netlab.wait_until(lambda: hub.unit_state("is-active", "tinc-hub.service") == "active"
                      and hub.run(["curl", "-fsk", "https://127.0.0.1:8655/healthz"],
                                  check=False).returncode == 0, 30, 0.2,
                      what="tinc-hub.service answering /healthz")
    journal = hub.run(["journalctl", "-u", "tinc-hub.service", "--no-pager", "-o", "cat"]).stdout
    assert "/healthz" in journal, "the helper's log is not in journald:\n" + journal


def test_hub_init_again_changes_nothing(machines):
    hub = machines.hub
    before = _snapshot(hub, "/etc/tinc", "/etc/systemd/system", "/var/lib/tinc-hub")
    service_pid = _unit_main_pid(hub, "tinc-hub.service")
    tincd_pid = _unit_main_pid(hub, UNIT)
    out = hub.run(["tinc-hub", "init", "--net", NET, "--name", HUB_NAME, "--address",
                   netlab.HUB_PUBLIC, "--vpn-subnet", VPN_SUBNET], timeout=180).stdout
    assert "changed: nothing" in out, out
    after = _snapshot(hub, "/etc/tinc", "/etc/systemd/system", "/var/lib/tinc-hub")
    for root in before:
        changed = {k for k in set(before[root]) | set(after[root])
                   if before[root].get(k) != after[root].get(k)
                   and not k.startswith("registry.sqlite3")}  # owned by the running API
        assert not changed, "%s: %s" % (root, sorted(changed))
    assert (_unit_main_pid(hub, "tinc-hub.service"), _unit_main_pid(hub, UNIT)) == \
        (service_pid, tincd_pid)


# ---------------------------------------------------------------------------- systemd node

def test_systemd_node_joins_with_the_printed_one_liner(machines):
    node, hub = machines.systemd_node, machines.hub
    command = _one_liner(hub)
    machines.state["command"] = command
    t = time.monotonic()
    address = _join(node, command)
    netlab.record_timing("boot: systemd node one-liner join (RSA 4096)", time.monotonic() - t)
    machines.state[SYSTEMD_NODE] = address
    assert node.unit_state("is-enabled", "tinc.service") == "enabled"
    assert node.unit_state("is-enabled", UNIT) == "enabled"
    assert node.unit_state("is-active", UNIT) == "active"
    assert _comm(node, _unit_main_pid(node, UNIT)) == "tincd"
    assert _address_on(node, NET) == [address]
    assert node.ping(HUB_VPN) and hub.ping(address)


def test_systemd_node_second_run_changes_nothing(machines):
    node = machines.systemd_node
    roots = ("/etc/tinc", "/etc/systemd/system")
    before = _snapshot(node, *roots)
    pid = _unit_main_pid(node, UNIT)
    assert _join(node, machines.state["command"]) == machines.state[SYSTEMD_NODE]
    assert _snapshot(node, *roots) == before
    assert _unit_main_pid(node, UNIT) == pid and _tincd_pids(node) == [pid]


# ------------------------------------------------------------------------------- SysV node

def test_sysv_node_joins_with_one_rc_local_line(machines):
    node, hub = machines.sysv_node, machines.hub
    command = _one_liner(hub) + " --init rc.local"
    address = _join(node, command)
    machines.state[SYSV_NODE] = address
    pids = _tincd_pids(node)
    before = _snapshot(node, "/etc/tinc", "/etc/rc.local")
    assert _join(node, command) == address
    assert _snapshot(node, "/etc/tinc", "/etc/rc.local") == before
    assert len(pids) == 1 and _tincd_pids(node) == pids
    rc_local = node.run(["cat", "/etc/rc.local"]).stdout
    assert rc_local.splitlines().count("tincd -n %s" % NET) == 1, rc_local
    assert node.run(["test", "-x", "/etc/rc.local"], check=False).returncode == 0
    assert _address_on(node, NET) == [address]
    assert node.ping(HUB_VPN) and hub.ping(address)


# --------------------------------------------------------------------------------- reboots

@pytest.mark.parametrize("which", ["systemd_node", "sysv_node"])
def test_node_is_back_on_the_vpn_after_reboot(machines, which):
    node = getattr(machines, which)
    address = machines.state[node.hostname]
    node.poweroff()
    assert not machines.hub.ping(address)
    node.start()
    seconds = node.wait_ping(HUB_VPN, REBOOT_DEADLINE)
    assert seconds is not None, "%s: VPN not back %ss after boot start" % (
        node.hostname, REBOOT_DEADLINE)
    netlab.record_timing("boot: %s reboot: boot start -> hub answers over VPN (%s)"
                         % (node.hostname, node.spec.init), seconds)
    assert machines.hub.ping(address)
    assert _address_on(node, NET) == [address]
    assert len(_tincd_pids(node)) == 1
    if node.spec.init == "systemd":
        node.wait_ready(30)
        assert node.unit_state("is-active", UNIT) == "active"
        assert node.unit_state("is-enabled", "tinc.service") == "enabled"


def test_hub_reboot_brings_back_nodes_and_api(machines):
    hub = machines.hub
    hub.poweroff()
    hub.start()
    pin = re.search(r"--pinnedpubkey '([^']+)'", machines.state["command"]).group(1)
    for node in (machines.systemd_node, machines.sysv_node):
        seconds = node.wait_ping(HUB_VPN, HUB_REBOOT_DEADLINE - (time.monotonic() -
                                                                  hub.boot_started))
        assert seconds is not None, "%s: hub not back over VPN within %ss of its boot" % (
            node.hostname, HUB_REBOOT_DEADLINE)
        netlab.record_timing("boot: hub reboot: hub boot start -> %s reaches hub over VPN"
                             % node.hostname, time.monotonic() - hub.boot_started)

    def api_serves() -> bool:
        return machines.systemd_node.run(
            ["curl", "-fsS", "--max-time", "3", "--pinnedpubkey", pin, "-k",
             "https://%s:8655/healthz" % netlab.HUB_PUBLIC], check=False).returncode == 0

    netlab.wait_until(api_serves, HUB_REBOOT_DEADLINE - (time.monotonic() - hub.boot_started),
                      0.5, what="tinc-hub API after the hub's reboot")
    netlab.record_timing("boot: hub reboot: hub boot start -> API answers a node",
                         time.monotonic() - hub.boot_started)
    for address in (machines.state[SYSTEMD_NODE], machines.state[SYSV_NODE]):
        assert hub.ping(address)
    hub.wait_ready(30)
    for unit in (UNIT, "tinc-hub.service"):
        assert hub.unit_state("is-active", unit) == "active", unit


# ------------------------------------------------------------------------------------ leave

def test_leave_on_systemd_node_stays_left_after_reboot(machines):
    node = machines.systemd_node
    fetch = machines.state["command"].split(" | ")[0]
    proc = node.run(["sh", "-c", fetch + " | python3 - leave"], check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _tincd_pids(node) == []
    node.reboot()
    assert _tincd_pids(node) == []
    for unit in ("tinc.service", UNIT):
        assert node.unit_state("is-enabled", unit) == "disabled", unit
    assert node.unit_state("is-active", UNIT) == "inactive"
    assert node.run(["test", "-e", "/etc/tinc/" + NET], check=False).returncode != 0
    assert not node.ping(HUB_VPN)
