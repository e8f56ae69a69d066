"""labkit.vms: the Vagrantfile's four machines as real VMs (vagrant-libvirt, QEMU emulation).

No pytest in here (like labkit.netlab).

``ensure_libvirtd()`` starts virtlogd and libvirtd (niced, so are the QEMU processes they
start) when they are not running: PID 1 here is not systemd. ``ensure_box()`` runs
``vagrant/build-box`` (cached box, added to Vagrant) and returns the box name it prints last.
A ``VagrantLab`` is one run: a private copy of the project (Vagrantfile, provisioning scripts,
the hub's project and a wheelhouse of its dependencies and of the project's own wheel, built
here, in ``vagrant/wheelhouse``, so that the hub installs offline and builds nothing), the
settings TINC_LAB_PARALLEL=yes (``up()`` brings the machines up in UP_STEPS) and
TINC_LAB_KEY_SIZE=2048, its own ``.vagrant`` directory, and a per-run libvirt name prefix
``tinclab-<run>-`` for every domain, network and volume, with a free management subnet.
``destroy()`` runs ``vagrant destroy -f`` and reports what it left behind (domains, networks,
volumes, QEMU processes carrying the prefix), then removes those too; a run is also destroyed
at interpreter exit, and ``sweep_stale_runs()`` removes what runs that died left behind (their
lock file in LOCK_DIR is no longer held).

Network safety: every libvirt network of a run is isolated (no forwarding, no DNS forwarding:
the host holds the .1 address of each and nothing routes through it), and the guests install
nothing from the network (the box holds the packages, the hub's wheels come from the synced
folder).
"""

import fcntl
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple
from xml.etree import ElementTree

from labkit import netlab, nspawn

LIBVIRT_URI = "qemu:///system"
BUILD_BOX = netlab.REPO_ROOT / "vagrant" / "build-box"
LOCK_DIR = Path("/run/tinc-lab-vms")
RUN_PREFIX_RE = re.compile(r"tinclab-([0-9a-f]{8})-")
MACHINES = ("erebor", "gate", "hobbiton", "bree")   # the Vagrantfile's, in `up` order
# brought up in two steps, each pair in parallel (TINC_LAB_PARALLEL=yes): the nodes need the
# hub's tokens and the router
UP_STEPS = (("erebor", "gate"), ("hobbiton", "bree"))
LAB_KEY_SIZE = 2048   # TINC_LAB_KEY_SIZE: the Vagrantfile's default (4096) is for users
NICE = ["nice", "-n", "10"]
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# the project parts a run copies: the Vagrantfile and its scripts, plus the hub's project
LAB_PARTS = ("Vagrantfile", "vagrant")


def virsh(*args: str, check: bool = True, timeout: float = 60) -> str:
    cmd = ["virsh", "-q", "-c", LIBVIRT_URI] + list(args)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise netlab.CommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], stdout=subprocess.DEVNULL).returncode == 0


def ensure_libvirtd(timeout: float = 30) -> None:
    """virtlogd and libvirtd running (started here, niced, when they are not); waits until
    libvirtd answers.

    /dev/kvm gets Debian's usual owner and mode (root:kvm 0660, what udev gives it) when it
    is root-only (no udev here): otherwise libvirt's QEMU probe finds KVM while its check as
    the libvirt-qemu user does not, judges its cached QEMU capabilities stale and probes QEMU
    again at every domain define and start (~80 s each under load). The VMs themselves use
    QEMU emulation, never KVM."""
    kvm = "/dev/kvm"
    if os.path.exists(kvm) and os.stat(kvm).st_mode & 0o077 == 0 and os.stat(kvm).st_gid == 0:
        shutil.chown(kvm, group="kvm")
        os.chmod(kvm, 0o660)
    if not _running("virtlogd"):
        subprocess.run(NICE + ["virtlogd", "-d"], check=True, stdin=subprocess.DEVNULL)
    if not _running("libvirtd"):
        subprocess.run(NICE + ["libvirtd", "-d"], check=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(["virsh", "-c", LIBVIRT_URI, "version"], capture_output=True,
                              stdin=subprocess.DEVNULL, text=True)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd does not answer on %s: %s" % (LIBVIRT_URI,
                                                                       proc.stderr.strip()))
        time.sleep(0.5)


def ensure_box(log_dir: Path) -> str:
    """The lab box's name: vagrant/build-box builds it (or finds it cached) and adds it."""
    log_path = log_dir / "build-box.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(NICE + [str(BUILD_BOX)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=log, text=True, timeout=1800)
    if proc.returncode != 0:
        raise netlab.CommandError([str(BUILD_BOX)], proc.returncode, proc.stdout,
                                  log_path.read_text(errors="replace"))
    return proc.stdout.strip().splitlines()[-1]


