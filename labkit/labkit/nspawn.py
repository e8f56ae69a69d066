"""labkit.nspawn: booted Debian containers (systemd or SysV init) on the netlab topology.

No pytest in here (like labkit.netlab).

Root trees are made with ``mmdebstrap`` and cached as directories under ``CACHE_DIR`` (default
``/var/cache/tinc-bootstrap-tests``, env ``TINC_TEST_CACHE``), keyed by a hash of everything
that goes into them (suite, packages, hooks); a cache miss costs ~20-45 s per tree.
Each ``Container`` gets a fresh, empty overlay upper layer over its cached tree (the tree
itself is never written), and boots it with ``systemd-nspawn -b`` inside the network
namespace of an existing ``netlab.Host``
(``--network-namespace-path``): the container sees exactly the interfaces, addresses and
routes the topology gave that host, and nothing else. Booting the same tree again is a
reboot. Containers are shut down (cleanly, else killed) and their trees deleted in
``Container.destroy()``, and at interpreter exit for any still alive.

Network safety: the containers get no network but the test namespace (no veth to the
machine, no --network-* but the netns path); the only outside access is mmdebstrap's and
pip's while a cached tree is being built, as for any package install.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from labkit import netlab

CACHE_DIR = Path(os.environ.get("TINC_TEST_CACHE", "/var/cache/tinc-bootstrap-tests"))
SUITE = "bookworm"
FORMAT = 1  # bump to rebuild every cached tree

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_ENV = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8",
                 "TERM": "dumb", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
NODE_PACKAGES = ("tinc", "python3", "iproute2", "curl", "iputils-ping", "procps")
SYSTEMD_PACKAGES = ("systemd", "systemd-sysv", "dbus")
SYSV_PACKAGES = ("sysvinit-core", "initscripts")
HUB_VENV = "/opt/tinc-hub"


class RootfsSpec(NamedTuple):
    """What goes into a cached root tree."""
    label: str                      # readable part of the file name
    init: str                       # "systemd" or "sysv"
    packages: Tuple[str, ...]
    customize: Tuple[str, ...] = ()  # mmdebstrap --customize-hook commands ($1 = the root)

    def key(self) -> str:
        text = json.dumps([FORMAT, SUITE, sorted(self.packages), list(self.customize)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def tree(self) -> Path:
        return CACHE_DIR / "trees" / "{}-{}-{}".format(SUITE, self.label, self.key())


def systemd_node_spec() -> RootfsSpec:
    return RootfsSpec("systemd-node", "systemd", SYSTEMD_PACKAGES + NODE_PACKAGES)


def sysv_node_spec() -> RootfsSpec:
    # `halt -i` (NETDOWN=yes) would take down eth0, which belongs to the test bench's netns
    # and, unlike a real machine's network, is not configured again by the next boot.
    return RootfsSpec("sysv-node", "sysv", SYSV_PACKAGES + NODE_PACKAGES,
                      (r'sed -i "s/^NETDOWN=yes/NETDOWN=no/" "$1/etc/default/halt"',))


def hub_dependencies() -> List[str]:
    """The hub's runtime requirements from the root pyproject.toml."""
    import tomllib

    with open(netlab.REPO_ROOT / "pyproject.toml", "rb") as handle:
        return list(tomllib.load(handle)["project"]["dependencies"])


# what `pip install` of the hub's project reads: its pyproject.toml and the two package rooms
HUB_PROJECT_PARTS = ("pyproject.toml", "hub", "bootstrap")


HUB_SOURCE_DIR = "/root/tinc-hub-src"  # where a hub container gets the project to install


def copy_hub_project(dest: Path) -> None:
    """A copy of the hub's project (no caches or build output) at dest, for an offline install."""
    dest.mkdir(parents=True)
    junk = shutil.ignore_patterns("*.egg-info", "__pycache__", "build")
    for part in HUB_PROJECT_PARTS:
        source = netlab.REPO_ROOT / part
        if source.is_dir():
            shutil.copytree(source, dest / part, symlinks=False, ignore=junk)
        else:
            shutil.copy2(source, dest / part)


def stage_hub_project(container: "Container") -> None:
    """Put the hub's project into a stopped hub container (systemd_hub_spec) at HUB_SOURCE_DIR."""
    copy_hub_project(container.path(HUB_SOURCE_DIR))


NET_SYSCTL_UNIT = "labkit-net-sysctl-writable.service"


