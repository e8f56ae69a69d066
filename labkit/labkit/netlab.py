"""labkit.netlab: network-namespace test bed for tinc-hub (used by the tests, bench/ and ./lab).

No pytest in here: ./lab imports this module too.

Model
-----
A ``Host`` is a network namespace plus a private mount (and UTS) namespace. Inside the mount
namespace tmpfs is mounted over ``/run`` (so ``/var/run/tinc.NET.pid`` is private; /var/run is
a symlink to /run), ``/etc/tinc``, ``/var/lib/tinc-hub`` and ``/var/log``; ``/etc`` and
``/var/lib`` are additionally overlay-mounted (private copy-on-write), so that code under test
which registers boot services or writes elsewhere in /etc cannot touch the real machine. The
repository and its venv stay visible. A long-lived anchor process (``sleep infinity``) holds the
namespaces; every command runs as ``nsenter -t ANCHOR -m -u -n -- cmd``, so code under test
uses the real paths (/etc/tinc/NET ...) as on a real machine.

``build_nat_topology(n)`` builds::

    hub (192.0.2.1/24, no default route)
      |  "public" 192.0.2.0/24
    router (192.0.2.254 / 198.51.100.1; ip_forward=1 here only; nft masquerade LAN -> public;
      |     forward policy drop except LAN -> public and replies)
      |  LAN 198.51.100.0/24 (bridge br-lan in the router namespace, one veth per node)
    node1 198.51.100.2, node2 198.51.100.3, ... (default route via 198.51.100.1)

With ``hub_names=[...]`` the public segment is a bridge (pub0 in the router) with one port
per hub, hubs at 192.0.2.1, .2, ... (labkit.multihub builds on it).

Nothing is connected to the root namespace. ``Topology.close()`` kills every process in every
namespace it made and deletes the namespaces (which destroys their veths). Live topologies are
also closed at interpreter exit (``remove_at_exit``: the one at-exit list, nspawn uses it too).

Network safety: all test traffic stays on loopback or inside namespaces made here; all waits are
bounded.
"""

import argparse
import atexit
import base64
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bootstrap.bootstrap import DEFAULT_API_PORT, pid_file_paths

REPO_ROOT = Path(__file__).resolve().parents[2]  # labkit/labkit/netlab.py
VENV = REPO_ROOT / ".venv"
TINC_HUB = VENV / "bin" / "tinc-hub"
BOOTSTRAP_PY = REPO_ROOT / "bootstrap" / "bootstrap.py"

PUBLIC_NET = ipaddress.ip_network("192.0.2.0/24")
LAN_NET = ipaddress.ip_network("198.51.100.0/24")
HUB_PUBLIC = "192.0.2.1"
ROUTER_PUBLIC = "192.0.2.254"
ROUTER_LAN = "198.51.100.1"
API_PORT = DEFAULT_API_PORT

# The environment every command inside a host gets (plus what the caller passes): what root
# has on a plain machine, not whatever the test runner happens to have (venv, pyenv, pytest).
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_ENV = {"PATH": HOST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

_NS_RE = re.compile(r"^tb(\d+)[0-9a-f]{4}-")


class CommandError(RuntimeError):
    """A command failed (non-zero exit or timeout)."""

    def __init__(self, cmd, returncode, stdout="", stderr="", where="root", timeout=None):
        self.cmd = list(cmd) if not isinstance(cmd, str) else [cmd]
        self.returncode = returncode
        self.stdout = _text(stdout)
        self.stderr = _text(stderr)
        self.where = where
        self.timeout = timeout
        super().__init__(str(self))

    def __str__(self):
        head = "timed out after %ss" % self.timeout if self.timeout else "exit %s" % self.returncode
        msg = "command %s in %s: %s" % (head, self.where, shlex.join(str(c) for c in self.cmd))
        if self.stderr.strip():
            msg += "\n--- stderr ---\n" + _tail(self.stderr)
        if self.stdout.strip():
            msg += "\n--- stdout ---\n" + _tail(self.stdout)
        return msg


def _text(b):
    if b is None:
        return ""
    if isinstance(b, bytes):
        return b.decode("utf-8", "replace")
    return b


def command_outputs(runner, commands, timeout):
    """stdout+stderr of each command run by runner (a Host or a Container), for failure
    messages: a command that cannot run leaves its error instead."""
    out = []
    for cmd in commands:
        try:
            cp = runner.run(cmd, check=False, timeout=timeout)
            out.append(cp.stdout.rstrip() + cp.stderr.rstrip())
        except Exception as e:
            out.append("(%s)" % e)
    return out


def _tail(text, lines=60):
    parts = text.rstrip("\n").splitlines()
    if len(parts) > lines:
        parts = ["[... %d lines cut ...]" % (len(parts) - lines)] + parts[-lines:]
    return "\n".join(parts)


def _argv(cmd):
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    return [str(c) for c in cmd]


def _root_env():
    env = dict(os.environ)
    path = env.get("PATH", "").split(":")
    env["PATH"] = ":".join(path + [d for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
                                   if d not in path])
    return env


def run_root(cmd, timeout=30, check=True, input=None, text=True):
    """Run a command in the root namespaces (only used for ip netns add/del and ip -n)."""
    argv = _argv(cmd)
    try:
        cp = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            timeout=timeout, text=text, env=_root_env(),
                            stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, None, e.stdout, e.stderr, "root", timeout) from None
    if check and cp.returncode != 0:
        raise CommandError(argv, cp.returncode, cp.stdout, cp.stderr, "root")
    return cp


