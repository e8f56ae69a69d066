"""labkit.loopback_hub: the real ``tinc-hub serve`` on 127.0.0.1 as a child process, and a
concurrent HTTPS enrolment client (asyncio, standard library) to load it. Used by the
load/fault tests and by bench/. No tests here.

Everything stays on loopback; every wait is bounded; only the processes started here are
signalled, by pid.
"""

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from bootstrap.bootstrap import DEFAULT_API_PORT, ETC_HOSTS, update_hosts_block
from labkit.traffic import process_cpu_seconds
from tinc_hub.errors import HubError
from tinc_hub.state import StateDir

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _public_pems(count: int, bits: int) -> List[str]:
    out = []
    for _ in range(count):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        out.append(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.PKCS1).decode())
    return out


_KEYS: List[str] = []


def public_keys(count: int, bits: int = 2048) -> List[str]:
    """``count`` distinct RSA public keys (PKCS#1 PEM), made on all cores and kept for the
    rest of the process (key generation is done before any clock starts)."""
    if bits != 2048:
        return _public_pems(count, bits)
    missing = count - len(_KEYS)
    if missing > 0:
        workers = max(1, os.cpu_count() or 1)
        chunks = [missing // workers + (1 if i < missing % workers else 0) for i in range(workers)]
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            for pems in pool.map(_public_pems, [c for c in chunks if c], [bits] * workers):
                _KEYS.extend(pems)
    return _KEYS[:count]


def raise_fd_limit(wanted: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to at least ``wanted`` (within the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def user_like_env(bytecode_dir: Path) -> Dict[str, str]:
    """The environment for timing a ``tinc-hub`` command as a user runs it: with compiled
    bytecode (pip compiles it at install time), cached in ``bytecode_dir``, not in the tree."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(bytecode_dir))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def cli_wall_seconds(state_dir: Path, args: Sequence[str], env: Optional[Dict[str, str]] = None,
                     timeout: float = 300.0) -> float:
    """Wall time of one fresh ``tinc-hub --state-dir STATE ARGS...`` (stdout discarded)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(state_dir), *args],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=timeout,
                   env=env)
    return time.monotonic() - started


# ------------------------------------------------------------------------------------- server

def hub_cli(state_dir: Path, *args: str, timeout: float = 120.0) -> str:
    """``tinc-hub --state-dir STATE ARGS...`` of this venv; its stdout (raises on failure)."""
    proc = subprocess.run([sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(state_dir)]
                          + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"tinc-hub {' '.join(args[:2])} exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def init_hub_state(root: Path, vpn_subnet: str = "10.77.0.0/24",
                   api_port: int = DEFAULT_API_PORT) -> StateDir:
    """``tinc-hub init --no-start`` into ``root``/state and ``root``/tinc (no tincd, no boot
    registration): what a loopback ``serve`` needs."""
    state = StateDir(root / "state")
    hub_cli(state.root, "init", "--net", f"lhub{os.getpid() % 100000}", "--name", "hub1",
            "--address", HOST, "--vpn-subnet", vpn_subnet, "--api-port", str(api_port),
            "--key-size", "2048", "--init", "none", "--tinc-dir", str(root / "tinc"),
            "--no-start")
    return state


def create_token(state_dir: Path, uses: int = 1) -> str:
    """A new enrolment token for ``uses`` enrolments (``tinc-hub token create --json``)."""
    return json.loads(hub_cli(state_dir, "token", "create", "--uses", str(uses), "--json"))["token"]


class HubProcess:
    """``tinc-hub --state-dir STATE serve --listen 127.0.0.1 [extra]`` in the background."""

    def __init__(self, state_dir: Path, port: int, cert: Path, log: Path,
                 extra: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> None:
        self.state_dir = state_dir
        self.port = port
        self.cert = cert
        self.log = log
        self.extra = list(extra)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30.0) -> "HubProcess":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(self.state_dir), "serve",
                 "--listen", HOST, "--api-port", str(self.port)] + self.extra,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinc-hub serve exited {self.proc.returncode}:\n{self.log_text()}")
            if self.healthy():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"tinc-hub serve not healthy within {timeout} s:\n{self.log_text()}")

    def healthy(self) -> bool:
        try:
            with self.tls_socket(2) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
                return sock.recv(100).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def tls_socket(self, timeout: float) -> ssl.SSLSocket:
        """A new TLS connection to the hub, handshake done (the caller closes it)."""
        raw = socket.create_connection((HOST, self.port), timeout=timeout)
        try:
            return self.ssl_context().wrap_socket(raw, server_hostname=HOST)
        except BaseException:
            raw.close()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _status(self) -> Dict[str, str]:
        out = {}
        with open(f"/proc/{self.pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                out[key] = value.strip()
        return out

    def rss_kib(self) -> int:
        return int(self._status()["VmRSS"].split()[0])

    def rss_mb(self) -> float:
        return self.rss_kib() / 1024

    def threads(self) -> int:
        return int(self._status()["Threads"])

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        """CPU time the hub has used so far, user + system, all its threads."""
        return process_cpu_seconds(self.pid)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the hub and remove its names from /etc/hosts (serve as root writes its net's
        block there; left behind, every run's block would make the next hubs' names rounds read
        and rewrite an ever bigger file)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.remove_names()

    def remove_names(self) -> None:
        """Remove this hub's net's block from /etc/hosts (under bootstrap's lock), if any."""
        try:
            net = StateDir(self.state_dir).load_config().net
            update_hosts_block(net, [], ETC_HOSTS)
        except (HubError, OSError, ValueError):
            pass  # no config, no /etc/hosts, no right to write it, damaged markers: nothing to undo

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""


def file_creation_us(directory: Path, count: int = 200) -> float:
    """Microseconds to create one empty file in a new directory under ``directory`` (made
    and removed here). A hub writes one new host file per enrolment: on an ext4 whose inode
    groups are crowded by churn this alone can cost a millisecond of kernel CPU per file."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix="create-probe-", dir=directory))
    try:
        started = time.perf_counter()
        for i in range(count):
            os.close(os.open(probe / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        return (time.perf_counter() - started) / count * 1e6
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# ------------------------------------------------------------------------------------- client

class Enrolment(NamedTuple):
    token: str
    name: str
    public_key: str
    credential: Optional[str] = None  # the node's credential, sent when set (a clean replay)


class Reply(NamedTuple):
    status: int  # 0: no HTTP answer (connection refused/reset, timeout)
    body: dict
    headers: Dict[str, str]
    seconds: float  # from connect to the end of the answer
    error: str = ""


async def post_enroll(port: int, context: ssl.SSLContext, item: Enrolment,
                      timeout: float = 60.0, headers: Optional[Dict[str, str]] = None,
                      source: Optional[str] = None) -> Reply:
    """One POST /v1/enroll on its own TLS connection (as bootstrap.py does), with extra
    request ``headers``, from the loopback address ``source`` (e.g. 127.0.0.3) if given."""
    fields = {"name": item.name, "public_key": item.public_key}
    if item.credential is not None:
        fields["credential"] = item.credential
    body = json.dumps(fields).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (f"POST /v1/enroll HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: Bearer {item.token}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    started = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=context, server_hostname=HOST,
                                    local_addr=(source, 0) if source else None), timeout)
        writer.write(head + body)
        raw = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
        return Reply(0, {}, {}, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()
    seconds = time.monotonic() - started
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Reply(0, {}, {}, seconds, f"no HTTP answer: {raw[:80]!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    declared = headers.get("content-length", "")
    if declared.isdigit() and len(payload) < int(declared):  # cut off mid-answer (hub killed)
        return Reply(0, {}, {}, seconds, f"incomplete answer: {len(payload)} of {declared} bytes")
    try:
        parsed = json.loads(payload.decode("utf-8")) if payload else {}
    except ValueError:
        parsed = {"raw": payload[:200].decode("latin-1")}
    return Reply(status, parsed, headers, seconds)


async def _enrol_all(port: int, context: ssl.SSLContext, items: Sequence[Enrolment],
                     timeout: float) -> List[Reply]:
    return list(await asyncio.gather(*(post_enroll(port, context, i, timeout) for i in items)))


def enrol_concurrently(hub: HubProcess, items: Sequence[Enrolment], timeout: float = 60.0) -> List[Reply]:
    """Send every enrolment at once (one connection each); the replies in the same order."""
    raise_fd_limit(len(items) + 256)
    return asyncio.run(_enrol_all(hub.port, hub.ssl_context(), items, timeout))


def percentile(values: Iterable[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(fraction * (len(ordered) - 1)))))
    return ordered[index]