def make_net_sysctls_writable(container: "Container") -> None:
    """Into a stopped systemd container: a unit that makes /proc/sys/net writable early at
    every boot, as on a real machine (net.ipv4.ip_forward). systemd-nspawn 252 mounts it
    read-only unless --private-network (not with --network-namespace-path; a --bind of it
    stays under the read-only /proc/sys); the container's CAP_SYS_ADMIN remounts it, and it
    shows the container's own network namespace (the netlab host's)."""
    container.write_file("/etc/systemd/system/" + NET_SYSCTL_UNIT, "\n".join([
        "[Unit]",
        "Description=labkit: /proc/sys/net writable (a network namespace of the test's own)",
        "DefaultDependencies=no",
        "Before=sysinit.target systemd-sysctl.service",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStart=/bin/sh -c 'mount --bind /proc/sys/net /proc/sys/net"
        " && mount -o remount,bind,rw /proc/sys/net'",
        "",
        "[Install]",
        "WantedBy=sysinit.target",
    ]) + "\n")
    link = container.path("/etc/systemd/system/sysinit.target.wants/" + NET_SYSCTL_UNIT)
    link.symlink_to("/etc/systemd/system/" + NET_SYSCTL_UNIT)


def install_hub(container: "Container", timeout: float = 300) -> None:
    """In the running hub container: pip install the staged project into HUB_VENV, offline
    (its dependencies are in the venv already), and put `tinc-hub` on PATH."""
    container.run([HUB_VENV + "/bin/pip", "install", "-q", "--no-index", "--no-deps",
                   "--no-build-isolation", HUB_SOURCE_DIR], timeout=timeout)
    container.run(["ln", "-sf", HUB_VENV + "/bin/tinc-hub", "/usr/local/bin/tinc-hub"])


CONTAINER_PYTHON = "3.11"  # bookworm's python3: the hub's wheels are fetched for it
_MANYLINUX = ["manylinux2014_x86_64"] + ["manylinux_2_%d_x86_64" % v for v in range(17, 37)]


def hub_requirements() -> List[str]:
    return hub_dependencies() + ["setuptools>=61", "wheel"]


def ensure_hub_wheelhouse(log_dir: Path) -> Path:
    """Wheels of the hub's dependencies for the container's python, fetched by this machine's
    pip (its index and certificates) once, cached by requirement list."""
    requirements = hub_requirements()
    key = hashlib.sha256(json.dumps([FORMAT, CONTAINER_PYTHON, requirements]).encode())
    target = CACHE_DIR / ("wheels-" + key.hexdigest()[:16])
    CACHE_DIR.mkdir(parents=True, exist_ok=True)  # the first thing built on a fresh machine
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".part-", dir=str(CACHE_DIR)))
        cmd = [str(netlab.VENV / "bin" / "pip"), "download", "-q", "-d", str(tmp),
               "--only-binary=:all:", "--python-version", CONTAINER_PYTHON,
               "--implementation", "cp"]
        cmd += [arg for plat in _MANYLINUX for arg in ("--platform", plat)] + requirements
        log_path = log_dir / "pip-download-hub.log"
        with open(log_path, "wb") as log:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=600)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise netlab.CommandError(cmd, proc.returncode, "",
                                      log_path.read_text(errors="replace"), "root")
        os.rename(tmp, target)
    return target


def systemd_hub_spec(log_dir: Path) -> RootfsSpec:
    """A systemd tree with a venv at HUB_VENV holding the hub's dependencies (installed
    offline from the wheelhouse), so that the hub itself installs offline in the container."""
    return _hub_spec(log_dir, "systemd-hub", ())


def systemd_nft_hub_spec(log_dir: Path) -> RootfsSpec:
    """systemd_hub_spec plus the nftables package (nft, nftables.service; tinc-hub expose),
    in a cache entry of its own: systemd_hub_spec's tree, which other runs may be using,
    keeps its key (a changed key makes ensure_rootfs delete the superseded tree)."""
    return _hub_spec(log_dir, "systemd-nft-hub", ("nftables",))


def _hub_spec(log_dir: Path, label: str, extra_packages: Tuple[str, ...]) -> RootfsSpec:
    wheels = ensure_hub_wheelhouse(log_dir)
    requirements = " ".join("'{}'".format(r) for r in hub_requirements())
    return RootfsSpec(label, "systemd",
                      SYSTEMD_PACKAGES + NODE_PACKAGES + ("python3-venv",) + extra_packages,
                      ('chroot "$1" python3 -m venv ' + HUB_VENV,
                       "copy-in {} /tmp".format(wheels),
                       'env -u PIP_FIND_LINKS -u PIP_CERT chroot "$1" {}/bin/pip install -q '
                       '--disable-pip-version-check --no-index --find-links /tmp/{} {}'.format(
                           HUB_VENV, wheels.name, requirements),
                       'rm -rf "$1/tmp/{}"'.format(wheels.name)))