def build_project_wheel(wheelhouse: Path, log_dir: Path) -> Path:
    """The hub's project as a wheel in wheelhouse, built here from a fresh copy (pure Python:
    one py3-none-any wheel), so that the emulated hub installs wheels only (hub.sh)."""
    source = Path(tempfile.mkdtemp(prefix="tinc-hub-wheel-"))
    try:
        nspawn.copy_hub_project(source / "project")
        cmd = [str(netlab.VENV / "bin" / "pip"), "wheel", "-q", "--no-deps", "--no-index",
               "--no-build-isolation", "--disable-pip-version-check", "-w", str(source / "out"),
               str(source / "project")]
        log_path = log_dir / "pip-wheel-project.log"
        with open(log_path, "wb") as log:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=300)
        wheels = list((source / "out").glob("tinc_hub-*-py3-none-any.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise netlab.CommandError(cmd, proc.returncode, "",
                                      log_path.read_text(errors="replace"), "root")
        return Path(shutil.copy2(wheels[0], wheelhouse))
    finally:
        shutil.rmtree(source, ignore_errors=True)


class Leftovers(Dict[str, List[str]]):
    """What carries a run's prefix: {"domains": [...], "networks": [...], "volumes": [...],
    "processes": [pid, ...]}."""

    def empty(self) -> bool:
        return not any(self.values())


def find_leftovers(prefix: str) -> Leftovers:
    """Every libvirt domain, network and volume named with prefix, and every QEMU process
    whose command line holds it."""
    found = Leftovers(domains=[], networks=[], volumes=[], processes=[])
    found["domains"] = [n for n in virsh("list", "--all", "--name").split() if n.startswith(prefix)]
    found["networks"] = [n for n in virsh("net-list", "--all", "--name").split()
                         if n.startswith(prefix)]
    for pool in virsh("pool-list", "--all", "--name").split():
        for line in virsh("vol-list", pool, check=False).splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(prefix):
                found["volumes"].append("%s/%s" % (pool, name))
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(prefix.encode() in a for a in argv):
            found["processes"].append(pid)
    return found


def remove_leftovers(found: Leftovers) -> None:
    """Remove what find_leftovers() found, forcefully (domains off, then their storage)."""
    for name in found["domains"]:
        virsh("destroy", name, check=False)
        virsh("undefine", name, "--remove-all-storage", "--nvram", check=False)
    for pid in found["processes"]:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    for name in found["networks"]:
        virsh("net-destroy", name, check=False)
        virsh("net-undefine", name, check=False)
    for pool_and_name in found["volumes"]:
        pool, name = pool_and_name.split("/", 1)
        virsh("vol-delete", "--pool", pool, name, check=False)


def sweep_stale_runs() -> List[str]:
    """Remove the libvirt objects of runs whose owner died (lock file not held); returns
    their prefixes."""
    names = virsh("list", "--all", "--name").split() + virsh("net-list", "--all", "--name").split()
    swept = []
    for run in sorted({m.group(1) for m in map(RUN_PREFIX_RE.match, names) if m}):
        lock_path = LOCK_DIR / (run + ".lock")
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live run
        prefix = "tinclab-%s-" % run
        remove_leftovers(find_leftovers(prefix))
        lock_path.unlink(missing_ok=True)
        swept.append(prefix)
    return swept


def _networks_in_use() -> List[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"],
                         capture_output=True, text=True, check=True).stdout
    used = []
    for line in out.splitlines():
        word = line.split()[0] if line.split() else ""
        if word[:1].isdigit():
            used.append(ipaddress.ip_network(word, strict=False))
    return used


def free_management_net() -> str:
    """A 192.168.X.0/24 (X in 130..249) that no route of this machine overlaps."""
    used = _networks_in_use()
    for third in range(130, 250):
        net = ipaddress.ip_network("192.168.%d.0/24" % third)
        if not any(net.overlaps(u) for u in used):
            return str(net)
    raise RuntimeError("no free 192.168.130-249.0/24 network for the VMs' management network")


class ManagementInterface(NamedTuple):
    """A VM's interface on Vagrant's management network, as the guest itself reports it."""
    ifname: str
    address: str               # IPv4, inside the run's management subnet
    link_local: Optional[str]  # its IPv6 link-local address, if the guest has one


def parse_management_interface(ip_addr_output: str, subnet: ipaddress.IPv4Network
                               ) -> ManagementInterface:
    """The interface holding an address of subnet in `ip -o addr show` output (strict: one
    such address, else ValueError)."""
    found = []
    for line in ip_addr_output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2] == "inet":
            address = ipaddress.ip_interface(words[3]).ip
            if address in subnet:
                found.append((words[1], str(address)))
    if len(found) != 1:
        raise ValueError("expected one address in %s, found %r" % (subnet, found))
    ifname, address = found[0]
    link_local = None
    for line in ip_addr_output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[1] == ifname and words[2] == "inet6":
            candidate = ipaddress.ip_interface(words[3]).ip
            if candidate.is_link_local:
                link_local = str(candidate)
    return ManagementInterface(ifname, address, link_local)