def wait_until(predicate, timeout, interval=0.1, what=None):
    """Poll predicate() until truthy or timeout. Returns its last value (falsy on timeout),
    or raises TimeoutError when `what` is given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if what:
                raise TimeoutError("timed out after %ss waiting for %s" % (timeout, what))
            return value
        time.sleep(interval)


def pid_alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, OSError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def netns_exists(name):
    return os.path.exists("/run/netns/" + name)


def netns_pids(name):
    if not netns_exists(name):
        return []
    cp = run_root(["ip", "netns", "pids", name], check=False, timeout=10)
    return [int(p) for p in cp.stdout.split() if p.strip().isdigit()]


def _signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_namespace_processes(netns, grace=3.0, spare=None, reap=None):
    """SIGTERM every process in network namespace netns but `spare` (a host's anchor), then
    SIGKILL what is still there after `grace` s. `reap` polls our own children (no zombies).
    Every process in a namespace made here was started here; every wait is bounded."""
    def left():
        return [p for p in netns_pids(netns) if p != spare and pid_alive(p)]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = left()
        if not pids:
            break
        _signal_all(pids, sig)
        if reap:
            reap()
        wait_until(lambda: not left(), wait, 0.05)
    if reap:
        reap()


def remove_namespace(netns, grace=3.0, anchor=None, reap=None):
    """Stop everything in network namespace netns (its anchor last), then delete it: the one
    teardown of a namespace (Host.close, cleanup_stale, `lab down`)."""
    stop_namespace_processes(netns, grace, spare=anchor, reap=reap)
    _signal_all(netns_pids(netns), signal.SIGKILL)  # the anchor and any straggler

    def empty():
        if reap:
            reap()
        return not netns_pids(netns)

    wait_until(empty, 5, 0.05)
    if netns_exists(netns):
        run_root(["ip", "netns", "del", netns], check=False)


class Proc:
    """A background process inside a host; output goes to a log file."""

    def __init__(self, host, argv, popen, log_path):
        self.host = host
        self.argv = argv
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path

    def __repr__(self):
        return "<Proc %s in %s pid=%s>" % (shlex.join(self.argv), self.host.name, self.pid)

    def poll(self):
        return self.popen.poll()

    @property
    def returncode(self):
        return self.popen.returncode

    def wait(self, timeout):
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CommandError(self.argv, None, self.output(), "", self.host.name, timeout) from None

    def output(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout=5):
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
            except ProcessLookupError:
                pass
        return self.popen.returncode


_ANCHOR_SCRIPT = r"""
set -e
mount -t tmpfs -o mode=0755 netlab-run /run
mkdir -p /run/.netlab
if [ "$NETLAB_PRIVATE_ETC" = 1 ]; then
  for d in etc var/lib; do
    key=$(echo "$d" | tr / _)
    mkdir -p "/run/.netlab/$key/upper" "/run/.netlab/$key/work"
    mount -t overlay "netlab-$key" \
      -o "lowerdir=/$d,upperdir=/run/.netlab/$key/upper,workdir=/run/.netlab/$key/work" "/$d" \
      || echo "netlab: warning: could not overlay /$d; it is shared with the machine" >&2
  done
fi
mkdir -p /etc/tinc /var/lib/tinc-hub /var/log
mount -t tmpfs -o mode=0755 netlab-tinc /etc/tinc
mount -t tmpfs -o mode=0755 netlab-hubstate /var/lib/tinc-hub
mount -t tmpfs -o mode=0755 netlab-log /var/log
echo "$NETLAB_HOSTNAME" > /proc/sys/kernel/hostname
ip link set lo up
exec sleep infinity
"""


class Host:
    """A network namespace + private mount/UTS namespace, held by an anchor process."""

    def __init__(self, name, netns, workdir, private_etc=True):
        self.name = name
        self.netns = netns
        self.workdir = Path(workdir)
        self.private_etc = private_etc
        self.anchor = None
        self.anchor_pid = None
        self.procs = []
        self.addresses = {}  # label -> address, filled by the topology
        self._log_seq = 0

    def __repr__(self):
        return "<Host %s netns=%s anchor=%s>" % (self.name, self.netns, self.anchor_pid)

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout=10):
        run_root(["ip", "netns", "add", self.netns])
        env = dict(HOST_ENV, NETLAB_HOSTNAME=self.name[:63],
                   NETLAB_PRIVATE_ETC="1" if self.private_etc else "0")
        errlog = self.workdir / ("%s.anchor.log" % self.name)
        with open(errlog, "wb") as err:
            self.anchor = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts",
                 "--propagation", "private", "sh", "-c", _ANCHOR_SCRIPT],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
        self.anchor_pid = self.anchor.pid

        def ready():
            if self.anchor.poll() is not None:
                raise CommandError(self.anchor.args, self.anchor.returncode, "",
                                   errlog.read_text(errors="replace"), self.name)
            try:
                with open("/proc/%d/comm" % self.anchor_pid) as f:
                    return f.read().strip() == "sleep"
            except OSError:
                return False

        wait_until(ready, timeout, 0.02, what="anchor of host %s" % self.name)
        warn = errlog.read_text(errors="replace").strip()
        if warn:
            sys.stderr.write(warn + "\n")

    def _check_anchor(self):
        # The anchor is our child and is only reaped in close(), so its pid cannot be reused
        # while this object lives: nsenter never enters a stranger's namespaces.
        if self.anchor_pid is None or not pid_alive(self.anchor_pid):
            raise RuntimeError("host %s is not running (anchor gone)" % self.name)

    def pids(self):
        return netns_pids(self.netns)

    def kill_all(self, grace=3.0):
        """Kill every process in this host's network namespace but its anchor."""
        stop_namespace_processes(self.netns, grace, spare=self.anchor_pid,
                                 reap=self._reap_children)

    def _reap_children(self):
        if self.anchor is not None:
            self.anchor.poll()
        for proc in self.procs:
            proc.popen.poll()

    def close(self):
        """Stop every process in the host (the anchor last) and delete its namespace."""
        anchor = self.anchor_pid if self.anchor is not None else None
        remove_namespace(self.netns, anchor=anchor, reap=self._reap_children)
        if self.anchor is None:
            return
        for popen in [self.anchor] + [proc.popen for proc in self.procs]:
            try:
                popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.anchor = None

    # -- running things ---------------------------------------------------------------------
    def nsenter_argv(self, cmd, cwd=None):
        self._check_anchor()
        pre = ["nsenter", "-t", str(self.anchor_pid), "-m", "-u", "-n"]
        if cwd:
            pre.append("--wd=%s" % cwd)
        return pre + ["--"] + _argv(cmd)

    def _env(self, env):
        e = dict(HOST_ENV)
        if env:
            e.update({k: str(v) for k, v in env.items()})
        return e

    def run(self, cmd, timeout=60, env=None, input=None, check=True, cwd=None, text=True):
        """Run cmd (list, or str for sh -c) inside the host. Raises CommandError on failure."""
        argv = self.nsenter_argv(cmd, cwd)
        try:
            cp = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=None if input is not None else subprocess.DEVNULL,
                                timeout=timeout, env=self._env(env), text=text)
        except subprocess.TimeoutExpired as e:
            raise CommandError(_argv(cmd), None, e.stdout, e.stderr, self.name, timeout) from None
        if check and cp.returncode != 0:
            raise CommandError(_argv(cmd), cp.returncode, cp.stdout, cp.stderr, self.name)
        return cp

    def popen(self, cmd, env=None, cwd=None, log=None):
        """Start cmd in the background; stdout+stderr go to a log file (Proc.output())."""
        argv = self.nsenter_argv(cmd, cwd)
        self._log_seq += 1
        if log is None:
            base = os.path.basename(_argv(cmd)[0]) or "proc"
            log = "%s.%02d.%s.log" % (self.name, self._log_seq, re.sub(r"[^\w.-]", "_", base))
        log_path = self.workdir / log
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=self._env(env))
        proc = Proc(self, _argv(cmd), popen, log_path)
        self.procs.append(proc)
        return proc

    def ping(self, addr, count=1, timeout=1, interval=None):
        """True when at least one of `count` pings to addr got a reply (ping's rc 0)."""
        cmd = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout)]
        if interval is not None:
            cmd += ["-i", str(interval)]
        cp = self.run(cmd + [str(addr)], check=False, timeout=count * (timeout + 1) + 5)
        return cp.returncode == 0

    def wait_ping(self, addr, timeout=30, interval=0.2):
        """Ping addr until it answers or the deadline passes. Returns bool."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ping(addr, 1, 1):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def wait_no_ping(self, addr, timeout=10, confirm=3):
        """Ping addr until `confirm` consecutive pings fail, the first of them sent within
        `timeout` s. Returns the seconds from now to that first failed ping, or None."""
        start = time.monotonic()
        first_fail = None
        fails = 0
        while True:
            sent = time.monotonic() - start
            if first_fail is None and sent > timeout:
                return None
            if self.ping(addr, 1, 1):
                fails, first_fail = 0, None
                time.sleep(0.2)
            else:
                if first_fail is None:
                    first_fail = sent
                fails += 1
                if fails >= confirm:
                    return first_fail

    # -- files --------------------------------------------------------------------------------
    def read_file(self, path, timeout=10):
        return self.run(["cat", "--", path], timeout=timeout).stdout

    def read_bytes(self, path, timeout=10):
        return self.run(["cat", "--", path], timeout=timeout, text=False).stdout

    def exists(self, path):
        return self.run(["test", "-e", path], check=False).returncode == 0

    def write_file(self, path, text, mode=0o644, parents=True):
        script = 'umask 077; [ "$3" = 1 ] && mkdir -p -- "$(dirname -- "$1")"; ' \
                 'cat > "$1" && chmod "$2" -- "$1"'
        data = text.encode() if isinstance(text, str) else text
        self.run(["sh", "-c", script, "sh", path, "%o" % mode, "1" if parents else "0"],
                 input=data, text=False)

    def sysctl(self, key, value):
        """Set a sysctl inside the host (written to /proc/sys: no procps needed)."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", 'echo "$2" > "$1"', "sh", path, str(value)])
        return self.read_file(path).strip()

    def append_file(self, path, text):
        self.run(["sh", "-c", 'cat >> "$1"', "sh", path], input=text)

    def snapshot(self, root):
        """{relative path: (sha256, size, mode, mtime_ns)} of every file/symlink under root."""
        code = (
            "import hashlib,json,os,stat,sys\n"
            "r=sys.argv[1]; out={}\n"
            "for d,ds,fs in os.walk(r):\n"
            "  for n in ds+fs:\n"
            "    p=os.path.join(d,n); st=os.lstat(p); rel=os.path.relpath(p,r)\n"
            "    if stat.S_ISREG(st.st_mode):\n"
            "      h=hashlib.sha256(open(p,'rb').read()).hexdigest()\n"
            "    elif stat.S_ISLNK(st.st_mode): h='->'+os.readlink(p)\n"
            "    else: h='dir'\n"
            "    out[rel]=[h,st.st_size if h!='dir' else 0,oct(st.st_mode),st.st_mtime_ns if h!='dir' else 0]\n"
            "print(json.dumps(out,sort_keys=True))\n")
        cp = self.run(["python3", "-c", code, root])
        return {k: tuple(v) for k, v in json.loads(cp.stdout).items()}

    def read_pidfile(self, path):
        try:
            return int(self.read_file(path).split()[0])
        except (CommandError, ValueError, IndexError):
            return None

    def listening(self, port, proto="tcp"):
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        cp = self.run(["ss", flag, "sport = :%d" % port], check=False)
        return cp.returncode == 0 and bool(cp.stdout.strip())

    def wait_listening(self, port, timeout=10, proto="tcp"):
        wait_until(lambda: self.listening(port, proto), timeout, 0.05,
                   what="%s port %d listening in %s" % (proto, port, self.name))

    def interfaces(self):
        cp = self.run(["ip", "-j", "addr", "show"])
        return json.loads(cp.stdout)

    def iface_of(self, addr):
        """Name of the interface holding IPv4 addr, or None."""
        for link in self.interfaces():
            for a in link.get("addr_info", []):
                if a.get("local") == str(addr):
                    return link["ifname"]
        return None

    def rx_packets(self, ifname):
        return int(self.read_file("/sys/class/net/%s/statistics/rx_packets" % ifname).strip())

    def shell_command(self):
        """argv that gives an interactive shell in this host."""
        return self.nsenter_argv(["bash", "-l"] if shutil.which("bash") else ["sh"])