def ensure_rootfs(spec: RootfsSpec, log_dir: Path) -> Path:
    """The cached root tree of spec (a directory, used read-only as the lower layer of each
    container's overlay), built with mmdebstrap when missing, under a lock."""
    target = spec.tree()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "etc" / "os-release").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        tmp = target.with_name(target.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = ["mmdebstrap", "--variant=apt", "--format=directory",
               "--include=" + ",".join(spec.packages)]
        cmd += ["--customize-hook=" + hook for hook in spec.customize]
        cmd += [SUITE, str(tmp)]
        log_path = log_dir / ("mmdebstrap-%s.log" % spec.label)
        with open(log_path, "wb") as log:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=900)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise netlab.CommandError(cmd, proc.returncode, "", log_path.read_text(
                errors="replace"), "root")
        os.rename(tmp, target)
        # exactly SUITE-label-KEY: a label that begins with this one ("systemd-hub" and a
        # "systemd-hub-x") is another tree
        superseded = re.compile(r"{}-{}-[0-9a-f]{{16}}".format(re.escape(SUITE),
                                                             re.escape(spec.label)))
        for old in target.parent.glob("{}-{}-*".format(SUITE, spec.label)):
            if old.is_dir() and old != target and superseded.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)  # a superseded key
                Path(str(old) + ".lock").unlink(missing_ok=True)
    return target


