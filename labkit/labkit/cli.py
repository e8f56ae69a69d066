"""labkit.cli, the `lab` command line: the walkthrough on this machine, kept up between commands (`./lab up|status|shell|down`).

`up` builds the netlab NAT topology (hub `erebor` on 192.0.2.1, a NAT router, nodes
`hobbiton`, `bree`, ... on 198.51.100.0/24 behind it) and runs the product on it the way
users do:

- mode `containers` (booted Debian bookworm containers, labkit.nspawn): the hub container
  installs the hub with pip and runs `tinc-hub init` (which starts tincd and
  tinc-hub.service under systemd); each node runs the literal one-liner `tinc-hub token
  create` printed (default `--init auto`: systemd units).
- mode `namespaces` (no init system): `tinc-hub init --init none`, `tinc-hub serve` in the
  background, and the same one-liner plus `--init none`.
- mode `auto` (default): containers when root, /dev/net/tun, systemd-nspawn and mmdebstrap
  are there and the root trees can be built; namespaces otherwise.

The lab outlives `up`: what it made (namespaces and their anchor pids, containers'
systemd-nspawn pids and overlay trees, the work directory) is in a state file,
/run/tinc-lab/NAME.json (NAME: env TINC_LAB_NAME, default `lab`; names and machines are
prefixed `tlab-NAME-`), which `status`, `shell` and `down` read. `up` on a lab that is up
is idempotent: it adds the nodes missing to reach --nodes and shows the table (a different
--mode is refused). `down` removes everything in the state file, and any namespace with
the lab's prefix, even when the state file is gone.

Network safety: as netlab: nothing is connected to the root namespace.
"""

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from labkit import netlab, nspawn
from bootstrap.bootstrap import DEFAULT_KEY_SIZE

STATE_DIR = Path("/run/tinc-lab")
NET = "middle-earth"
HUB_NAME = "erebor"
VPN_SUBNET = "10.0.0.0/24"
HUB_VPN = "10.0.0.1"
NODE_NAMES = ("hobbiton", "bree", "rivendell", "isengard", "edoras", "dale", "moria",
              "lorien")
MAX_NODES = 40
JOIN_TIMEOUT = 300
MODES = ("auto", "containers", "namespaces")

_T0 = time.monotonic()


def say(message: str) -> None:
    print("[lab %5.1fs] %s" % (time.monotonic() - _T0, message), flush=True)


def node_names(count: int) -> List[str]:
    """hobbiton, bree, rivendell, ... then node9, node10, ..."""
    return [NODE_NAMES[i] if i < len(NODE_NAMES) else "node%d" % (i + 1) for i in range(count)]


def lab_name() -> str:
    name = os.environ.get("TINC_LAB_NAME", "lab")
    if not re.fullmatch(r"[a-z0-9]{1,16}", name):
        raise SystemExit("lab: TINC_LAB_NAME must be 1-16 of [a-z0-9], not %r" % name)
    return name


class LabError(RuntimeError):
    """A lab command cannot do what was asked (the message says why)."""


# ============================================================================ the state file

class LabState:
    """What a lab made, as JSON in /run/tinc-lab/NAME.json (written after every step)."""

    def __init__(self, name: str, data: Dict) -> None:
        self.name = name
        self.data = data

    @staticmethod
    def path_of(name: str) -> Path:
        return STATE_DIR / ("%s.json" % name)

    @property
    def path(self) -> Path:
        return self.path_of(self.name)

    @classmethod
    def new(cls, name: str, mode: str) -> "LabState":
        return cls(name, {"name": name, "mode": mode, "prefix": "tlab-%s" % name,
                          "workdir": None, "net": NET, "hosts": {}, "nodes": [],
                          "created": time.time()})

    @classmethod
    def load(cls, name: str) -> Optional["LabState"]:
        try:
            return cls(name, json.loads(cls.path_of(name).read_text()))
        except FileNotFoundError:
            return None

    def save(self) -> None:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @property
    def mode(self) -> str:
        return self.data["mode"]

    @property
    def prefix(self) -> str:
        return self.data["prefix"]

    @property
    def hosts(self) -> Dict[str, Dict]:
        return self.data["hosts"]

    @property
    def nodes(self) -> List[str]:
        return self.data["nodes"]