# The one at-exit cleanup list of labkit: what this process made and has not removed yet
# (topologies here, booted containers in labkit.nspawn), newest first at exit.
_AT_EXIT = {}  # owner -> (what, remove); insertion-ordered
_AT_EXIT_LOCK = threading.Lock()


def remove_at_exit(owner, what, remove):
    """Call remove() at interpreter exit unless keep_past_exit(owner) came first. The newest
    goes first: a container before the namespace it lives in."""
    with _AT_EXIT_LOCK:
        _AT_EXIT[owner] = (what, remove)


def keep_past_exit(owner):
    """Forget owner: removed already, or left running on purpose (./lab up)."""
    with _AT_EXIT_LOCK:
        _AT_EXIT.pop(owner, None)


def _remove_all_at_exit():
    with _AT_EXIT_LOCK:
        live = list(_AT_EXIT.values())
    for what, remove in reversed(live):
        try:
            remove()
        except Exception as e:  # pragma: no cover - best effort at exit
            sys.stderr.write("labkit: cleanup of %s failed: %s\n" % (what, e))


atexit.register(_remove_all_at_exit)


class Topology:
    """A set of hosts with a common unique prefix. Context manager; close() cleans all."""

    def __init__(self, prefix=None, private_etc=True, keep_workdir=False):
        self.prefix = prefix or "tb%d%s" % (os.getpid(), secrets.token_hex(2))
        self.private_etc = private_etc
        self.keep_workdir = keep_workdir
        self.hosts = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="netlab-%s-" % self.prefix))
        self.closed = False
        remove_at_exit(self, "topology " + self.prefix, self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __getitem__(self, name):
        return self.hosts[name]

    def netns_names(self):
        return [h.netns for h in self.hosts.values()]

    def add_host(self, name):
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", name) or name in self.hosts:
            raise ValueError("bad or duplicate host name %r" % name)
        host = Host(name, "%s-%s" % (self.prefix, name), self.workdir, self.private_etc)
        self.hosts[name] = host
        host.start()
        return host

    def detach(self):
        """Leave the namespaces and their processes running past this process (./lab up):
        close() and the exit-time cleanup no longer touch them."""
        self.closed = True
        keep_past_exit(self)

    def close(self):
        """Kill every process in every namespace made here and delete the namespaces."""
        if self.closed:
            return
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # do not abort half-way
        try:
            errors = []
            for host in reversed(list(self.hosts.values())):
                try:
                    host.close()
                except Exception as e:
                    errors.append("%s: %s" % (host.name, e))
            left = [h.netns for h in self.hosts.values() if netns_exists(h.netns)]
            if left:
                errors.append("namespaces still present: %s" % left)
            self.closed = True
            keep_past_exit(self)
            if not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            if errors:
                raise RuntimeError("netlab cleanup: " + "; ".join(errors))
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def netlab_diagnostics(self):
        return self.diagnostics()

    def diagnostics(self):
        """Text describing the state of every host (for failure messages)."""
        out = []
        for h in self.hosts.values():
            if h.anchor is None:
                continue
            out.append("===== host %s (%s) =====" % (h.name, h.netns))
            out += command_outputs(h, (
                ["ip", "-br", "addr"], ["ip", "route"],
                "ls -la /var/run/ /etc/tinc/*/ 2>&1; cat /var/run/*.pid 2>/dev/null; true",
                "for f in /var/log/*; do [ -f \"$f\" ] && { echo \"--- $f\"; tail -n 30 \"$f\"; }; done; true"),
                timeout=10)
            pids = h.pids()
            procs = []
            for p in pids:
                try:
                    with open("/proc/%d/cmdline" % p, "rb") as f:
                        procs.append("%d %s" % (p, f.read().replace(b"\0", b" ").decode(errors="replace")))
                except OSError:
                    pass
            out.append("processes:\n  " + "\n  ".join(procs))
            for proc in h.procs:
                out.append("--- log of %s (rc=%s) ---\n%s" % (shlex.join(proc.argv), proc.poll(),
                                                             _tail(proc.output(), 40)))
        return "\n".join(out)


TIMINGS = []  # (label, seconds): shown at the end of a pytest run


def record_timing(label, seconds):
    TIMINGS.append((label, seconds))


class NatTopology(Topology):
    hub = None  # the first (or only) hub
    hubs = ()  # every hub, in order (several with build_nat_topology(hub_names=...))
    router = None
    nodes = ()
    public_ports = {}  # hub name -> its port on the router's public bridge (several hubs)

    def add_public_client(self, name, hub_side, address, hub_port="pub1"):
        """A host on the internet with its own link to the hub (a veth: `hub_port` in the hub
        holds hub_side/24, the client's eth0 holds address/24 and routes everything via the
        hub), as a client of a service the hub publishes. Returns the new host."""
        client = self.add_host(name)
        run_root(["ip", "-n", self.hub.netns, "link", "add", hub_port, "type", "veth", "peer",
                  "name", "eth0", "netns", client.netns])
        run_root(["ip", "-n", self.hub.netns, "addr", "add", hub_side + "/24", "dev", hub_port])
        run_root(["ip", "-n", self.hub.netns, "link", "set", hub_port, "up"])
        run_root(["ip", "-n", client.netns, "addr", "add", address + "/24", "dev", "eth0"])
        run_root(["ip", "-n", client.netns, "link", "set", "eth0", "up"])
        run_root(["ip", "-n", client.netns, "route", "add", "default", "via", hub_side])
        return client


def build_nat_topology(n_nodes=2, node_names=None, hub_name="hub", prefix=None,
                       private_etc=True, hub_names=None):
    """Hub on the 'public' segment, nodes behind a masquerading router. See module doc.
    With `hub_names` (several hubs) the router's pub0 is a bridge with one veth port per hub
    (pubh1, pubh2, ...; topo.public_ports) and hub i (0-based) is 192.0.2.<i+1>."""
    names = list(node_names) if node_names else ["node%d" % (i + 1) for i in range(n_nodes)]
    if len(names) > 250:
        raise ValueError("too many nodes")
    hub_list = list(hub_names) if hub_names else [hub_name]
    if not 1 <= len(hub_list) <= 200:
        raise ValueError("between 1 and 200 hubs")
    topo = NatTopology(prefix, private_etc)
    try:
        topo.hubs = [topo.add_host(h) for h in hub_list]
        hub = topo.hub = topo.hubs[0]
        rtr = topo.router = topo.add_host("router")
        topo.nodes = [topo.add_host(n) for n in names]
        R = rtr.netns

        def ipn(ns, *args):
            run_root(["ip", "-n", ns] + list(args))

        if hub_names is None:  # public segment: router pub0 <-> hub eth0
            ipn(R, "link", "add", "pub0", "type", "veth", "peer", "name", "eth0", "netns",
                hub.netns)
        else:  # public segment: bridge pub0 in the router, one port per hub
            ipn(R, "link", "add", "pub0", "type", "bridge")
            topo.public_ports = {}
            for i, h in enumerate(topo.hubs):
                port = "pubh%d" % (i + 1)
                ipn(R, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                    h.netns)
                ipn(R, "link", "set", port, "master", "pub0")
                ipn(R, "link", "set", port, "up")
                topo.public_ports[h.name] = port
        ipn(R, "addr", "add", "%s/24" % ROUTER_PUBLIC, "dev", "pub0")
        ipn(R, "link", "set", "pub0", "up")
        for i, h in enumerate(topo.hubs):
            address = str(PUBLIC_NET.network_address + 1 + i)
            ipn(h.netns, "addr", "add", "%s/24" % address, "dev", "eth0")
            ipn(h.netns, "link", "set", "eth0", "up")
            h.addresses["public"] = address
        rtr.addresses.update(public=ROUTER_PUBLIC, lan=ROUTER_LAN)
        # LAN: bridge in the router namespace, one veth per node
        ipn(R, "link", "add", "br-lan", "type", "bridge")
        ipn(R, "addr", "add", "%s/24" % ROUTER_LAN, "dev", "br-lan")
        ipn(R, "link", "set", "br-lan", "up")
        for i, node in enumerate(topo.nodes):
            connect_lan_node(R, node, i)
        # forwarding only inside the router namespace
        # (/proc/sys/net shows the namespace of the process reading it; no procps needed)
        for h in list(topo.hubs) + list(topo.nodes):
            h.sysctl("net.ipv4.ip_forward", 0)
        rtr.sysctl("net.ipv4.ip_forward", 1)
        rtr.run("for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ -w \"$f\" ] && echo 0 > \"$f\"; done; true")
        rtr.run(["nft", "-f", "-"], input=NAT_RULESET)
    except BaseException:
        topo.close()
        raise
    return topo


def connect_lan_node(router_netns, node, index):
    """Wire host `node` to the router's LAN bridge as node number `index` (0-based): veth
    lan<index+1>, address 198.51.100.<index+2>, default route via the router."""
    def ipn(ns, *args):
        run_root(["ip", "-n", ns] + list(args))

    port = "lan%d" % (index + 1)
    addr = str(LAN_NET.network_address + 2 + index)
    ipn(router_netns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
        node.netns)
    ipn(router_netns, "link", "set", port, "master", "br-lan")
    ipn(router_netns, "link", "set", port, "up")
    ipn(node.netns, "addr", "add", "%s/24" % addr, "dev", "eth0")
    ipn(node.netns, "link", "set", "eth0", "up")
    ipn(node.netns, "route", "add", "default", "via", ROUTER_LAN)
    node.addresses["lan"] = addr
    return addr


NAT_RULESET = """
table ip netlab {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "br-lan" oifname "pub0" ip saddr 198.51.100.0/24 accept
        iifname "br-lan" oifname "br-lan" accept
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "pub0" ip saddr 198.51.100.0/24 masquerade
    }
}
"""


def cleanup_stale(verbose=True):
    """Delete netlab namespaces (tb<pid>xxxx-*) whose creating process is gone."""
    cp = run_root(["ip", "netns", "list"], check=False)
    removed = []
    for line in cp.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if not m or pid_alive(int(m.group(1))):
            continue
        remove_namespace(name, grace=0)  # their owner is gone: no grace
        removed.append(name)
        if verbose:
            print("netlab: removed stale namespace %s" % name)
    return removed


def install_signal_handlers():
    """Turn SIGTERM/SIGHUP into SystemExit so that finally blocks and atexit run."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)


# =============================================================================================
# Plain tinc helpers (used to prove the harness without the product)
# =============================================================================================

def plain_tinc_setup(host, net, name, vpn_addr, prefix=24, address=None, connect_to=None,
                     key_size=2048):
    """Walkthrough-style tinc 1.0 config in host (with `ip` in tinc-up). Returns host file."""
    d = "/etc/tinc/%s" % net
    conf = "Name = %s\nAddressFamily = ipv4\nInterface = tun0\n" % name
    if connect_to:
        conf += "ConnectTo = %s\n" % connect_to
    host.write_file(d + "/tinc.conf", conf)
    hostfile = ("Address = %s\n" % address if address else "") + "Subnet = %s/32\n" % vpn_addr
    host.write_file("%s/hosts/%s" % (d, name), hostfile)
    host.run(["tincd", "-n", net, "-K%d" % key_size], timeout=60)
    host.write_file(d + "/tinc-up", "#!/bin/sh\nip addr add %s/%d dev $INTERFACE\n"
                    "ip link set $INTERFACE up\n" % (vpn_addr, prefix), 0o755)
    host.write_file(d + "/tinc-down", "#!/bin/sh\nip link set $INTERFACE down\n", 0o755)
    return host.read_file("%s/hosts/%s" % (d, name))


def tincd_pid(host, net):
    return host.read_pidfile(pid_file_paths(net)[0])


def start_tincd(host, net, timeout=10, extra=(), port=655):
    """Start `tincd -n NET` (it daemonizes) and wait for its pidfile and for its TCP listener
    (the pidfile comes before the socket: a peer connecting in between waits 5 s to retry).
    Returns the pid."""
    host.run(["tincd", "-n", net] + list(extra), timeout=timeout)
    pid = wait_until(lambda: (lambda p: p if p and pid_alive(p) else None)(tincd_pid(host, net)),
                     timeout, 0.05, what="tincd pidfile of %s in %s" % (net, host.name))
    if port:
        host.wait_listening(port, timeout)
    return pid


def stop_tincd(host, net, timeout=10):
    """Kill the tincd whose pid is in the host's pidfile and wait for it to exit."""
    pid = tincd_pid(host, net)
    if not pid or not pid_alive(pid):
        return None
    if pid not in host.pids():
        raise RuntimeError("pid %d from pidfile is not in host %s" % (pid, host.name))
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), timeout, 0.05, what="tincd %d to exit" % pid)
    return pid