class VagrantLab:
    """One run of the Vagrantfile's lab on libvirt, in a private copy of the project."""

    def __init__(self, box: str, log_dir: Path):
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self.run_id = secrets.token_hex(4)
        self.prefix = "tinclab-%s-" % self.run_id
        self._lock = open(LOCK_DIR / (self.run_id + ".lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.log_dir = log_dir
        self.project = Path(tempfile.mkdtemp(prefix=self.prefix))
        self._ssh_config: Optional[Path] = None
        self.destroyed = False
        self._copy_project(log_dir)
        self.env = dict(os.environ, TINC_LAB_BOX=box, TINC_LAB_LIBVIRT_PREFIX=self.prefix,
                        TINC_LAB_MGMT_NET=free_management_net(),
                        VAGRANT_DEFAULT_PROVIDER="libvirt", VAGRANT_CHECKPOINT_DISABLE="1",
                        TINC_LAB_PARALLEL="yes", TINC_LAB_KEY_SIZE=str(LAB_KEY_SIZE),
                        VAGRANT_DOTFILE_PATH=str(self.project / ".vagrant"))
        for name in list(self.env):
            if name.startswith("TINC_LAB_") and name.endswith("_BOX") and name != "TINC_LAB_BOX":
                del self.env[name]
        netlab.remove_at_exit(self, "vagrant lab " + self.prefix, self.destroy)

    def _copy_project(self, log_dir: Path) -> None:
        hub_project = self.project / "hub-project"
        nspawn.copy_hub_project(hub_project)
        for part in nspawn.HUB_PROJECT_PARTS:
            os.rename(hub_project / part, self.project / part)
        hub_project.rmdir()
        for part in LAB_PARTS:
            source = netlab.REPO_ROOT / part
            if source.is_dir():
                shutil.copytree(source, self.project / part,
                                ignore=shutil.ignore_patterns("wheelhouse"))
            else:
                shutil.copy2(source, self.project / part)
        wheelhouse = self.project / "vagrant" / "wheelhouse"
        shutil.copytree(nspawn.ensure_hub_wheelhouse(log_dir), wheelhouse)
        build_project_wheel(wheelhouse, log_dir)

    def vagrant(self, *args: str, timeout: float = 1200, check: bool = True
                ) -> subprocess.CompletedProcess:
        """Run `vagrant ARGS` in the run's project (niced); its output also goes to a log
        file in log_dir, each line with the seconds since the start."""
        cmd = NICE + ["vagrant", "--no-color"] + list(args)
        log_path = self.log_dir / ("vagrant-%s.log" % "-".join(a for a in args[:2]
                                                             if a.isalnum()))
        started = time.monotonic()
        lines = []
        with open(log_path, "a") as log:
            log.write("$ %s\n" % shlex.join(cmd))
            with subprocess.Popen(cmd, cwd=str(self.project), env=self.env, text=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) as child:
                timer = threading.Timer(timeout, child.kill)
                timer.start()
                try:
                    for line in child.stdout:
                        line = ANSI_RE.sub("", line)
                        if "Progress: " in line:
                            continue   # box upload: one line per percent
                        lines.append(line)
                        log.write("%7.1f %s" % (time.monotonic() - started, line))
                        log.flush()
                except BaseException:
                    child.kill()   # interrupted: stop vagrant, destroy() cleans up
                    raise
                finally:
                    timer.cancel()
                    child.wait()
        proc = subprocess.CompletedProcess(cmd, child.returncode, "".join(lines))
        if time.monotonic() - started >= timeout:
            raise netlab.CommandError(cmd, None, proc.stdout[-6000:], "", "vagrant", timeout)
        if check and proc.returncode != 0:
            raise netlab.CommandError(cmd, proc.returncode, proc.stdout[-6000:], "", "vagrant")
        return proc

    def up(self, timeout: float = 1800) -> Tuple[str, Dict[str, float]]:
        """`vagrant up` of the four machines in UP_STEPS (each step's pair in parallel);
        returns the output of all steps and each step's seconds."""
        output, seconds = [], {}
        for machines in UP_STEPS:
            started = time.monotonic()
            output.append(self.vagrant("up", "--provider=libvirt", *machines,
                                       timeout=timeout).stdout)
            seconds[" + ".join(machines)] = time.monotonic() - started
        return "".join(output), seconds

    def ssh(self, machine: str, command: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess:
        """Run a shell command on a machine over Vagrant's ssh settings (one `vagrant
        ssh-config` per run, then plain ssh: vagrant's own start-up takes seconds)."""
        if self._ssh_config is None:
            config = self.vagrant("ssh-config", timeout=120).stdout
            self._ssh_config = self.project / "ssh-config"
            self._ssh_config.write_text(config)
        cmd = ["ssh", "-F", str(self._ssh_config), "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=10", machine, command]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise netlab.CommandError(cmd, proc.returncode, proc.stdout, proc.stderr, machine)
        return proc

    def forget_ssh_config(self) -> None:
        """After a reload the management address may change: ask Vagrant again next time."""
        self._ssh_config = None

    @property
    def management_network(self) -> str:
        """The libvirt network of Vagrant's ssh (the Vagrantfile's MGMT_NET_NAME)."""
        return self.prefix + "mgmt"

    @property
    def management_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.env["TINC_LAB_MGMT_NET"])

    def management_bridge(self) -> Tuple[str, bool]:
        """The management network's bridge, and whether its libvirt definition isolates every
        port (`<port isolated='yes'/>`)."""
        root = ElementTree.fromstring(virsh("net-dumpxml", self.management_network))
        isolated = [port.get("isolated") for port in root.findall("port")] == ["yes"]
        return root.find("bridge").get("name"), isolated

    def management_ports(self) -> Dict[str, bool]:
        """Each port (a VM's tap device) of the management bridge, with whether the kernel
        isolates it from the other ports (`bridge -d -j link show`)."""
        bridge, _ = self.management_bridge()
        out = subprocess.run(["bridge", "-d", "-j", "link", "show"], capture_output=True,
                             text=True, check=True).stdout
        return {port["ifname"]: port.get("isolated") is True for port in json.loads(out)
                if port.get("master") == bridge}

    def management_interface(self, machine: str) -> ManagementInterface:
        """The machine's interface on the management network, from `ip -o addr show` in it."""
        out = self.ssh(machine, "ip -o addr show").stdout
        return parse_management_interface(out, self.management_subnet)

    def rss_kib(self) -> Dict[str, int]:
        """Resident memory of each running VM's QEMU process, by domain name."""
        result = {}
        for pid in find_leftovers(self.prefix)["processes"]:
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
            name = next((a.split(b",")[0][len(b"guest="):].decode() for a in argv
                         if a.startswith(b"guest=")), pid)
            for line in Path("/proc", pid, "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    result[name] = int(line.split()[1])
        return result

    def cpu_seconds(self) -> Dict[str, float]:
        """CPU time (user + system) each running VM's QEMU process has used so far, by
        domain name: the work of the emulation, which a busy host stretches in wall time
        but not here."""
        result = {}
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in find_leftovers(self.prefix)["processes"]:
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
            name = next((a.split(b",")[0][len(b"guest="):].decode() for a in argv
                         if a.startswith(b"guest=")), pid)
            # the fields after the command's closing parenthesis: utime and stime are the
            # 12th and 13th of them (proc(5))
            fields = Path("/proc", pid, "stat").read_text().rsplit(")", 1)[1].split()
            result[name] = (int(fields[11]) + int(fields[12])) / ticks
        return result

    def destroy(self) -> Leftovers:
        """`vagrant destroy -f`; returns what it left behind (then removed here as well),
        and deletes the project copy. Idempotent."""
        if self.destroyed:
            return Leftovers(domains=[], networks=[], volumes=[], processes=[])
        try:
            self.vagrant("destroy", "-f", timeout=600, check=False)
            left = find_leftovers(self.prefix)
            remove_leftovers(left)
        finally:
            self.destroyed = True
            netlab.keep_past_exit(self)
            shutil.rmtree(self.project, ignore_errors=True)
            (LOCK_DIR / (self.run_id + ".lock")).unlink(missing_ok=True)
            self._lock.close()
        return left