class Container:
    """A booted Debian tree in the network namespace of a netlab Host."""

    def __init__(self, name: str, spec: RootfsSpec, host: "netlab.Host", workdir: Path,
                 hostname: Optional[str] = None, binds: Sequence[Tuple[str, str]] = ()) -> None:
        """binds: (host directory, path inside) pairs bind-mounted read-write at every boot
        (e.g. a labkit.postgres socket dir); plain absolute paths only (nspawn's --bind
        syntax gives ':' and ',' a meaning)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", name):
            raise ValueError("bad machine name %r" % name)
        for path in (p for pair in binds for p in pair):
            if not re.fullmatch(r"(/[A-Za-z0-9_.+-]+)+", path) or "/../" in path + "/":
                raise ValueError("bad bind path %r" % path)
        self.binds = list(binds)
        self.name = name
        self.spec = spec
        self.host = host
        self.hostname = hostname or host.name
        self.workdir = Path(workdir)
        self.lower: Optional[Path] = None   # the cached tree (read-only)
        self.layers: Optional[Path] = None  # upper/, work/ and the mount point root/
        self.nspawn: Optional[subprocess.Popen] = None
        self.boots = 0
        self.boot_started = 0.0  # monotonic time of the last boot's start
        self._init_pid: Optional[int] = None

    def __repr__(self) -> str:
        return "<Container %s (%s) init=%s>" % (self.name, self.spec.init, self._init_pid)

    # -- the tree ---------------------------------------------------------------------------
    def create(self) -> None:
        """A fresh, empty upper layer over the cached tree; name the machine."""
        self.lower = ensure_rootfs(self.spec, self.workdir)
        self.layers = Path(tempfile.mkdtemp(prefix="layers-%s-" % self.name, dir=self.workdir))
        netlab.remove_at_exit(self, "container " + self.name, self.destroy)
        for part in ("upper", "work", "root"):
            (self.layers / part).mkdir()
        self.write_file("/etc/hostname", self.hostname + "\n")
        self.write_file("/etc/hosts", "127.0.0.1 localhost\n127.0.1.1 %s\n" % self.hostname)

    def path(self, inside: str) -> Path:
        """Host path (in the upper layer) where a file put while the container is stopped
        appears inside it; parent directories are created as needed."""
        assert self.layers is not None
        target = self.layers / "upper" / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_file(self, inside: str, text: str) -> None:
        self.path(inside).write_text(text)

    # -- booting ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start booting (returns at once; see wait_ready)."""
        if self.layers is None:
            self.create()
        if self.running():
            raise RuntimeError("%s is already running" % self.name)
        self.boots += 1
        log = self.workdir / ("%s.boot%d.log" % (self.name, self.boots))
        # The overlay is mounted in a mount namespace of nspawn's own (unshare, then exec):
        # it vanishes with nspawn, whatever happens to this process.
        mount = ('mount -t overlay "nspawn-$1" -o "lowerdir=$2,upperdir=$3/upper,'
                 'workdir=$3/work" "$3/root" && shift 3 && exec "$@"')
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh",
               self.name, str(self.lower), str(self.layers)]
        cmd += ["systemd-nspawn", "-D", str(self.layers / "root"), "-M", self.name,
                "--register=no", "--keep-unit",
                "--network-namespace-path=/run/netns/" + self.host.netns,
                "--bind=/dev/net/tun", "--capability=CAP_NET_ADMIN", "--console=read-only",
                "--resolv-conf=off", "--timezone=off", "--link-journal=no", "-b"]
        cmd[-1:-1] = ["--bind=%s:%s" % pair for pair in self.binds]
        self._init_pid = None
        self.boot_started = time.monotonic()
        with open(log, "wb") as out:
            self.nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, env=netlab._root_env())

    def boot_log(self) -> str:
        log = self.workdir / ("%s.boot%d.log" % (self.name, self.boots))
        return log.read_text(errors="replace") if log.exists() else ""

    def running(self) -> bool:
        return self.nspawn is not None and self.nspawn.poll() is None

    def init_pid(self, timeout: float = 20) -> int:
        """PID (in our namespace) of the container's init: the child of systemd-nspawn."""
        if self._init_pid is not None and netlab.pid_alive(self._init_pid):
            return self._init_pid

        def find() -> Optional[int]:
            if not self.running():
                raise RuntimeError("container %s is not running:\n%s"
                                   % (self.name, netlab._tail(self.boot_log(), 30)))
            assert self.nspawn is not None
            try:
                with open("/proc/%d/task/%d/children" % (self.nspawn.pid, self.nspawn.pid)) as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                return None
            for pid in kids:
                try:
                    with open("/proc/%d/comm" % pid) as f:
                        if f.read().strip() in ("systemd", "init"):
                            return pid
                except OSError:
                    pass
            return None

        self._init_pid = netlab.wait_until(find, timeout, 0.02,
                                           what="init of container %s" % self.name)
        return self._init_pid

    def wait_ready(self, timeout: float = 60) -> float:
        """Wait until boot finished (systemd: is-system-running; SysV: runlevel 2 reached and
        its rc scripts done). Returns seconds since the boot started."""
        deadline = time.monotonic() + timeout
        self.init_pid(timeout)
        if self.spec.init == "systemd":
            def settled() -> str:
                # "" or "offline" until systemd answers on its socket; then --wait blocks
                # while it is "initializing" or "starting"
                left = max(1.0, deadline - time.monotonic())
                state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                                 timeout=left).stdout.strip()
                return "" if state == "offline" else state
            state = netlab.wait_until(settled, max(1.0, deadline - time.monotonic()), 0.1)
            if state not in ("running", "degraded"):
                raise RuntimeError("container %s: system state %r\n%s"
                                   % (self.name, state, self.diagnostics()))
        else:
            def booted() -> bool:
                level = self.run(["runlevel"], check=False).stdout.split()
                if level[-1:] != ["2"]:
                    return False
                procs = self.run(["ps", "-eo", "args"], check=False).stdout
                return not re.search(r"(?m)^(/bin/sh )?/etc/init\.d/rc\b", procs)
            netlab.wait_until(booted, max(1.0, deadline - time.monotonic()), 0.1,
                              what="SysV boot of %s" % self.name)
        return time.monotonic() - self.boot_started

    def boot(self, timeout: float = 60) -> float:
        self.start()
        return self.wait_ready(timeout)

    def poweroff(self, timeout: float = 30) -> None:
        """Clean shutdown (systemd: SIGRTMIN+4 to init; SysV: telinit 0); killed if it hangs."""
        if not self.running():
            return
        assert self.nspawn is not None
        try:
            pid = self.init_pid(5)
            if self.spec.init == "systemd":
                os.kill(pid, signal.SIGRTMIN + 4)
            else:
                self.run(["telinit", "0"], check=False, timeout=10)
            self.nspawn.wait(timeout=timeout)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, netlab.CommandError):
            self.kill()
            raise RuntimeError("container %s did not power off within %ss; killed"
                               % (self.name, timeout))
        finally:
            self._init_pid = None

    def kill(self) -> None:
        """SIGKILL the container's init (the kernel then kills its whole PID namespace)."""
        if not self.running():
            return
        assert self.nspawn is not None
        try:
            os.kill(self.init_pid(2), signal.SIGKILL)
        except (RuntimeError, TimeoutError, ProcessLookupError):
            pass
        try:
            self.nspawn.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()  # our own child
            self.nspawn.wait(timeout=10)

    def reboot(self, timeout: float = 60) -> float:
        """Power off, then boot the same tree again. Returns seconds from boot start to ready."""
        self.poweroff()
        return self.boot(timeout)

    def detach(self) -> None:
        """Leave the container running past this process (./lab up): no destroy at exit."""
        netlab.keep_past_exit(self)

    def destroy(self) -> None:
        """Shut down (or kill) and delete the tree."""
        try:
            try:
                self.poweroff(timeout=20)
            except RuntimeError:
                pass
        finally:
            self.kill()
            if self.layers is not None:
                shutil.rmtree(self.layers, ignore_errors=True)
                self.layers = None
            netlab.keep_past_exit(self)

    # -- running things inside ----------------------------------------------------------------
    def argv(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None) -> List[str]:
        environment = dict(CONTAINER_ENV, **(env or {}))
        # (nsenter --wd would resolve the directory outside the container: env -C instead)
        return (["nsenter", "-t", str(self.init_pid()), "-m", "-u", "-i", "-n", "-p",
                 "--", "env", "-i", "-C", "/root"]
                + ["%s=%s" % item for item in sorted(environment.items())]
                + [str(c) for c in netlab._argv(cmd)])

    def run(self, cmd, timeout: float = 60, check: bool = True,
            env: Optional[Dict[str, str]] = None,
            input: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run cmd (list, or str for sh -c) inside the container as root."""
        argv = self.argv(cmd, env)
        try:
            proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=timeout, text=True,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise netlab.CommandError(netlab._argv(cmd), None, exc.stdout, exc.stderr,
                                      self.name, timeout) from None
        if check and proc.returncode != 0:
            raise netlab.CommandError(netlab._argv(cmd), proc.returncode, proc.stdout,
                                      proc.stderr, self.name)
        return proc

    def ping(self, address: str) -> bool:
        return self.run(["ping", "-n", "-q", "-c", "1", "-W", "1", address], check=False,
                        timeout=10).returncode == 0

    def wait_ping(self, address: str, timeout: float) -> Optional[float]:
        """Ping until address answers; seconds since the boot started, or None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(address):
                return time.monotonic() - self.boot_started
            time.sleep(0.2)
        return None

    def unit_state(self, verb: str, unit: str) -> str:
        """`systemctl is-enabled|is-active UNIT`."""
        return self.run(["systemctl", verb, unit], check=False).stdout.strip()

    def diagnostics(self) -> str:
        """Boot log tail, failed units, tinc's journal, processes (for failure messages)."""
        out = ["===== container %s (%s init, %s boots) =====" % (self.name, self.spec.init,
                                                                   self.boots),
               "--- boot log (tail) ---", netlab._tail(self.boot_log(), 40)]
        if self.running():
            out += netlab.command_outputs(self, (
                ["ps", "-eo", "pid,args"], ["ip", "-br", "addr"],
                "systemctl --failed --no-legend 2>/dev/null; "
                "journalctl -b --no-pager -n 60 -u 'tinc*' 2>/dev/null; "
                "tail -n 30 /var/log/tinc-bootstrap.log /var/log/syslog 2>/dev/null; true"),
                timeout=15)
        return "\n".join(out)


@contextmanager
def booted(containers: Sequence["Container"], hub: Optional["Container"] = None,
           ready_timeout: float = 90,
           created: Optional[Callable[[], None]] = None) -> Iterator[Dict[str, float]]:
    """Create every container (the hub's project staged into ``hub``; then ``created()``),
    boot them all, wait until each is ready; yields {hostname: seconds from start until ready}. At exit, pass or
    fail, every container made is destroyed (in reverse), and a failed cleanup is raised."""
    made: List["Container"] = []
    try:
        for container in containers:
            made.append(container)
            container.create()
        if hub is not None:
            stage_hub_project(hub)
        if created is not None:
            created()
        for container in made:
            container.start()
        yield {container.hostname: container.wait_ready(ready_timeout) for container in made}
    finally:
        errors = []
        for container in reversed(made):
            try:
                container.destroy()
            except Exception as exc:
                errors.append("%s: %s" % (container.name, exc))
        if errors:
            raise RuntimeError("container cleanup: " + "; ".join(errors))