# =============================================================================================
# Product drivers (tinc-hub on the hub host, bootstrap.py on the nodes)
# =============================================================================================

def decode_token(token):
    """Decode a `tinc1.` token per docs/DESIGN.md (independently of the product's code)."""
    if not token.startswith("tinc1."):
        raise ValueError("token does not start with tinc1.: %r" % token[:20])
    body = token[len("tinc1."):]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


class HubDriver:
    """Runs the real `tinc-hub` CLI inside the hub host."""

    def __init__(self, host, net, name, address=HUB_PUBLIC, vpn_subnet="10.0.0.0/24",
                 tinc_hub=None, api_port=API_PORT):
        self.host = host
        self.net = net
        self.name = name
        self.address = address
        self.vpn_subnet = vpn_subnet
        self.tinc_hub = str(tinc_hub or TINC_HUB)
        self.api_port = api_port
        self.serve_proc = None
        self.sync_interval = None  # serve --sync-interval (tests that wait for nodes' syncs: 10)

    def cli(self, *args, timeout=60, check=True, env=None):
        return self.host.run([self.tinc_hub] + [str(a) for a in args], timeout=timeout,
                             check=check, env=env)

    def init(self, key_size=2048, init="none", extra=()):
        return self.cli("init", "--net", self.net, "--name", self.name, "--address",
                        self.address, "--vpn-subnet", self.vpn_subnet, "--init", init,
                        "--key-size", key_size, *extra, timeout=120)

    def serve(self, timeout=30):
        argv = [self.tinc_hub, "serve"]
        if self.sync_interval is not None:
            argv += ["--sync-interval", str(self.sync_interval)]
        self.serve_proc = self.host.popen(argv, log="%s.tinc-hub-serve.log"
                                          % self.host.name, env={"PYTHONUNBUFFERED": "1"})
        self.wait_healthy(timeout)
        return self.serve_proc

    @property
    def url(self):
        return "https://%s:%d" % (self.address, self.api_port)

    def healthz(self, pin=None, from_host=None):
        h = from_host or self.host
        cmd = ["curl", "-sS", "--max-time", "3", "-k", "-o", "/dev/null", "-w", "%{http_code}"]
        if pin:
            cmd += ["--pinnedpubkey", pin]
        cp = h.run(cmd + [self.url + "/healthz"], check=False, timeout=10)
        return cp

    def wait_healthy(self, timeout=30):
        def ok():
            if self.serve_proc is not None and self.serve_proc.poll() is not None:
                raise CommandError(self.serve_proc.argv, self.serve_proc.returncode,
                                   self.serve_proc.output(), "", self.host.name)
            cp = self.healthz()
            return cp.returncode == 0 and cp.stdout.strip() == "200"
        wait_until(ok, timeout, 0.1, what="%s/healthz on %s" % (self.url, self.host.name))

    def token_create(self, *extra):
        cp = self.cli("token", "create", "--json", *extra)
        try:
            data = json.loads(cp.stdout)
        except ValueError:
            raise AssertionError("`tinc-hub token create --json` did not print JSON:\n%s\n%s"
                                 % (cp.stdout, cp.stderr)) from None
        return data

    def nodes(self):
        cp = self.cli("nodes", "--json")
        data = json.loads(cp.stdout)
        if isinstance(data, dict) and "nodes" in data:
            data = data["nodes"]
        if isinstance(data, dict):  # {name: {...}}
            data = [dict(v, name=k) if isinstance(v, dict) else {"name": k, "address": v}
                    for k, v in data.items()]
        return data

    def config(self):
        try:
            return json.loads(self.host.read_file("/var/lib/tinc-hub/hub.json"))
        except (CommandError, ValueError):
            return {}

    def vpn_address(self):
        cfg = self.config()
        addr = cfg.get("hub_address") or cfg.get("address")
        try:
            ipaddress.ip_address(addr)
            if ipaddress.ip_address(addr) in ipaddress.ip_network(self.vpn_subnet):
                return addr
        except (TypeError, ValueError):
            pass
        return str(next(ipaddress.ip_network(self.vpn_subnet).hosts()))

    def tincd_pid(self):
        return tincd_pid(self.host, self.net)