def lock_lab(name: str):
    """An exclusive lock for commands that change the lab (up, down); held until exit."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    handle = open(STATE_DIR / ("%s.lock" % name), "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LabError("another lab command is changing lab %r right now" % name) from None
    return handle


def remove_lock(name: str) -> None:
    """Delete the lab's lock file (held by the caller) and /run/tinc-lab when it is empty."""
    (STATE_DIR / ("%s.lock" % name)).unlink(missing_ok=True)
    try:
        STATE_DIR.rmdir()
    except OSError:
        pass  # other labs are up


# ===================================================== hosts and containers of earlier runs

def netns_inode(netns: str) -> Optional[int]:
    try:
        return os.stat("/run/netns/" + netns).st_ino
    except OSError:
        return None


def anchor_holds(pid: int, netns: str) -> bool:
    """True when pid is alive and lives in network namespace netns (not a reused pid)."""
    try:
        return netlab.pid_alive(pid) and \
            os.stat("/proc/%d/ns/net" % pid).st_ino == netns_inode(netns)
    except OSError:
        return False


def is_nspawn_of(pid: int, machine: str) -> bool:
    """True when pid is the systemd-nspawn running machine (not a reused pid)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            args = handle.read().split(b"\0")
    except OSError:
        return False
    return netlab.pid_alive(pid) and b"systemd-nspawn" in os.path.basename(args[0]) and \
        machine.encode() in args


class AdoptedProcess:
    """A systemd-nspawn an earlier `lab up` started, with the part of Popen's interface that
    nspawn.Container uses (pid, poll, wait, kill)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and not netlab.pid_alive(self.pid):
            self.returncode = 0  # not our child: its status is not ours to read
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not netlab.wait_until(lambda: self.poll() is not None, timeout or 1e9, 0.05):
            raise subprocess.TimeoutExpired(["systemd-nspawn"], timeout)
        return 0

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


def attach_host(name: str, entry: Dict, workdir: Path) -> netlab.Host:
    """A netlab.Host for a namespace an earlier `lab up` made (its anchor checked)."""
    host = netlab.Host(name, entry["netns"], workdir)
    if not anchor_holds(entry["anchor_pid"], entry["netns"]):
        raise LabError("host %s of the lab is gone (anchor %s); run ./lab down"
                       % (name, entry["anchor_pid"]))
    host.anchor_pid = entry["anchor_pid"]
    host.addresses["lan"] = entry.get("lan")
    return host


def attach_container(name: str, entry: Dict, host: Optional[netlab.Host],
                     workdir: Path) -> nspawn.Container:
    """An nspawn.Container for a machine an earlier `lab up` booted."""
    spec = nspawn.RootfsSpec("adopted", entry["init"], ())
    container = nspawn.Container(entry["machine"], spec, host, workdir,  # type: ignore[arg-type]
                                 hostname=name)
    container.lower = Path(entry["lower"])
    container.layers = Path(entry["layers"])
    container.boots = 1
    pid = entry.get("nspawn_pid")
    if pid and is_nspawn_of(pid, entry["machine"]):
        container.nspawn = AdoptedProcess(pid)  # type: ignore[assignment]
    return container


def container_entry(container: nspawn.Container) -> Dict:
    return {"machine": container.name, "init": container.spec.init,
            "lower": str(container.lower), "layers": str(container.layers),
            "nspawn_pid": container.nspawn.pid if container.nspawn else None}


# ================================================================================== the lab

class Lab:
    """A lab made now or by an earlier `lab up`: its hosts, containers and state file."""

    def __init__(self, state: LabState) -> None:
        self.state = state
        self.hosts: Dict[str, netlab.Host] = {}
        self.containers: Dict[str, nspawn.Container] = {}
        self.topology: Optional[netlab.Topology] = None  # when made by this process

    @property
    def workdir(self) -> Path:
        return Path(self.state.data["workdir"])

    @classmethod
    def attach(cls, state: LabState) -> "Lab":
        lab = cls(state)
        for name, entry in state.hosts.items():
            lab.hosts[name] = attach_host(name, entry, lab.workdir)
            if entry.get("container"):
                container = attach_container(name, entry["container"], lab.hosts[name],
                                             lab.workdir)
                if not container.running():
                    raise LabError("container %s of the lab is not running; run ./lab down"
                                   % name)
                lab.containers[name] = container
        return lab

    def record_host(self, name: str, host: netlab.Host, role: str) -> None:
        self.hosts[name] = host
        self.state.hosts[name] = {"role": role, "netns": host.netns,
                                  "anchor_pid": host.anchor_pid,
                                  "lan": host.addresses.get("lan") or
                                  host.addresses.get("public"), "container": None}
        self.state.save()

    def record_container(self, name: str, container: nspawn.Container) -> None:
        self.containers[name] = container
        self.state.hosts[name]["container"] = container_entry(container)
        self.state.save()

    def runner(self, name: str):
        """What runs commands on host `name`: its container, or the namespace itself."""
        if name in self.containers:
            return self.containers[name]
        if name in self.hosts:
            return self.hosts[name]
        raise LabError("no host %r in this lab (hosts: %s)"
                       % (name, ", ".join(self.state.hosts)))

    def detach(self) -> None:
        """Keep everything running after this process exits."""
        if self.topology is not None:
            self.topology.detach()
        for container in self.containers.values():
            container.detach()

    # -- building -----------------------------------------------------------------------------
    def build_topology(self, nodes: List[str]) -> None:
        say("namespaces: hub %s (%s) -- router (NAT) -- %s (LAN %s)"
            % (HUB_NAME, netlab.HUB_PUBLIC, ", ".join(nodes), netlab.LAN_NET))
        topo = netlab.build_nat_topology(node_names=nodes, hub_name=HUB_NAME,
                                         prefix=self.state.prefix)
        self.topology = topo
        self.state.data["workdir"] = str(topo.workdir)
        self.record_host(HUB_NAME, topo.hub, "hub")
        self.record_host("router", topo.router, "router")
        for node in topo.nodes:
            self.record_host(node.name, node, "node")

    def add_node_host(self, name: str) -> netlab.Host:
        """A new node namespace on the LAN of an existing lab."""
        host = netlab.Host(name, "%s-%s" % (self.state.prefix, name), self.workdir)
        host.start()
        self.record_host(name, host, "node")
        netlab.connect_lan_node(self.hosts["router"].netns, host, self.state.nodes.index(name))
        host.sysctl("net.ipv4.ip_forward", 0)
        self.state.hosts[name]["lan"] = host.addresses["lan"]
        self.state.save()
        return host

    def boot_containers(self, names: List[str]) -> None:
        """Boot one container per host name (in parallel), each in its host's namespace."""
        made = []
        for name in names:
            spec = (nspawn.systemd_hub_spec(self.workdir) if name == HUB_NAME
                    else nspawn.systemd_node_spec())
            container = nspawn.Container("%s-%s" % (self.state.prefix, name), spec,
                                         self.hosts[name], self.workdir, hostname=name)
            container.create()
            self.record_container(name, container)
            if name == HUB_NAME:
                nspawn.stage_hub_project(container)
            made.append(container)
        for container in made:
            container.start()
            self.record_container(container.hostname, container)
        for container in made:
            seconds = container.wait_ready(120)
            say("%s: booted (systemd) in %.1fs" % (container.hostname, seconds))

    def start_hub(self, key_size: int) -> None:
        hub = self.runner(HUB_NAME)
        if self.state.mode == "containers":
            say("%s: pip install the hub into /opt/tinc-hub" % HUB_NAME)
            nspawn.install_hub(hub)
            argv = ["tinc-hub", "init", "--net", NET, "--name", HUB_NAME, "--address",
                    netlab.HUB_PUBLIC, "--vpn-subnet", VPN_SUBNET, "--key-size", str(key_size)]
        else:
            argv = [str(netlab.TINC_HUB), "init", "--net", NET, "--name", HUB_NAME,
                    "--address", netlab.HUB_PUBLIC, "--vpn-subnet", VPN_SUBNET,
                    "--key-size", str(key_size), "--init", "none"]
        say("%s: %s" % (HUB_NAME, " ".join(["tinc-hub"] + argv[1:])))
        out = hub.run(argv, timeout=300).stdout
        for line in out.rstrip().splitlines():
            print("    | " + line, flush=True)
        if self.state.mode == "namespaces":
            say("%s: tinc-hub serve (in the background; log %s)"
                % (HUB_NAME, self.workdir / "erebor.tinc-hub-serve.log"))
            netlab.HubDriver(hub, NET, HUB_NAME, vpn_subnet=VPN_SUBNET).serve()
        else:
            netlab.wait_until(lambda: hub.run(
                ["curl", "-fsk", "--max-time", "3",
                 "https://127.0.0.1:%d/healthz" % netlab.API_PORT],
                check=False).returncode == 0, 60, 0.2, what="tinc-hub.service on %s" % HUB_NAME)
            say("%s: tinc-hub.service answers" % HUB_NAME)

    def one_liner(self) -> str:
        """A fresh token's node command, exactly as `tinc-hub token create` printed it."""
        tinc_hub = "tinc-hub" if self.state.mode == "containers" else str(netlab.TINC_HUB)
        out = self.runner(HUB_NAME).run([tinc_hub, "token", "create"]).stdout
        lines = out.splitlines()
        if "run on the node as root:" not in lines:
            raise LabError("tinc-hub token create printed no command:\n" + out)
        return lines[lines.index("run on the node as root:") + 1]

    def join(self, name: str) -> str:
        """Run the one-liner on node `name`; return the VPN address it printed."""
        command = self.one_liner()
        if self.state.mode == "namespaces":
            command += " --init none"  # a namespace has no init system to register tinc with
        say("%s: tinc-hub token create; %s runs:\n      %s"
            % (HUB_NAME, name, re.sub(r"tinc1\.[\w-]+", "tinc1.…", command)))
        started = time.monotonic()
        proc = self.runner(name).run(["sh", "-c", command], check=False, timeout=JOIN_TIMEOUT)
        for line in (proc.stderr + proc.stdout).rstrip().splitlines():
            print("    | " + line, flush=True)
        address = netlab.printed_address(proc.stdout) if proc.returncode == 0 else None
        if not address:
            raise LabError("%s did not join (exit %s)" % (name, proc.returncode))
        say("%s joined as %s in %.1fs" % (name, address, time.monotonic() - started))
        return address

    def add_nodes(self, names: List[str], key_size: int) -> None:
        """Nodes on the LAN (new namespaces when the topology exists), booted and joined."""
        for name in names:
            if name not in self.state.nodes:
                self.state.nodes.append(name)
            if name not in self.hosts:
                self.add_node_host(name)
        if self.state.mode == "containers":
            self.boot_containers([n for n in names if n not in self.containers])
        for name in names:
            self.join(name)

    # -- measuring ----------------------------------------------------------------------------
    def vpn_address(self, name: str) -> Optional[str]:
        proc = self.runner(name).run(["ip", "-j", "-4", "addr", "show", "dev", NET],
                                     check=False, timeout=10)
        if proc.returncode != 0:
            return None
        for link in json.loads(proc.stdout or "[]"):
            for info in link.get("addr_info", []):
                return info.get("local")
        return None

    def ping(self, source: str, address: Optional[str]) -> Tuple[bool, str]:
        """Ping address 3 times from host source: (ok, 'ok 0.42 ms' or 'FAIL')."""
        if not address:
            return False, "FAIL (no address)"
        proc = self.runner(source).run(["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2",
                                        address], check=False, timeout=20)
        if proc.returncode != 0:
            return False, "FAIL"
        rtt = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
        return True, "ok %s ms" % rtt.group(1) if rtt else "ok"

    def wait_vpn(self, timeout: float) -> None:
        """Wait until every node answers the hub over the VPN (tinc takes a moment)."""
        for name in self.state.nodes:
            netlab.wait_until(lambda: self.runner(name).run(
                ["ping", "-n", "-q", "-c", "1", "-W", "1", HUB_VPN], check=False,
                timeout=10).returncode == 0, timeout, 0.2)

    def table(self) -> Tuple[bool, str]:
        """(all pings ok, the table): node, LAN and VPN address, ping hub, ping other nodes."""
        addresses = {name: self.vpn_address(name) for name in [HUB_NAME] + self.state.nodes}
        rows = [("node", "LAN address", "VPN address", "ping hub (%s)" % HUB_VPN,
                 "ping nodes")]
        rows.append((HUB_NAME, netlab.HUB_PUBLIC, addresses[HUB_NAME] or "-", "-", "-"))
        all_ok = addresses[HUB_NAME] == HUB_VPN
        for name in self.state.nodes:
            ok, to_hub = self.ping(name, HUB_VPN)
            all_ok = all_ok and ok
            others = []
            for other in self.state.nodes:
                if other != name:
                    ok, result = self.ping(name, addresses[other])
                    all_ok = all_ok and ok
                    others.append("%s %s" % (other, result.split(" ")[0]))
            rows.append((name, self.state.hosts[name].get("lan") or "-",
                         addresses[name] or "-", to_hub, ", ".join(others) or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        footer = "mode: %s; lab %r (namespaces %s-*)" % (self.state.mode, self.state.name,
                                                         self.state.prefix)
        return all_ok, "\n".join(lines + [footer])


# ============================================================================ tearing down

def stop_container(name: str, entry: Dict, workdir: Path) -> None:
    """Power off (else kill) a container an earlier run booted, and delete its tree."""
    container = attach_container(name, entry, None, workdir)  # no commands run in it
    if container.nspawn is not None:
        try:
            container.destroy()
            return
        except Exception as exc:  # destroy kills what does not power off
            print("lab: %s: %s" % (entry["machine"], exc), file=sys.stderr)
    shutil.rmtree(entry["layers"], ignore_errors=True)


def lab_namespaces(prefix: str) -> List[str]:
    listing = netlab.run_root(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in listing.splitlines() if line.split()]
    return [n for n in names if n.startswith(prefix + "-")]


def teardown(state: LabState) -> List[str]:
    """Remove everything the state file names, and any namespace with the lab's prefix.
    Returns what was removed."""
    removed = []
    workdir = Path(state.data["workdir"]) if state.data.get("workdir") else None
    for name, entry in state.hosts.items():
        if entry.get("container"):
            say("powering off container %s" % entry["container"]["machine"])
            stop_container(name, entry["container"], workdir or Path(tempfile.gettempdir()))
            removed.append("container " + entry["container"]["machine"])
    netns_list = [entry["netns"] for entry in state.hosts.values()]
    netns_list += [n for n in lab_namespaces(state.prefix) if n not in netns_list]
    for netns in reversed(netns_list):
        if netlab.netns_exists(netns):
            netlab.remove_namespace(netns)
            removed.append("namespace " + netns)
    if workdir and workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append("directory %s" % workdir)
    state.remove()
    return removed


# ================================================================================ commands

def containers_unavailable() -> Optional[str]:
    """Why booted containers cannot be used here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin"
    for tool in ("systemd-nspawn", "mmdebstrap"):
        if not shutil.which(tool, path=path):
            return "%s not installed" % tool
    return None


def choose_mode(requested: str, workdir: Path) -> str:
    """containers or namespaces; for containers the root trees are built (or found cached)
    here, before anything is made."""
    if requested == "namespaces":
        return "namespaces"
    reason = containers_unavailable()
    if reason:
        if requested == "containers":
            raise LabError("containers mode: %s" % reason)
        say("booted containers unavailable (%s): using plain namespaces" % reason)
        return "namespaces"
    say("root trees (Debian bookworm; built once with mmdebstrap, cached in %s)"
        % nspawn.CACHE_DIR)
    try:
        for spec in (nspawn.systemd_hub_spec(workdir), nspawn.systemd_node_spec()):
            started = time.monotonic()
            tree = nspawn.ensure_rootfs(spec, workdir)
            say("  %s ready (%.1fs)" % (tree.name, time.monotonic() - started))
    except Exception as exc:
        if requested == "containers":
            raise
        say("could not build the container trees (%s): using plain namespaces"
            % str(exc).splitlines()[0])
        return "namespaces"
    return "containers"


def cmd_up(args: argparse.Namespace) -> int:
    name = lab_name()
    if not 1 <= args.nodes <= MAX_NODES:
        raise LabError("--nodes must be 1..%d" % MAX_NODES)
    lock = lock_lab(name)  # noqa: F841 (held until exit)
    wanted = node_names(args.nodes)
    state = LabState.load(name)
    if state is not None:
        if args.mode != "auto" and args.mode != state.mode:
            raise LabError("lab %r is up in %s mode; run ./lab down first" % (name, state.mode))
        lab = Lab.attach(state)
        missing = [n for n in wanted if n not in state.nodes]
        say("lab %r is already up (%s mode, nodes: %s)%s"
            % (name, state.mode, ", ".join(state.nodes),
               "; adding " + ", ".join(missing) if missing else ""))
        try:
            lab.add_nodes(missing, args.key_size)
        finally:
            lab.detach()
        return show_table(lab, wait=bool(missing))
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    mode = choose_mode(args.mode, scratch)
    state = LabState.new(name, mode)
    lab = Lab(state)
    state.save()
    try:
        lab.build_topology(wanted)
        state.nodes.extend(wanted)
        state.save()
        if mode == "containers":
            say("booting containers %s" % ", ".join([HUB_NAME] + wanted))
            lab.boot_containers([HUB_NAME] + wanted)
        lab.start_hub(args.key_size)
        for node in wanted:
            lab.join(node)
    except BaseException as exc:
        say("lab up FAILED: %s" % (str(exc).splitlines()[0] if str(exc) else
                                  type(exc).__name__))
        if args.verbose:
            for container in lab.containers.values():
                print(container.diagnostics())
            if lab.topology is not None:
                print(lab.topology.diagnostics())
        say("removing what was made")
        lab.detach()
        teardown(state)
        raise
    lab.detach()
    return show_table(lab, wait=True)


def show_table(lab: Lab, wait: bool) -> int:
    if wait:
        lab.wait_vpn(30)
    ok, table = lab.table()
    print(table, flush=True)
    say("lab up: all pings ok" if ok else "lab up: some pings FAILED")
    return 0 if ok else 1


def attach_running_lab() -> Optional["Lab"]:
    """The lab that is up (from its state file), or None after saying that none is."""
    state = LabState.load(lab_name())
    if state is None:
        print("lab: no lab %r is up (./lab up)" % lab_name(), file=sys.stderr)
        return None
    return Lab.attach(state)


def cmd_status(args: argparse.Namespace) -> int:
    lab = attach_running_lab()
    if lab is None:
        return 3
    ok, table = lab.table()
    print(table, flush=True)
    return 0 if ok else 1


def cmd_shell(args: argparse.Namespace) -> int:
    lab = attach_running_lab()
    if lab is None:
        return 3
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    target = lab.runner(args.host)
    term = {"TERM": os.environ.get("TERM", "xterm")}
    if isinstance(target, nspawn.Container):
        argv = target.argv(command or ["bash", "-l"], env=term)
        env = dict(netlab._root_env())
    else:
        argv = target.nsenter_argv(command or ["bash", "-l"])
        env = dict(netlab.HOST_ENV, **term)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)
    return 127  # not reached


def cmd_down(args: argparse.Namespace) -> int:
    name = lab_name()
    lock = lock_lab(name)  # noqa: F841
    state = LabState.load(name) or LabState.new(name, "unknown")
    if not state.path.exists() and not lab_namespaces(state.prefix):
        say("no lab %r is up; nothing to remove" % name)
        remove_lock(name)
        return 0
    removed = teardown(state)
    say("lab %r removed: %s" % (name, ", ".join(removed) or "state file only"))
    remove_lock(name)
    left = lab_namespaces(state.prefix)
    if left:
        print("lab: namespaces still present: %s" % " ".join(left), file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["demo"], ["cleanup"]):
        return netlab.main(argv)
    parser = argparse.ArgumentParser(
        prog="lab", description="the walkthrough on this machine: hub erebor, NAT'd nodes "
        "(env TINC_LAB_NAME: which lab, default 'lab'); also: demo, cleanup")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="build hub + nodes and join them (adds nodes if up)")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--key-size", type=int, default=DEFAULT_KEY_SIZE)
    p.add_argument("-v", "--verbose", action="store_true", help="dump host state on failure")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("status", help="the table, measured again")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("shell", help="a shell on a host (or: shell HOST -- COMMAND...)")
    p.add_argument("host")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_shell)
    p = sub.add_parser("down", help="remove everything the lab made")
    p.set_defaults(func=cmd_down)
    sub.add_parser("demo", help="netlab's demo: up, pings, down, in namespaces")
    sub.add_parser("cleanup", help="remove namespaces left by crashed netlab runs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: must run as root (network namespaces)", file=sys.stderr)
        return 2
    netlab.install_signal_handlers()
    try:
        return args.func(args)
    except LabError as exc:
        print("lab: %s" % exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