_IPV4 = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3})\b")


def bootstrap_argv(name=None, key_size=2048, init="none", timeout=60, extra=(), python="python3"):
    argv = [python, str(BOOTSTRAP_PY), "--init", init, "--key-size", str(key_size)]
    if name:
        argv += ["--name", name]
    if timeout:
        argv += ["--timeout", str(timeout)]
    return argv + list(extra)


def start_bootstrap(node, token, **kw):
    """Start bootstrap.py in node in the background with the token in TINC_BOOTSTRAP_TOKEN."""
    return node.popen(bootstrap_argv(**kw), env={"TINC_BOOTSTRAP_TOKEN": token},
                      log="%s.bootstrap.%d.log" % (node.name, len(node.procs) + 1))


def printed_address(stdout):
    """The VPN address bootstrap printed: its last non-empty stdout line must be an IPv4."""
    lines = [l.strip() for l in stdout.splitlines() if l.strip()]
    if not lines:
        return None
    try:
        return str(ipaddress.IPv4Address(lines[-1]))
    except ValueError:
        return None


# =============================================================================================
# ./lab
# =============================================================================================

def _say(msg):
    print("[lab %5.1fs] %s" % (time.monotonic() - _T0, msg), flush=True)


_T0 = time.monotonic()


class Scenario:
    """The lab's steps on a topology, each printing a progress line. `demo` runs them all;
    `lab up/status/shell/down` (later) reuse them on a topology that outlives the command."""

    def __init__(self, topo, net, hub_name, vpn_subnet="10.0.0.0/24", key_size=2048,
                 timeout=60, say=None):
        self.topo = topo
        self.net = net
        self.key_size = key_size
        self.timeout = timeout
        self.say = say or _say
        self.hub = HubDriver(topo.hub, net, hub_name, vpn_subnet=vpn_subnet)
        self.addresses = {}

    def start_hub(self):
        h = self.hub
        self.say("%s: tinc-hub init --net %s --name %s --address %s --vpn-subnet %s "
                 "--init none --key-size %d" % (h.host.name, h.net, h.name, h.address,
                                                h.vpn_subnet, self.key_size))
        h.init(key_size=self.key_size)
        self.say("%s: tinc-hub serve (%s)" % (h.host.name, h.url))
        h.serve()
        self.say("%s: API up; hub VPN address %s" % (h.host.name, h.vpn_address()))

    def enrol(self, node, name=None):
        name = name or node.name
        tok = self.hub.token_create()
        self.say("%s: tinc-hub token create --json -> expires %s; one-liner:\n      %s"
                 % (self.hub.host.name, tok.get("expires_at"), tok.get("command")))
        self.say("%s: TINC_BOOTSTRAP_TOKEN=... python3 bootstrap.py --name %s --init none "
                 "--key-size %d" % (node.name, name, self.key_size))
        t = time.monotonic()
        proc = start_bootstrap(node, tok["token"], name=name, key_size=self.key_size,
                               timeout=self.timeout)
        rc = proc.wait(timeout=self.timeout + 60)
        out = proc.output()
        for line in out.rstrip().splitlines():
            print("    | " + line)
        addr = printed_address(out) if rc == 0 else None
        if not addr:
            raise RuntimeError("bootstrap on %s failed (exit %s)" % (node.name, rc))
        self.say("%s joined as %s in %.1fs" % (name, addr, time.monotonic() - t))
        self.addresses[node.name] = addr
        return addr

    def show_ping(self, src, dst, label):
        self.say("ping %s (%s)" % (label, dst))
        cp = src.run(["ping", "-n", "-c", "3", "-i", "0.3", "-W", "2", dst], check=False,
                     timeout=20)
        print((cp.stdout + cp.stderr).rstrip(), flush=True)
        return cp.returncode == 0


def demo(args):
    """Build hub erebor + node hobbiton, enrol it with the real product, ping both ways."""
    global _T0
    _T0 = time.monotonic()
    hub_name, node_name = "erebor", "hobbiton"
    _say("building topology: hub %s (%s) -- router (NAT) -- node %s (LAN %s)"
         % (hub_name, HUB_PUBLIC, node_name, LAN_NET))
    rc = 1
    topo = build_nat_topology(node_names=[node_name], hub_name=hub_name)
    try:
        _say("namespaces: %s" % " ".join(topo.netns_names()))
        sc = Scenario(topo, args.net, hub_name, args.vpn_subnet, args.key_size, args.timeout)
        sc.start_hub()
        node = topo.nodes[0]
        addr = sc.enrol(node)
        ok = sc.show_ping(node, sc.hub.vpn_address(), "%s -> %s" % (node_name, hub_name))
        ok = sc.show_ping(topo.hub, addr, "%s -> %s" % (hub_name, node_name)) and ok
        rc = 0 if ok else 1
        _say("demo OK" if ok else "demo FAILED: ping")
    except Exception as e:
        _say("demo FAILED: %s" % e)
        if args.verbose:
            print(topo.diagnostics())
    finally:
        _say("tearing down")
        topo.close()
        _say("removed namespaces %s" % " ".join(topo.netns_names()))
    return rc


def main(argv=None):
    parser = argparse.ArgumentParser(prog="lab", description="tinc-hub network lab")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("demo", help="hub erebor + node hobbiton: enrol, ping both ways, tear down")
    p.add_argument("--net", default="middle-earth")
    p.add_argument("--vpn-subnet", default="10.0.0.0/24")
    p.add_argument("--key-size", type=int, default=2048)
    p.add_argument("--timeout", type=int, default=60)
    p.add_argument("-v", "--verbose", action="store_true", help="dump host state on failure")
    p.set_defaults(func=demo)
    p = sub.add_parser("cleanup", help="remove namespaces left by crashed netlab runs")
    p.set_defaults(func=lambda a: (cleanup_stale(), 0)[1])
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lab: must run as root (network namespaces)", file=sys.stderr)
        return 2
    install_signal_handlers()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\nlab: interrupted; cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
