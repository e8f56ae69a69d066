#!/usr/bin/env python3
"""Join this machine to a tinc VPN run by a tinc-hub.

Usage (as root):
    curl -fsS --pinnedpubkey 'sha256//PIN' -k https://HUB:8655/bootstrap.py \\
        | TINC_BOOTSTRAP_TOKEN='tinc1....' python3 -
    python3 bootstrap.py [join] --token-file FILE [--name NAME] [--init auto|...] [--dry-run]
    python3 bootstrap.py status [--json]
    python3 bootstrap.py leave
    python3 bootstrap.py rotate-key [--key-size BITS] [--dry-run]

Steps: detect the system, install tinc, write tinc.conf, make the RSA key (never
regenerated), enrol with the hub over pinned HTTPS, write the hub's host file and
tinc-up/tinc-down, register tinc for boot, start it and wait for the hub to answer ping.

Exit codes:
    0 ok; 1 unexpected error; 2 usage or local configuration conflict; 3 unsupported
    system; 4 refused by the hub (or its certificate does not match the pin);
    5 hub unreachable within --timeout; 6 the VPN did not come up within --timeout;
    7 a system command failed.

This file is also the one home of the distro and init-system knowledge, the token
format and the small apply layer (run, write_atomic) that the hub's own set-up uses.
It needs only Python >= 3.6 and its standard library; `distro` is used when importable.
"""

import argparse
import base64
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

__version__ = "0.1.0"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNSUPPORTED = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5
EXIT_VPN_DOWN = 6
EXIT_COMMAND = 7

DEFAULT_TINC_DIR = "/etc/tinc"
DEFAULT_API_PORT = 8655
DEFAULT_KEY_SIZE = 4096
DEFAULT_LOG = "/var/log/tinc-bootstrap.log"
STATE_FILE = "bootstrap.json"
TOKEN_PREFIX = "tinc1."
NAME_RE = re.compile(r"[A-Za-z0-9_]+")
NET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
IFNAMSIZ = 15
INIT_CHOICES = ("auto", "systemd", "sysv", "rc.local", "none")
MAX_ANSWER = 1 << 20
TINC_CONF_MARKER = "# Written by tinc-bootstrap; re-running it rewrites this file."


class BootstrapError(Exception):
    """An expected failure: one line for the user, a hint, and an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR, hint: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


class CommandError(BootstrapError):
    """A command run through run() failed."""

    def __init__(self, cmd: Sequence[str], returncode: Optional[int], stderr: str) -> None:
        last = (stderr or "").strip().splitlines()
        detail = last[-1] if last else "no error output"
        status = "timed out" if returncode is None else "exit code {}".format(returncode)
        super().__init__("command failed ({}): {}: {}".format(status, shell_join(cmd), detail),
                         EXIT_COMMAND, "the full output is in the log")
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr


# ---------------------------------------------------------------------------
# Reporting: one progress line per step on stderr, everything in the log file.

class Reporter:
    """Progress lines on stderr; commands and their output in a log file."""

    def __init__(self, log_path: Optional[str] = None, verbose: bool = False,
                 quiet: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self.started = time.monotonic()
        self.log_path = None  # type: Optional[str]
        self._file = None
        if log_path:
            try:
                os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
                self._file = os.fdopen(open_log_file(log_path), "a")
                self.log_path = log_path
            except UnsafeLogFile as exc:
                sys.stderr.write("tinc-bootstrap: warning: not logging to {}: {}\n".format(
                    log_path, exc))
            except OSError:
                self._file = None

    def _write(self, text: str) -> None:
        if self._file:
            stamp = "{} +{:.3f}s".format(time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         time.monotonic() - self.started)
            for line in redact(text).splitlines() or [""]:
                self._file.write("{} {}\n".format(stamp, line))
            self._file.flush()

    def step(self, message: str) -> None:
        """A progress line the user sees."""
        self._write("== " + message)
        if not self.quiet:
            sys.stderr.write("tinc-bootstrap: {}\n".format(redact(message)))
            sys.stderr.flush()

    def debug(self, message: str) -> None:
        """Detail for the log (and stderr with -v)."""
        self._write(message)
        if self.verbose:
            sys.stderr.write("  {}\n".format(redact(message)))


class UnsafeLogFile(OSError):
    """The log path is a symlink, a FIFO, a device or a hard link: never written through."""


def open_log_file(path: str) -> int:
    """An append-only fd on path (created 0600), refusing anything but a plain file of its own
    (one link, owned by us: a file another user planted in a writable directory would let
    that user read the log).

    O_NOFOLLOW: a symlink planted at the log path is not followed to its target; O_NONBLOCK:
    a FIFO without a reader cannot hang us (and one with a reader is refused below);
    O_NOCTTY: a terminal device never becomes our controlling terminal.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeLogFile("it is a symbolic link")
        if exc.errno == errno.ENXIO:
            raise UnsafeLogFile("it is a FIFO or socket")
        raise
    info = os.fstat(fd)
    problem = ("it is not a regular file" if not stat.S_ISREG(info.st_mode)
               else "it has other hard links" if info.st_nlink != 1
               else "it belongs to another user" if info.st_uid != os.geteuid() else None)
    if problem:
        os.close(fd)
        raise UnsafeLogFile(problem)
    os.set_blocking(fd, True)
    return fd


# Anything shaped like a token, and the token read at start-up, never reaches a log or stderr.
_TOKEN_TEXT_RE = re.compile(r"tinc1\.[A-Za-z0-9_=-]{8,}")
_SECRETS = []  # type: List[str]


def redact(text: str) -> str:
    """text with the token (and its secret), and anything that looks like a token, masked."""
    for secret in _SECRETS:
        text = text.replace(secret, "<token>")
    return _TOKEN_TEXT_RE.sub("tinc1.<token>", text)


REPORT = Reporter()


def shell_join(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(part)) for part in cmd)


# ---------------------------------------------------------------------------
# The apply layer: every command goes through run(); every file through write_atomic().

def run(cmd: Sequence[str], check: bool = True, input: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None) -> "subprocess.CompletedProcess":
    """Run a command without a terminal; raise CommandError when it fails and check is set."""
    full_env = dict(os.environ)
    full_env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    if "/sbin" not in full_env["PATH"]:
        full_env["PATH"] += ":/usr/local/sbin:/usr/sbin:/sbin"
    full_env["DEBIAN_FRONTEND"] = "noninteractive"
    full_env["LC_ALL"] = "C"
    if env:
        full_env.update(env)
    REPORT.debug("$ " + shell_join(cmd))
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
              "universal_newlines": True, "env": full_env, "timeout": timeout}
    if input is None:
        kwargs["stdin"] = subprocess.DEVNULL
    else:
        kwargs["input"] = input
    try:
        proc = subprocess.run(list(cmd), **kwargs)
    except FileNotFoundError:
        raise CommandError(cmd, 127, "{}: command not found".format(cmd[0]))
    except subprocess.TimeoutExpired as exc:
        raise CommandError(cmd, None, str(exc))
    for label, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        if text and text.strip():
            REPORT.debug("  {}: {}".format(label, text.rstrip()))
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stderr or proc.stdout)
    return proc


def write_atomic(path: str, content, mode: int = 0o644) -> bool:
    """Write a file atomically (temp file, fsync, rename); return False when unchanged.

    An identical file is not touched at all, so its mtime is kept (tinc 1.0 drops a
    connection on SIGHUP when its host file's mtime changed).
    """
    data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
    path = os.path.realpath(path)
    kept = keep_if_same(path, data, mode)
    if kept is not None:
        return kept
    fd, tmp = stage_temp_file(path, data, mode)
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(path))
    return True


def keep_if_same(path: str, data: bytes, mode: int) -> Optional[bool]:
    """When ``path`` already holds ``data``: False (untouched) or True (only its mode was
    set to ``mode``); None when it must be written (missing or different)."""
    try:
        with open(path, "rb") as existing:
            if existing.read() != data:
                return None
        if (os.stat(path).st_mode & 0o7777) == mode:
            return False
        os.chmod(path, mode)
        return True
    except FileNotFoundError:
        return None


def stage_temp_file(path: str, data: bytes, mode: int) -> Tuple[int, str]:
    """A temporary file beside ``path`` (same directory, made if missing) holding ``data``
    with ``mode``, not yet fsync'd: (its open descriptor, its path). Removed on failure."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(os.dup(fd), "wb") as handle:  # all of it (a short write retried)
            handle.write(data)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return fd, tmp


def fsync_directory(directory: str) -> None:
    """Make a rename or unlink in directory durable (best effort)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read_text(path: str) -> Optional[str]:
    """The file's text, or None when it does not exist."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


class FileSpec(NamedTuple):
    """A file the plan wants on disk."""
    path: str
    content: str
    mode: int = 0o644


class Plan(NamedTuple):
    """Files to write and commands to run, in order, and other actions (a request, a wait)
    in one line each: the output of a pure planner."""
    files: Tuple[FileSpec, ...] = ()
    commands: Tuple[Tuple[str, ...], ...] = ()
    actions: Tuple[str, ...] = ()


def apply_files(files: Sequence[FileSpec]) -> List[str]:
    """Write the files; return the paths that changed."""
    changed = []
    for spec in files:
        if write_atomic(spec.path, spec.content, spec.mode):
            REPORT.debug("wrote {}".format(spec.path))
            changed.append(spec.path)
    return changed


def describe_plan(plan: Plan) -> str:
    """A human-readable rendering of a plan (for --dry-run and the log)."""
    out = []
    for spec in plan.files:
        out.append("--- file {} (mode {:04o})".format(spec.path, spec.mode))
        out.append(spec.content.rstrip("\n"))
    for cmd in plan.commands:
        out.append("$ " + shell_join(cmd))
    out.extend(plan.actions)
    return "\n".join(out)


class Step(NamedTuple):
    """One step of a job. ``plan()`` reads the facts the step needs and returns what it will
    do; ``apply(plan)`` does exactly that plan. A job is a list of steps, run by run_steps."""
    title: Callable[[], str]  # the progress line ("" for none), made when the step starts
    plan: Callable[[], Plan]
    apply: Callable[[Plan], None]


def run_steps(steps: Sequence[Step], dry_run: bool,
              say: Optional[Callable[[str], None]] = None) -> None:
    """Each step in order: plan it, then apply it; in a dry run, print each plan instead (so
    the dry run shows the very plans a real run applies). The real run logs each plan."""
    say = say or REPORT.step
    for step in steps:
        title = step.title()
        if title:
            say(title)
        plan = step.plan()
        text = describe_plan(plan)
        if dry_run:
            if text:
                print(text, flush=True)
            continue
        if text:
            REPORT.debug("plan:\n" + text)
        step.apply(plan)


# ---------------------------------------------------------------------------
# Tokens and TLS pins (the hub makes tokens with encode_token; the node reads them).

class HubEndpoint(NamedTuple):
    """Where one hub's enrolment API is, the pin of its TLS key, and its tinc name."""
    host: str
    port: int
    pin: str
    name: str


MAX_TOKEN_HUBS = 8  # the first hub and at most 7 others


class Token(NamedTuple):
    """Everything a node needs to enrol: where the hub is, its pin, and the secret; with
    several hubs, the others too (tried in order after the first)."""
    host: str
    port: int
    pin: str
    net: str
    hub: str
    secret: str
    others: Tuple[HubEndpoint, ...] = ()

    def endpoints(self) -> List[HubEndpoint]:
        return [HubEndpoint(self.host, self.port, self.pin, self.hub)] + list(self.others)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_token(token: Token) -> str:
    """Serialise a token as `tinc1.` + base64url(JSON)."""
    fields = {"a": token.host, "p": token.port, "k": token.pin, "n": token.net,
              "h": token.hub, "s": token.secret}  # type: Dict[str, object]
    if token.others:
        fields["x"] = [list(hub) for hub in token.others]
    body = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


TOKEN_TEXT_RE = re.compile(r"tinc1\.[A-Za-z0-9_-]{1,2042}")
PIN_RE = re.compile(r"sha256//[A-Za-z0-9+/]{43}=")  # base64 of a SHA-256 digest


def decode_token(text: str) -> Token:
    """Parse a token; raise BootstrapError (usage) when it is malformed."""
    text = (text or "").strip()
    bad = BootstrapError("the token is malformed", EXIT_USAGE,
                         "copy it again from `tinc-hub token create`")
    if not TOKEN_TEXT_RE.fullmatch(text):  # nothing but base64url: no junk reaches a header
        raise bad
    try:
        fields = json.loads(_b64url_decode(text[len(TOKEN_PREFIX):]).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..."
        raise bad
    if not isinstance(fields, dict):
        raise bad
    try:
        token = Token(host=fields["a"], port=fields["p"], pin=fields["k"], net=fields["n"],
                      hub=fields["h"], secret=fields["s"])
        others = fields.get("x", [])
    except KeyError:
        raise bad
    if not (valid_endpoint(token.endpoints()[0])
            and isinstance(token.net, str) and NET_RE.fullmatch(token.net)
            and isinstance(token.secret, str)
            and 16 <= len(token.secret) <= 256
            and isinstance(others, list) and 1 + len(others) <= MAX_TOKEN_HUBS
            and all(isinstance(hub, list) and len(hub) == 4 for hub in others)):
        raise bad
    token = token._replace(others=tuple(HubEndpoint(*hub) for hub in others))
    names = [hub.name for hub in token.endpoints()]
    if not all(valid_endpoint(hub) for hub in token.others) or len(set(names)) != len(names):
        raise bad
    return token


def valid_endpoint(hub: HubEndpoint) -> bool:
    """A hub endpoint from a token: each field of its type and form."""
    return (isinstance(hub.host, str) and host_problem(hub.host) is None
            and isinstance(hub.port, int) and not isinstance(hub.port, bool)
            and 0 < hub.port < 65536
            and isinstance(hub.pin, str) and PIN_RE.fullmatch(hub.pin) is not None
            and isinstance(hub.name, str) and valid_node_name(hub.name))


# Strict DER, just enough to find a certificate's SubjectPublicKeyInfo. The pin is only
# sound if these bytes are the key OpenSSL used for the handshake, so nothing here is
# lenient: one encoding per value, every tag as expected, every byte accounted for.
DER_INTEGER, DER_BIT_STRING, DER_OID, DER_SEQUENCE = 0x02, 0x03, 0x06, 0x30
DER_VERSION, DER_ISSUER_UID, DER_SUBJECT_UID, DER_EXTENSIONS = 0xA0, 0x81, 0x82, 0xA3


class DerReader:
    """Reads the DER elements of data[pos:end] one after another; any deviation is a ValueError."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def next_tag(self) -> Optional[int]:
        return self.data[self.pos] if self.pos < self.end else None

    def take(self, tag: Optional[int]) -> Tuple[int, int, int]:
        """(element start, content start, content end) of the next element.

        `tag` is the exact tag byte expected (None: any single-byte tag). The length must be
        definite, minimally encoded (long form only from 128, no leading zero, at most 4
        bytes) and must fit in what is left of the parent.
        """
        data, start, end = self.data, self.pos, self.end
        if end - start < 2:
            raise ValueError("DER element truncated at byte {}".format(start))
        found, first = data[start], data[start + 1]
        if found & 0x1F == 0x1F:
            raise ValueError("multi-byte DER tag at byte {}".format(start))
        if tag is not None and found != tag:
            raise ValueError("DER tag 0x{:02x} at byte {}, expected 0x{:02x}".format(
                found, start, tag))
        content = start + 2
        length = first
        if first & 0x80:
            count = first & 0x7F
            if not 1 <= count <= 4 or count > end - content:
                raise ValueError("bad DER length form at byte {}".format(start))
            length = int.from_bytes(data[content:content + count], "big")
            if data[content] == 0 or length < 0x80:
                raise ValueError("non-minimal DER length at byte {}".format(start))
            content += count
        if length > end - content:
            raise ValueError("DER length at byte {} exceeds its parent".format(start))
        self.pos = content + length
        return start, content, self.pos

    def enter(self, tag: int) -> "DerReader":
        """A reader over the content of the next element, which must have `tag`."""
        _, content, end = self.take(tag)
        return DerReader(self.data, content, end)

    def finish(self) -> None:
        if self.pos != self.end:
            raise ValueError("unexpected DER data at byte {}".format(self.pos))

    def take_key_bits(self) -> bytes:
        """The next element, a BIT STRING of whole bytes (a public key): those bytes."""
        _, content, end = self.take(DER_BIT_STRING)
        if content == end or self.data[content] != 0:
            raise ValueError("bad public key BIT STRING")
        return self.data[content + 1:end]


def spki_der_from_cert_der(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of an X.509 certificate; ValueError unless strictly DER."""
    outer = DerReader(der, 0, len(der))
    cert = outer.enter(DER_SEQUENCE)
    outer.finish()  # exactly one certificate, nothing after it
    tbs = cert.enter(DER_SEQUENCE)
    cert.take(DER_SEQUENCE)  # signatureAlgorithm
    cert.take(DER_BIT_STRING)  # signatureValue
    cert.finish()
    if tbs.next_tag() == DER_VERSION:
        version = tbs.enter(DER_VERSION)
        version.take(DER_INTEGER)
        version.finish()
    tbs.take(DER_INTEGER)  # serialNumber
    for _ in ("signature", "issuer", "validity", "subject"):
        tbs.take(DER_SEQUENCE)
    spki_start, spki_content, spki_end = tbs.take(DER_SEQUENCE)
    spki = DerReader(der, spki_content, spki_end)
    algorithm = spki.enter(DER_SEQUENCE)
    algorithm.take(DER_OID)
    if algorithm.next_tag() is not None:
        algorithm.take(None)  # the parameters (one element, if any)
    algorithm.finish()
    spki.take_key_bits()
    spki.finish()
    for tag in (DER_ISSUER_UID, DER_SUBJECT_UID):
        if tbs.next_tag() == tag:
            tbs.take(tag)
    if tbs.next_tag() == DER_EXTENSIONS:
        extensions = tbs.enter(DER_EXTENSIONS)
        extensions.take(DER_SEQUENCE)
        extensions.finish()
    tbs.finish()
    return der[spki_start:spki_end]


def spki_pin_from_cert_der(der: bytes) -> str:
    """curl-style pin (`sha256//BASE64`) of a DER certificate's SubjectPublicKeyInfo.

    ValueError if the certificate is not strict DER X.509 (see DerReader).
    """
    digest = hashlib.sha256(spki_der_from_cert_der(der)).digest()
    return "sha256//" + base64.b64encode(digest).decode()


# ---------------------------------------------------------------------------
# Names.

HOST_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def host_problem(host: str) -> Optional[str]:
    """Why host is neither an IP literal nor an RFC 1123 host name; None when it is one.

    Host names: dot-separated labels of 1-63 letters, digits and '-' (not first or last),
    at most 253 characters, no final dot, and a last label that is not all digits (so
    nothing that inet_aton reads as a number, like 127.1 or 0x7f.1, passes as a name).
    IPv4 literals must be in canonical dotted-quad form; IPv6 ones without a zone.
    """
    if not isinstance(host, str) or not host:
        return "it is empty"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if "%" in host:
            return "an IPv6 zone (%...) is not allowed"
        if address.version == 4 and str(address) != host:
            return "write the IPv4 address as four decimal numbers without leading zeros"
        return None
    if host.endswith("."):
        return "drop the final dot"
    if len(host) > 253:
        return "a host name has at most 253 characters"
    labels = host.split(".")
    if not all(HOST_LABEL_RE.fullmatch(label) for label in labels):
        return ("a host name is made of dot-separated labels of 1-63 letters, digits and '-'"
                " (not at the start or end of a label)")
    if labels[-1].isdigit():
        return "this is neither an IPv4 address nor a host name (its last label is a number)"
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return None
    return "this reads as a number (inet_aton); write the IPv4 address as a.b.c.d"


def valid_node_name(name: str) -> bool:
    """tinc's rule for node names: [A-Za-z0-9_]+."""
    return bool(NAME_RE.fullmatch(name or "")) and len(name) <= 64


def node_name_from_hostname(hostname: str) -> str:
    """The short hostname with `-`, `.` (and anything else tinc refuses) mapped to `_`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", hostname.strip())[:64]


def interface_name(net: str) -> str:
    """Linux interface names are at most 15 characters."""
    return net[:IFNAMSIZ]


# ---------------------------------------------------------------------------
# The system: distro, package commands, init system. Pure parsers with an injected root.

class OsInfo(NamedTuple):
    """What the distro says of itself, normalised the same with or without `distro`."""
    id: str
    like: Tuple[str, ...]
    version: str
    name: str


class SystemFacts(NamedTuple):
    """Everything the planners need to know about a machine."""
    os: OsInfo
    family: str          # "debian", "rhel", "fedora" or "unknown"
    init: str            # what runs as PID 1: "systemd" or "sysv"
    unit_template: str   # "tinc@" or "tincd@"
    umbrella_unit: Optional[str]
    rc_local: str
    tinc_installed: bool


# Names that distro normalises; applied to our own parsing too so both agree.
_OS_ID_ALIASES = {"ol": "oracle", "opensuse-leap": "opensuse", "redhat": "rhel",
                  "enterpriseenterpriseserver": "oracle", "redhatenterpriseworkstation": "rhel",
                  "redhatenterpriseserver": "rhel", "redhatenterprisecomputenode": "rhel"}
_RELEASE_NAMES = (("centos", "centos"), ("red hat", "rhel"), ("rocky", "rocky"),
                  ("alma", "almalinux"), ("fedora", "fedora"), ("oracle", "oracle"),
                  ("scientific", "scientific"), ("cloudlinux", "cloudlinux"))
_RHEL_LIKE = {"rhel", "centos", "rocky", "almalinux", "oracle", "scientific", "cloudlinux",
              "fedora"}
_DEBIAN_LIKE = {"debian", "ubuntu", "raspbian", "linuxmint", "pop", "elementary"}


def parse_os_release(text: str) -> Dict[str, str]:
    """Parse os-release KEY=value lines (shell quoting allowed)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw)
        except ValueError:
            parts = [raw.strip("\"'")]
        values[key.strip().upper()] = parts[0] if parts else ""
    return values


def parse_redhat_release(text: str) -> Tuple[str, str]:
    """(name, version) from a line like `CentOS release 6.10 (Final)`."""
    match = re.match(r"\s*(.*?)\s+release\s+([\d.]+)", text)
    if not match:
        return text.strip(), ""
    return match.group(1), match.group(2)


def _canonical_os(os_id: str, like: Sequence[str], version: str, name: str) -> OsInfo:
    os_id = _OS_ID_ALIASES.get(os_id.lower(), os_id.lower())
    lowered = name.lower()
    if os_id in ("rhel", "") or not os_id:
        for needle, canonical in _RELEASE_NAMES:
            if lowered.startswith(needle):
                os_id = canonical
                break
    return OsInfo(os_id, tuple(part.lower() for part in like), version, name)


def _os_info_builtin(root: str) -> OsInfo:
    for rel in ("etc/os-release", "usr/lib/os-release"):
        text = read_text(os.path.join(root, rel))
        if text is not None:
            values = parse_os_release(text)
            return _canonical_os(values.get("ID", ""), values.get("ID_LIKE", "").split(),
                                 values.get("VERSION_ID", ""), values.get("NAME", ""))
    for rel in ("etc/centos-release", "etc/redhat-release", "etc/fedora-release"):
        text = read_text(os.path.join(root, rel))
        if text is not None:
            name, version = parse_redhat_release(text)
            return _canonical_os("", (), version, name)
    return OsInfo("", (), "", "")


def _os_info_distro(root: str) -> Optional[OsInfo]:
    try:
        import distro  # type: ignore
    except ImportError:
        return None
    kwargs = {"include_lsb": False, "include_uname": False}
    if root not in ("", "/"):
        kwargs["root_dir"] = root
    try:
        info = distro.LinuxDistribution(**kwargs)
    except TypeError:  # an old distro without root_dir
        return None
    return _canonical_os(info.id(), info.like().split(), info.version(), info.name())


def detect_os(root: str = "/", use_distro: bool = True) -> OsInfo:
    """The distro, through `distro` when importable, else our own parsers."""
    info = _os_info_distro(root) if use_distro else None
    return info if info is not None else _os_info_builtin(root)


def os_family(info: OsInfo) -> str:
    """The package family: debian, rhel, fedora or unknown."""
    ids = {info.id} | set(info.like)
    if info.id == "fedora":
        return "fedora"
    if ids & _RHEL_LIKE:
        return "rhel"
    if ids & _DEBIAN_LIKE:
        return "debian"
    return "unknown"


def major_version(info: OsInfo) -> int:
    match = re.match(r"\d+", info.version)
    return int(match.group(0)) if match else 0


_UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
_TINCD_PATHS = ("usr/sbin/tincd", "sbin/tincd", "usr/local/sbin/tincd", "usr/bin/tincd")


def _find_unit(root: str, unit: str) -> bool:
    return any(os.path.exists(os.path.join(root, d, unit)) for d in _UNIT_DIRS)


def detect_system(root: str = "/", use_distro: bool = True) -> SystemFacts:
    """Read the facts of the machine (or fixture tree) at root."""
    info = detect_os(root, use_distro)
    family = os_family(info)
    init = "systemd" if os.path.isdir(os.path.join(root, "run/systemd/system")) else "sysv"
    if _find_unit(root, "tinc@.service"):
        template = "tinc@"
    elif _find_unit(root, "tincd@.service"):
        template = "tincd@"
    else:
        template = "tinc@"  # what the packages of every supported family ship today
    umbrella = "tinc.service" if _find_unit(root, "tinc.service") else None
    if umbrella is None and template == "tinc@" and family == "debian" and \
            not any(os.path.exists(os.path.join(root, p)) for p in _TINCD_PATHS):
        umbrella = "tinc.service"  # Debian/Ubuntu packages since 1.0.27 ship it
    rc_local = "/etc/rc.d/rc.local" if family in ("rhel", "fedora") else "/etc/rc.local"
    installed = any(os.path.exists(os.path.join(root, p)) for p in _TINCD_PATHS)
    return SystemFacts(info, family, init, template, umbrella, rc_local, installed)


def plan_install(facts: SystemFacts) -> Plan:
    """The commands that install tinc (none when it is there already)."""
    if facts.tinc_installed:
        return Plan()
    if facts.family == "debian":
        lock = ("-o", "DPkg::Lock::Timeout=300")
        return Plan(commands=(("apt-get",) + lock + ("update",),
                              ("apt-get",) + lock + ("install", "-y", "tinc")))
    if facts.family == "rhel":
        tool = "yum" if major_version(facts.os) and major_version(facts.os) < 8 else "dnf"
        return Plan(commands=((tool, "install", "-y", "epel-release"),
                              (tool, "install", "-y", "tinc")))
    if facts.family == "fedora":
        return Plan(commands=(("dnf", "install", "-y", "tinc"),))
    raise BootstrapError(
        "unsupported system {!r}: tinc is not installed and I do not know its package manager"
        .format(facts.os.name or facts.os.id or "unknown"), EXIT_UNSUPPORTED,
        "install tinc 1.0 (tincd) yourself, then run this again")


def apply_install(plan: Plan, facts: SystemFacts, root: str = "/") -> SystemFacts:
    """Run plan_install's commands; return the facts read afterwards."""
    if not plan.commands:
        return facts
    for cmd in plan.commands:
        run(cmd, timeout=900)
    facts = detect_system(root)
    if not facts.tinc_installed:
        raise BootstrapError("tinc was installed but tincd is not found", EXIT_COMMAND)
    return facts


def resolve_init(requested: str, facts: SystemFacts) -> str:
    """Map --init auto to systemd, sysv (Debian's nets.boot) or rc.local."""
    if requested not in INIT_CHOICES:
        raise BootstrapError("unknown init {!r}".format(requested), EXIT_USAGE,
                             "use one of: " + ", ".join(INIT_CHOICES))
    if requested != "auto":
        return requested
    if facts.init == "systemd":
        return "systemd"
    if facts.family == "debian":
        return "sysv"
    return "rc.local"


def service_unit(facts: SystemFacts, net: str) -> str:
    return "{}{}.service".format(facts.unit_template, net)


# ---------------------------------------------------------------------------
# Rendering tinc's files (pure).

def render_tinc_conf(name: str, net: str, connect_to: Sequence[str] = (),
                     extra: Sequence[str] = (), marker: str = TINC_CONF_MARKER) -> str:
    lines = [marker,
             "Name = " + name, "AddressFamily = ipv4", "Interface = " + interface_name(net)]
    lines += list(extra)
    lines += ["ConnectTo = " + hub for hub in connect_to]
    return "\n".join(lines) + "\n"


def render_host_file(lines: Sequence[str], public_pem: str) -> str:
    head = "\n".join(lines)
    return (head + "\n\n" if head else "") + public_pem.strip() + "\n"


REPLY_TABLE_BASE, REPLY_TABLES = 20000, 10000  # routing table (and ip rule priority) ids


def reply_table(net: str) -> int:
    """The routing table, and the priority of the ip rule, that send a node's replies from its
    VPN address back into the VPN: stable per net, in 20000..29999."""
    digest = hashlib.sha256(net.encode()).digest()
    return REPLY_TABLE_BASE + int.from_bytes(digest[:4], "big") % REPLY_TABLES


def _reply_route_lines(address: str, table: Optional[int], up: bool) -> str:
    """Policy routing by source: what leaves from the VPN address (replies to connections made
    to it, e.g. a service the hub publishes with `tinc-hub expose`) goes back into the VPN;
    everything else (tincd, apt, ...) keeps the main table. Re-runs leave one rule."""
    if table is None:
        return ""
    rule = "from {} lookup {} priority {}".format(address, table, table)
    lines = "ip rule del {} 2>/dev/null\n".format(rule)
    if up:
        lines = ("# replies from the VPN address go back through the VPN (tinc-hub expose)\n"
                 + lines + "ip rule add {}\n".format(rule)
                 + "ip route replace default dev \"$INTERFACE\" table {}\n".format(table))
    else:
        lines += "ip route flush table {} 2>/dev/null\n".format(table)
    return lines


def render_tinc_up(address: str, prefix: int, also: Optional[Sequence[str]] = None,
                   reply_table: Optional[int] = None, hold: Optional[str] = None) -> str:
    """tinc-up: the VPN address on the interface; with `reply_table` (nodes), the policy
    routing of _reply_route_lines; with `also` (a node's sync launcher, see
    sync_script_command), that command too, shell-quoted, skipped while the file `hold`
    exists (sync_hold_path: rotate-key's restart keeps the loop). The hub passes none."""
    return ("#!/bin/sh\n# Written by tinc-bootstrap: give the VPN interface its address.\n"
            "ip addr replace {}/{} dev \"$INTERFACE\"\n"
            "ip link set \"$INTERFACE\" up\n").format(address, prefix) + _reply_route_lines(
                address, reply_table, True) + _script_line(
                also, "keep this node's list of hubs in step (detached from tincd)", hold)


def render_tinc_down(address: str, prefix: int, also: Optional[Sequence[str]] = None,
                     reply_table: Optional[int] = None, hold: Optional[str] = None) -> str:
    return ("#!/bin/sh\n# Written by tinc-bootstrap.\n"
            "ip addr del {}/{} dev \"$INTERFACE\" 2>/dev/null\n"
            "ip link set \"$INTERFACE\" down\n").format(address, prefix) + _reply_route_lines(
                address, reply_table, False) + _script_line(
                also, "stop the sync loop started by tinc-up", hold)


SCRIPT_WORD_RE = re.compile(r"[^\x00-\x1f\x7f]{1,4096}")


def _script_line(cmd: Optional[Sequence[str]], comment: str, hold: Optional[str] = None) -> str:
    """A comment and cmd as one shell line (every word checked, then single-quoted); tincd
    goes on whatever the command does (`|| :`). With `hold`, cmd runs only while no file
    `hold` exists (`[ -e HOLD ] || CMD || :`)."""
    if not cmd:
        return ""
    words = list(cmd) + ([hold] if hold is not None else [])
    if not all(isinstance(word, str) and SCRIPT_WORD_RE.fullmatch(word) for word in words):
        raise ValueError("a control character or an empty word in {!r}".format(words))
    guard = "[ -e {} ] || ".format(shell_join([hold])) if hold is not None else ""
    if hold is not None:
        comment += " (not while {} exists: rotate-key's restart keeps the loop)".format(hold)
    return "# {}\n{}{} || :\n".format(comment, guard, shell_join(cmd))


PEM_LABELS = ("RSA PUBLIC KEY", "PUBLIC KEY")  # the public key blocks tinc 1.0 and the hub read
_PEM_LABEL = "(" + "|".join(PEM_LABELS) + ")"
# Exactly one public key block (the hub's check of a node's key, with fullmatch).
PUBLIC_KEY_PEM_RE = re.compile(
    r"-----BEGIN " + _PEM_LABEL + r"-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----")
# Where the public key block is in a host file (a search; the hub checks what the node sends).
_PEM_BLOCK_RE = re.compile(
    r"-----BEGIN " + _PEM_LABEL + r"-----\s.*?-----END " + _PEM_LABEL + r"-----", re.S)


def public_key_block(text: str) -> Optional[str]:
    """The (current, not `OLD`) public key PEM block in a host file."""
    match = _PEM_BLOCK_RE.search(text or "")
    return match.group(0) if match else None


def only_key_differs(old: Optional[str], new: str) -> bool:
    """True when two texts of a host file differ in their public key block alone, every other
    byte equal (a hub rotating its key: `tinc-hub rotate-key`)."""
    old_key, new_key = public_key_block(old or ""), public_key_block(new)
    if old is None or not old_key or not new_key or old_key == new_key:
        return False
    return old.replace(old_key, "", 1) == new.replace(new_key, "", 1)


def write_host_file(path: str, content: str, mode: int = 0o644) -> bool:
    """write_atomic for a peer's host file. When only its public key changes, the file keeps
    its old mtime, so tinc 1.0's SIGHUP keeps the connection made with the old key (a rotating
    hub publishes its new key first and switches later: its restart ends that connection and
    the next one reads the new key). Any other change gets a fresh mtime (tincd drops the
    connection at its next SIGHUP, as for every host file)."""
    real = os.path.realpath(path)
    try:
        before = os.stat(real)
        old = read_text(real)
    except (OSError, UnicodeDecodeError):
        before, old = None, None
    changed = write_atomic(real, content, mode)
    if changed and before is not None and only_key_differs(old, content):
        os.utime(real, ns=(before.st_atime_ns, before.st_mtime_ns))
    return changed


KEPT_STAMP_MIN_AGE = 2.0  # s between a host file's mtime and ctime that write_host_file made


def kept_key_stamps(paths: Sequence[str], older_than: float,
                    now: Optional[float] = None) -> List[str]:
    """The host files whose new key kept the old mtime (write_host_file: the ctime is well
    after the mtime) at least `older_than` s ago. By then the hub has switched to that key, and
    a connection made before (perhaps by someone holding the old key) must end: give the file a
    fresh mtime and SIGHUP tincd, which drops it and connects again at once."""
    now = time.time() if now is None else now
    due = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        if info.st_ctime - info.st_mtime > KEPT_STAMP_MIN_AGE and now - info.st_ctime >= older_than:
            due.append(path)
    return due


def host_file_subnets(text: str) -> List[str]:
    return [m.group(1) for m in re.finditer(r"(?mi)^\s*Subnet\s*=\s*(\S+)", text or "")]


def rc_local_line(net: str) -> str:
    return "tincd -n {}".format(net)


def render_rc_local(existing: Optional[str], net: str) -> str:
    """rc.local with our `tincd -n NET` line exactly once, before a final `exit 0`."""
    line = rc_local_line(net)
    if existing is None:
        return "#!/bin/sh\n# Started at boot; tinc line added by tinc-bootstrap.\n" + line + "\n"
    lines = existing.splitlines()
    if any(l.strip() == line for l in lines):
        return existing if existing.endswith("\n") else existing + "\n"
    index = len(lines)
    for i in range(len(lines) - 1, -1, -1):
        stripped = lines[i].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped == "exit 0":
            index = i
        break
    lines.insert(index, line)
    return "\n".join(lines) + "\n"


def remove_rc_local_line(existing: str, net: str) -> str:
    line = rc_local_line(net)
    return "".join(l for l in existing.splitlines(True) if l.strip() != line)


def render_nets_boot(existing: Optional[str], net: str, present: bool = True) -> str:
    lines = (existing or "## This file contains all names of the networks to be started "
             "on system startup.\n").splitlines()
    kept = [l for l in lines if l.strip() != net]
    if present:
        kept.append(net)
    return "\n".join(kept) + "\n"


# ---------------------------------------------------------------------------
# tincd: keys, boot registration, running.

def net_dir(tinc_dir: str, net: str) -> str:
    return os.path.join(tinc_dir, net)


def tincd_base(net: str, tinc_dir: str = DEFAULT_TINC_DIR) -> List[str]:
    cmd = ["tincd", "-n", net]
    if os.path.normpath(tinc_dir) != DEFAULT_TINC_DIR:
        cmd += ["-c", net_dir(tinc_dir, net)]
    return cmd


def plan_key(tinc_dir: str, net: str, size: int, has_key: bool) -> Plan:
    """`tincd -K` when there is no key pair yet (pure; keys are never regenerated)."""
    if has_key:
        return Plan()
    return Plan(commands=(tuple(tincd_base(net, tinc_dir) + ["-K{}".format(size)]),))


def has_key(tinc_dir: str, net: str) -> bool:
    return os.path.exists(os.path.join(net_dir(tinc_dir, net), "rsa_key.priv"))


def apply_key(plan: Plan, tinc_dir: str, net: str, name: str) -> str:
    """Run plan_key's command; return the public key PEM from hosts/NAME."""
    base = net_dir(tinc_dir, net)
    private = os.path.join(base, "rsa_key.priv")
    host = os.path.join(base, "hosts", name)
    if plan.commands:
        os.makedirs(os.path.join(base, "hosts"), exist_ok=True)
    for cmd in plan.commands:
        run(cmd, timeout=600)
    if os.path.exists(private):
        os.chmod(private, 0o600)
    pem = public_key_block(read_text(host) or "")
    if not pem:
        raise BootstrapError(
            "{} exists but {} holds no public key".format(private, host), EXIT_USAGE,
            "restore hosts/{0} or remove rsa_key.priv to make a new key pair".format(name))
    return pem


def pid_file_paths(net: str) -> Tuple[str, str]:
    """Where tinc 1.0's tincd writes its pid for NET (LOCALSTATEDIR /var/run, or /run)."""
    return ("/var/run/tinc.{}.pid".format(net), "/run/tinc.{}.pid".format(net))


def pid_from_file(net: str) -> Optional[int]:
    """The running tincd of NET, from its pidfile, if alive."""
    for path in pid_file_paths(net):
        text = read_text(path)
        if text is None:
            continue
        try:
            pid = int(text.split()[0])
        except (ValueError, IndexError):
            continue
        comm = read_text("/proc/{}/comm".format(pid))
        if comm is not None and comm.strip() == "tincd":
            return pid
    return None


def systemctl_state(verb: str, unit: str) -> str:
    """`systemctl is-active|is-enabled UNIT` as its one word ("active", "enabled", ...)."""
    return run(["systemctl", verb, unit], check=False).stdout.strip()


def boot_units(facts: SystemFacts, net: str) -> List[str]:
    """The systemd units that start NET's tincd at boot (the umbrella unit first)."""
    return ([facts.umbrella_unit] if facts.umbrella_unit else []) + [service_unit(facts, net)]


def plan_boot(net: str, init: str, facts: SystemFacts, rc_local_text: Optional[str] = None,
              nets_boot_text: Optional[str] = None, tinc_dir: str = DEFAULT_TINC_DIR,
              enabled: Sequence[str] = ()) -> Plan:
    """Files and commands that make tincd start at boot (pure); units in `enabled` are
    enabled already."""
    if init == "systemd":
        return Plan(commands=tuple(("systemctl", "enable", unit)
                                   for unit in boot_units(facts, net) if unit not in enabled))
    if init == "rc.local":
        return Plan(files=(FileSpec(facts.rc_local, render_rc_local(rc_local_text, net),
                                    0o755),))
    if init == "sysv":
        return Plan(files=(FileSpec(os.path.join(tinc_dir, "nets.boot"),
                                    render_nets_boot(nets_boot_text, net)),))
    return Plan()


def read_boot_plan(net: str, init: str, facts: SystemFacts,
                   tinc_dir: str = DEFAULT_TINC_DIR) -> Plan:
    """plan_boot on what is on this system now (rc.local, nets.boot, enabled units)."""
    enabled = [unit for unit in boot_units(facts, net) if init == "systemd"
               and systemctl_state("is-enabled", unit) == "enabled"]
    return plan_boot(net, init, facts, read_text(facts.rc_local),
                     read_text(os.path.join(tinc_dir, "nets.boot")), tinc_dir, enabled)


def apply_boot(plan: Plan) -> List[str]:
    """Write plan_boot's files, run its commands. Returns the files and units changed."""
    changed = apply_files(plan.files)
    for cmd in plan.commands:
        run(cmd)
        changed.append(cmd[-1])
    return changed


def tincd_alive(pid: int) -> bool:
    """True while tincd `pid` runs: a zombie (exited, its parent has not reaped it yet: init
    may take seconds) has already closed its sockets, its device and removed its pidfile."""
    try:
        stat = read_text("/proc/{}/stat".format(pid))
    except OSError:
        return False
    if stat is None or ")" not in stat:
        return False
    name, _, rest = stat.partition(" (")[2].rpartition(")")
    return name == "tincd" and rest.split()[:1] not in (["Z"], ["X"])


def wait_for_exit(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not tincd_alive(pid):
            return True
        time.sleep(0.01)
    return False


class TincdState(NamedTuple):
    """Whether NET's tincd runs: for systemd, its unit and the umbrella unit are active; else
    the pid of the running tincd."""
    active: bool = False
    umbrella_active: bool = False
    pid: Optional[int] = None


def read_tincd_state(net: str, how: str, facts: SystemFacts) -> TincdState:
    """TincdState of NET now; `how` is "systemd" or "direct"."""
    if how == "systemd":
        return TincdState(
            systemctl_state("is-active", service_unit(facts, net)) == "active",
            bool(facts.umbrella_unit)
            and systemctl_state("is-active", facts.umbrella_unit) == "active")
    pid = pid_from_file(net)
    return TincdState(pid is not None, pid=pid)


def plan_start(net: str, how: str, facts: SystemFacts, state: TincdState, restart: bool,
               tinc_dir: str = DEFAULT_TINC_DIR) -> Plan:
    """Commands that start NET's tincd when it is not running, and restart it when `restart`
    (its files changed); `how`: "systemd" (units) or "direct" (tincd itself). Pure."""
    if state.active and not restart:
        return Plan()
    if how == "systemd":
        unit = service_unit(facts, net)
        if state.active:
            return Plan(commands=(("systemctl", "restart", unit),))
        commands = [("systemctl", "start", unit)]
        if facts.umbrella_unit and not state.umbrella_active:
            commands.append(("systemctl", "start", facts.umbrella_unit))
        return Plan(commands=tuple(commands))
    start = tuple(tincd_base(net, tinc_dir))
    return Plan(commands=((start + ("-k",), start) if state.active else (start,)))


def apply_start(plan: Plan, state: TincdState) -> str:
    """Run plan_start's commands (after `tincd -k`, wait for the old tincd to exit).
    Returns what happened: running, started or restarted."""
    for cmd in plan.commands:
        if cmd[-1] != "-k":
            run(cmd)
            continue
        run(cmd, check=False)
        if state.pid is not None and not wait_for_exit(state.pid):
            raise BootstrapError("tincd (pid {}) did not stop".format(state.pid), EXIT_COMMAND,
                                 "stop it by hand and run this again")
    if not plan.commands:
        return "running"
    return "restarted" if state.active else "started"


def stop_and_unregister(net: str, init: str, facts: SystemFacts,
                        tinc_dir: str = DEFAULT_TINC_DIR) -> None:
    """Undo apply_boot and stop tincd for NET."""
    if init == "systemd":
        unit = service_unit(facts, net)
        run(["systemctl", "disable", "--now", unit], check=False)
        if facts.umbrella_unit:
            wants = "/etc/systemd/system/{}.wants".format(facts.umbrella_unit)
            others = [w for w in (os.listdir(wants) if os.path.isdir(wants) else [])
                      if w.endswith(".service")]
            if not others:
                run(["systemctl", "disable", facts.umbrella_unit], check=False)
    elif init == "rc.local":
        text = read_text(facts.rc_local)
        if text is not None:
            write_atomic(facts.rc_local, remove_rc_local_line(text, net), 0o755)
    elif init == "sysv":
        path = os.path.join(tinc_dir, "nets.boot")
        text = read_text(path)
        if text is not None:
            write_atomic(path, render_nets_boot(text, net, present=False))
    pid = pid_from_file(net)
    if pid is not None:
        run(tincd_base(net, tinc_dir) + ["-k"], check=False)
        wait_for_exit(pid)


# ---------------------------------------------------------------------------
# Talking to the hub: HTTPS pinned to the certificate key named in the token.

class HubAnswer(NamedTuple):
    status: int
    body: dict
    retry_after: float = 0.0  # seconds from a Retry-After header (429/503), else 0


def parse_retry_after(value: Optional[str]) -> float:
    """Seconds from a Retry-After header in delta-seconds form (at most an hour); else 0."""
    text = (value or "").strip()
    return float(min(int(text), 3600)) if text.isdigit() else 0.0


class Unreachable(Exception):
    """A failure worth retrying: the hub may still be starting."""


def _pinned_request(host: str, port: int, pin: str, method: str, path: str,
                    body: Optional[bytes], headers: Dict[str, str],
                    timeout: float = 15.0) -> HubAnswer:
    """One request over pinned TLS; its JSON answer (an object; anything else becomes an
    `error`)."""
    status, raw, retry_after = _pinned_exchange(host, port, pin, method, path, body, headers,
                                                timeout)
    try:
        parsed = json.loads(raw.decode("utf-8")) if raw else {}
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..."
        parsed = {"error": "non-JSON answer (HTTP {})".format(status)}
    if not isinstance(parsed, dict):
        parsed = {"error": "unexpected answer"}
    return HubAnswer(status, parsed, retry_after)


def _pinned_exchange(host: str, port: int, pin: str, method: str, path: str,
                     body: Optional[bytes], headers: Dict[str, str],
                     timeout: float = 15.0) -> Tuple[int, bytes, float]:
    """(HTTP status, body of at most MAX_ANSWER bytes, Retry-After seconds) of one request to
    host:port, sent only after the TLS key of the peer matched `pin`."""
    import http.client  # here: with ssl and email, a third of this module's import time,
    import ssl  # which every tinc-hub command pays (the hub imports this module)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The hub's certificate is self-signed: trust comes from the pin checked below,
    # before a single byte (and so before the token) is sent.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if hasattr(ssl, "TLSVersion"):  # Python >= 3.7 (vermin: guarded, hence novermin)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            raise Unreachable("cannot connect to {}:{}: {}".format(host, port, exc))
        der = conn.sock.getpeercert(binary_form=True)
        try:
            actual = spki_pin_from_cert_der(der or b"")
        except ValueError as exc:  # not strict DER: never guess which key TLS used
            actual = "a certificate that is not strict DER ({})".format(exc)
        if actual != pin:
            raise BootstrapError(
                "the hub's TLS certificate does not match the pin in the token "
                "(expected {}, got {})".format(pin, actual), EXIT_REFUSED,
                "check --hub, or make a new token on the hub")
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read(MAX_ANSWER + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable("connection to {}:{} failed: {}".format(host, port, exc))
        if len(raw) > MAX_ANSWER:
            raise BootstrapError("the hub's answer is too large", EXIT_REFUSED)
        return response.status, raw, parse_retry_after(response.getheader("Retry-After"))
    finally:
        conn.close()


def enroll(token_text: str, token: Token, host: str, port: int, name: str, public_pem: str,
           timeout: float, sleep: Callable[[float], None] = time.sleep) -> dict:
    """POST /v1/enroll to one hub (host, port, the token's pin) until `timeout`."""
    return enroll_any(token_text, [HubEndpoint(host, port, token.pin, token.hub)], name,
                      public_pem, timeout, sleep)[1]


def enroll_any(token_text: str, hubs: Sequence[HubEndpoint], name: str, public_pem: str,
               timeout: float, sleep: Callable[[float], None] = time.sleep,
               credential: Optional[str] = None) -> Tuple[HubEndpoint, dict]:
    """POST /v1/enroll to the hubs in order until one enrols this node: (that hub, its answer).
    A refusal (4xx other than 429) is final: the hubs share one registry. An unreachable hub,
    429 and 5xx pass to the next hub; after each round, back off until `timeout` seconds.
    `credential`: the node's current sync credential, sent so that a replay needs no new one."""
    fields = {"name": name, "public_key": public_pem}
    if credential:
        fields["credential"] = credential
    body = json.dumps(fields).encode()
    headers = {"Authorization": "Bearer " + token_text, "Content-Type": "application/json",
               "User-Agent": "tinc-bootstrap/" + __version__}
    deadline = time.monotonic() + timeout
    delay = 1.0
    attempt = 0
    while True:
        attempt += 1
        retry_after = 0.0
        reasons = []
        for hub in hubs:
            try:
                answer = _pinned_request(hub.host, hub.port, hub.pin, "POST", "/v1/enroll",
                                         body, headers)
            except Unreachable as exc:
                reasons.append((hub, str(exc)))
                continue
            if answer.status == 200:
                return hub, answer.body
            message = str(answer.body.get("error") or "HTTP {}".format(answer.status))
            message = "".join(c if c.isprintable() else "?" for c in message[:300])
            if answer.status != 429 and answer.status < 500:
                raise BootstrapError("the hub refused the enrolment: " + message,
                                     EXIT_REFUSED, _refusal_hint(answer.status))
            reasons.append((hub, "hub answered {}: {}".format(answer.status, message)))
            retry_after = max(retry_after, answer.retry_after)
        if len(hubs) == 1:
            reason = reasons[0][1]
        else:
            reason = "; ".join("{} ({}:{}): {}".format(hub.name, hub.host, hub.port, why)
                               for hub, why in reasons)
        left = deadline - time.monotonic()
        if left <= 0:
            if len(hubs) == 1:
                raise BootstrapError("hub {}:{} unreachable for {:.0f} s ({} attempts): {}".format(
                    hubs[0].host, hubs[0].port, timeout, attempt, reason), EXIT_UNREACHABLE,
                    "check that `tinc-hub serve` runs and that TCP {} is open".format(
                        hubs[0].port))
            raise BootstrapError("none of the {} hubs enrolled this node within {:.0f} s ({} "
                                 "rounds): {}".format(len(hubs), timeout, attempt, reason),
                                 EXIT_UNREACHABLE,
                                 "check that `tinc-hub serve` runs on a hub and that its API "
                                 "port is open")
        wait = delay * random.uniform(0.8, 1.0)
        if retry_after:  # the hub said when (rate limit): not earlier, spread over 20 %
            wait = max(wait, retry_after * random.uniform(1.0, 1.2))
        wait = min(wait, left)
        REPORT.step("hub not ready ({}); retrying in {:.1f} s".format(reason, wait))
        sleep(wait)
        delay = min(delay * 2, 15.0)


def _refusal_hint(status: int) -> str:
    if status == 401:
        return "the token is unknown, used up or expired: make a new one with `tinc-hub token create`"
    if status == 403:
        return "the token is bound to another name, or this node was revoked"
    if status == 409:
        return "this name is enrolled with another key: use --name, or a token made with --replace"
    return "see the hub's message above"


# The hub's host file. tinc 1.0 reads PublicKey and PublicKeyFile from a peer's host file
# before its PEM block (and Address, Port, IndirectData, TCPOnly, Weight, PMTU, ClampMSS,
# Subnet): written as the hub sent it, the key checked here need not be the key tincd trusts,
# and tincd (root) would open any PublicKeyFile path. So the node keeps only what it checked.
HUB_HOST_LINE_RE = re.compile(r"(Address|Port|Subnet) = ([^ ]+)(?: ([^ ]+))?")
PEM_BODY_LINE_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
RSA_ALGORITHM_DER = bytes.fromhex("300d06092a864886f70d0101010500")  # rsaEncryption, NULL
MAX_HUB_HOST_LINES = 64


def _port_number(text: str) -> int:
    """A TCP/UDP port written as a plain decimal number; ValueError otherwise."""
    if not re.fullmatch(r"[1-9][0-9]{0,4}", text) or int(text) > 65535:
        raise ValueError("bad port {!r}".format(text))
    return int(text)


def _der_positive_integer(reader: DerReader) -> None:
    """The next element is a minimally encoded positive INTEGER; ValueError otherwise."""
    data = reader.data
    _, content, end = reader.take(DER_INTEGER)
    if content == end or data[content] & 0x80 or (
            end - content > 1 and data[content] == 0 and not data[content + 1] & 0x80):
        raise ValueError("not a minimal positive DER INTEGER")


def rsa_public_key_pem(label: str, der: bytes) -> str:
    """The PKCS#1 `RSA PUBLIC KEY` PEM of a strict-DER RSA key (PKCS#1, or SPKI when label is
    `PUBLIC KEY`), re-encoded; ValueError for anything else."""
    if label == "PUBLIC KEY":
        outer = DerReader(der, 0, len(der))
        spki = outer.enter(DER_SEQUENCE)
        outer.finish()
        start, _, end = spki.take(DER_SEQUENCE)
        if der[start:end] != RSA_ALGORITHM_DER:
            raise ValueError("the public key is not an RSA key")
        der = spki.take_key_bits()
        spki.finish()
    outer = DerReader(der, 0, len(der))
    key = outer.enter(DER_SEQUENCE)
    outer.finish()
    _der_positive_integer(key)  # modulus
    _der_positive_integer(key)  # public exponent
    key.finish()
    body = base64.b64encode(der).decode()
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return "\n".join(["-----BEGIN RSA PUBLIC KEY-----"] + lines + ["-----END RSA PUBLIC KEY-----"])


def rebuild_hub_host_file(text: str) -> str:
    """hosts/HUB made from the hub's host file text: its Address, Port and Subnet lines, each
    checked and rewritten, and its one RSA public key, re-encoded. Anything else in the text
    (another variable, a second key, a control character) is a ValueError saying what."""
    if not re.fullmatch(r"[\x20-\x7e\n]*", text):
        raise ValueError("it holds a control or non-ASCII character")
    lines, pem, label, body = [], None, None, []  # type: List[str], Optional[str], Optional[str], List[str]
    for number, line in enumerate(text.split("\n"), 1):
        where = "line {} ({!r})".format(number, line[:80])
        if label is not None:  # inside the key block
            if line == "-----END {}-----".format(label):
                try:
                    der = base64.b64decode("".join(body), validate=True)
                    pem = rsa_public_key_pem(label, der)
                except ValueError as exc:
                    raise ValueError("its public key is not a strict DER RSA key ({})".format(exc))
                label = None
            elif PEM_BODY_LINE_RE.fullmatch(line):
                body.append(line)
            else:
                raise ValueError("{}: not base64 inside the public key".format(where))
            continue
        if not line or line.startswith("#"):
            continue
        begin = re.fullmatch(r"-----BEGIN ([A-Z ]+)-----", line)
        if begin:
            if pem is not None or begin.group(1) not in PEM_LABELS:
                raise ValueError("{}: only one RSA PUBLIC KEY block is allowed".format(where))
            label, body = begin.group(1), []
            continue
        match = HUB_HOST_LINE_RE.fullmatch(line)
        if not match:
            raise ValueError("{}: only `Address = HOST [PORT]`, `Port = PORT` and "
                             "`Subnet = A.B.C.D/N` lines are accepted".format(where))
        variable, value, extra = match.groups()
        try:
            if variable == "Address":
                problem = host_problem(value)
                if problem:
                    raise ValueError(problem)
                value += "" if extra is None else " {}".format(_port_number(extra))
            elif extra is not None:
                raise ValueError("one value only")
            elif variable == "Port":
                if any(l.startswith("Port = ") for l in lines):
                    raise ValueError("a second Port")
                value = str(_port_number(value))
            elif str(ipaddress.IPv4Network(value)) != value:  # Subnet: canonical, host bits 0
                raise ValueError("not a canonical A.B.C.D/N")
        except ValueError as exc:
            raise ValueError("{}: {}".format(where, exc))
        lines.append("{} = {}".format(variable, value))
        if len(lines) > MAX_HUB_HOST_LINES:
            raise ValueError("more than {} lines".format(MAX_HUB_HOST_LINES))
    if label is not None or pem is None:
        raise ValueError("it holds no complete RSA PUBLIC KEY block")
    if not any(l.startswith("Address = ") for l in lines):
        raise ValueError("it has no Address line")
    return render_host_file(lines, pem)


def validate_answer(answer: dict, name: str) -> Tuple[str, int, str, str]:
    """(address, prefix, hub name, hub host file) from an enrolment answer, checked; the hub
    host file is rebuilt from its checked parts (rebuild_hub_host_file), never kept as sent."""
    bad = BootstrapError("the hub's answer is malformed", EXIT_REFUSED,
                         "hub and bootstrap versions may differ")
    try:
        address = answer["address"]
        prefix = answer["prefix"]
        hub = answer["hub"]["name"]
        host_file = answer["hub"]["host_file"]
    except (KeyError, TypeError):
        raise bad
    if answer.get("name") != name or not isinstance(prefix, int) or isinstance(prefix, bool) \
            or not 1 <= prefix <= 30 or not isinstance(address, str) \
            or not isinstance(hub, str) or not valid_node_name(hub) \
            or not isinstance(host_file, str):
        raise bad
    try:
        node = ipaddress.IPv4Address(address)
        network = ipaddress.IPv4Network("{}/{}".format(address, prefix), strict=False)
    except ValueError:
        raise bad
    if str(node) != address or node in (network.network_address, network.broadcast_address) \
            or node.is_loopback or node.is_multicast or node.is_unspecified or node.is_reserved:
        raise BootstrapError("the hub gave this node the address {}/{}, which is not a unicast "
                             "host address".format(address, prefix), EXIT_REFUSED)
    try:
        host_file = rebuild_hub_host_file(host_file)
    except ValueError as exc:
        raise BootstrapError("the hub's host file is refused: {}".format(exc), EXIT_REFUSED,
                             "hub and bootstrap versions may differ")
    problem = hub_vpn_problem(host_file, address, prefix)
    if problem:
        raise BootstrapError(problem, EXIT_REFUSED)
    return address, prefix, hub, host_file


def hub_vpn_problem(host_file: str, address: str, prefix: int) -> Optional[str]:
    """Why the hub's VPN address (its /32 Subnet in a rebuilt host file) is not another host
    of this node's VPN; None when it is."""
    node = ipaddress.IPv4Address(address)
    network = ipaddress.IPv4Network("{}/{}".format(address, prefix), strict=False)
    hub_vpn = ipaddress.IPv4Address(hub_vpn_address(host_file, address, prefix))
    if hub_vpn not in network or hub_vpn in (node, network.network_address,
                                             network.broadcast_address):
        return "the hub's VPN address {} is not another host of the VPN {}".format(
            hub_vpn, network)
    return None


# ---------------------------------------------------------------------------
# Ping over the VPN (ICMP echo from Python; the `ping` binary only as a fallback).

def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _ping_command(address: str, timeout: float) -> bool:
    """One echo through the `ping` binary (when raw sockets are not allowed)."""
    return run(["ping", "-c", "1", "-W", str(max(1, int(timeout))), address],
               check=False).returncode == 0


def _echo_request(ident: int, seq: int) -> bytes:
    payload = b"tinc-bootstrap"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + payload), ident, seq) + payload


def _is_echo_reply(data: bytes, peer: str, address: str, ident: int) -> bool:
    offset = (data[0] & 0x0F) * 4 if data else 0
    if peer != address or len(data) < offset + 8:
        return False
    kind, _, _, got_ident, _ = struct.unpack("!BBHHH", data[offset:offset + 8])
    return kind == 0 and got_ident == ident


def ping(address: str, timeout: float = 1.0) -> bool:
    """True when address answers one ICMP echo within timeout."""
    return wait_for_ping(address, timeout, interval=timeout)


def nudge_tincd(net: str) -> None:
    """SIGALRM: tincd retries its not yet established outgoing connections now instead of
    after its backoff (5 s, 10 s, ...). The hub's tincd accepts only 10 new connections per
    second and stalls the rest, so nodes joining together otherwise wait for that backoff."""
    pid = pid_from_file(net)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGALRM)
        except OSError:
            pass


def wait_for_ping(address: str, timeout: float, interval: float = 0.1,
                  nudge: Optional[Callable[[], None]] = None, nudge_every: float = 2.0,
                  max_interval: Optional[float] = None) -> bool:
    """True as soon as address answers an ICMP echo; one echo every `interval` s (a request
    sent before the tunnel is up is lost, so waiting a full second for it would cost a
    second), growing by half each time up to `max_interval`; any reply counts. Without an
    answer, `nudge()` every `nudge_every` s."""
    max_interval = max(interval, max_interval or interval)
    deadline = time.monotonic() + timeout
    next_nudge = time.monotonic() + nudge_every
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:  # not root: one `ping` at a time
        while True:
            if _ping_command(address, min(1.0, max(0.1, deadline - time.monotonic()))):
                return True
            if time.monotonic() + interval >= deadline:
                return False
            time.sleep(interval)
    ident = random.randint(0, 0xFFFF)
    seq = 0
    try:
        while time.monotonic() < deadline:
            if nudge is not None and time.monotonic() >= next_nudge:
                nudge()
                next_nudge = time.monotonic() + nudge_every
            seq = (seq + 1) & 0xFFFF
            try:
                sock.sendto(_echo_request(ident, seq), (address, 0))
            except OSError:  # no route yet (tinc-up has not run)
                pass
            next_send = min(deadline, time.monotonic() + interval)
            interval = min(max_interval, interval * 1.5)
            while True:
                left = next_send - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    data, peer = sock.recvfrom(2048)
                except socket.timeout:
                    break
                except OSError:
                    time.sleep(left)
                    break
                if _is_echo_reply(data, peer[0], address, ident):
                    return True
        return False
    finally:
        sock.close()


def hub_vpn_address(host_file: str, address: str, prefix: int) -> str:
    """The hub's VPN address: its /32 Subnet, else the first host of the VPN prefix."""
    for subnet in host_file_subnets(host_file):
        if subnet.endswith("/32"):
            return subnet[:-3]
    network = ipaddress.IPv4Network("{}/{}".format(address, prefix), strict=False)
    return str(network.network_address + 1)


# ---------------------------------------------------------------------------
# Several hubs: the list of hubs in the hub's answers, the node's sync credential, and
# `bootstrap.py sync`, which keeps hosts/<hub> and tinc.conf's ConnectTo lines in step.

MAX_HUBS = 32  # each is a meta connection from every node, plus one RSA key to check per answer
HUBS_FILE = "hubs.json"  # the hubs this node knows: API endpoints and pins (0600)
CREDENTIAL_FILE = "credential"  # the node's sync credential (0600)
SCRIPT_FILE = "bootstrap.py"  # this script, installed in the net dir for tinc-up/tinc-down
CREDENTIAL_RE = re.compile(r"[0-9a-f]{64}")
NODE_KEEPALIVE = ("PingInterval = 5", "PingTimeout = 3")
# A node retries a hub it lost every RETRY_MIN_S..RETRY_MIN_S+RETRY_SPREAD_S-1 s (fixed per node)
RETRY_MIN_S, RETRY_SPREAD_S = 5, 10
SYNC_INTERVAL_MIN, SYNC_INTERVAL_MAX = 10, 3600  # the bounds put on the hub's `interval`
DEFAULT_SYNC_INTERVAL = 30  # what a hub answers unless `tinc-hub serve --sync-interval`
SYNC_RETRY_MAX = 60.0  # the longest wait between two rounds while no hub answers
SCRIPT_SHEBANG = b"#!/usr/bin/env python3\n"
_OWN_FILE = os.path.abspath(globals().get("__file__") or "<stdin>")


class HubInfo(NamedTuple):
    """One hub of an answer's `hubs`: its name, its host file (rebuilt), its API endpoint."""
    name: str
    host_file: str
    api: HubEndpoint


def validate_hubs(value: object, node_name: str, address: str, prefix: int) -> List[HubInfo]:
    """The `hubs` of an enrolment or sync answer, checked: a list of 1 to MAX_HUBS objects,
    each with a valid name (distinct, not this node's), an `api` endpoint checked like a
    token's, and a host file that rebuild_hub_host_file accepts (kept rebuilt) whose /32 is
    another host of this node's VPN, distinct per hub. Keys this version does not know are
    ignored (later versions may add some). ValueError says what is wrong."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_HUBS:
        raise ValueError("`hubs` must be a list of 1 to {} hubs".format(MAX_HUBS))
    hubs, names, addresses = [], set(), set()  # type: List[HubInfo], set, set
    for index, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise ValueError("hub #{} is not an object".format(index))
        name, api, text = item.get("name"), item.get("api"), item.get("host_file")
        if not isinstance(name, str) or not valid_node_name(name):
            raise ValueError("hub #{} has no valid name".format(index))
        if name.lower() == node_name.lower():
            raise ValueError("hub {} has this node's name".format(name))
        if name.lower() in names:
            raise ValueError("hub {} is listed twice".format(name))
        if not isinstance(api, dict):
            raise ValueError("hub {}: `api` is not an object".format(name))
        endpoint = HubEndpoint(api.get("host"), api.get("port"), api.get("pin"), name)
        if not valid_endpoint(endpoint):
            raise ValueError("hub {}: `api` needs a host name or IP address, a port and a pin "
                             "(sha256//...)".format(name))
        if not isinstance(text, str):
            raise ValueError("hub {}: `host_file` is not a string".format(name))
        try:
            host_file = rebuild_hub_host_file(text)
        except ValueError as exc:
            raise ValueError("hub {}: host file refused: {}".format(name, exc))
        problem = hub_vpn_problem(host_file, address, prefix)
        if problem:
            raise ValueError("hub {}: {}".format(name, problem))
        hub_vpn = hub_vpn_address(host_file, address, prefix)
        if hub_vpn in addresses:
            raise ValueError("hub {}: VPN address {} is another hub's".format(name, hub_vpn))
        names.add(name.lower())
        addresses.add(hub_vpn)
        hubs.append(HubInfo(name, host_file, endpoint))
    return hubs


def read_private(path: str) -> Optional[str]:
    """The text of a root-only file (credential, hubs.json); None when missing or unreadable
    (a dry run as another user)."""
    try:
        return read_text(path)
    except (OSError, UnicodeDecodeError):
        return None


def valid_credential(value: object) -> bool:
    """A node credential as the hub issues it: 64 lowercase hex digits."""
    return isinstance(value, str) and CREDENTIAL_RE.fullmatch(value) is not None


def remember_secret(secret: Optional[str]) -> None:
    """Mask `secret` in every later log and stderr line (redact)."""
    if secret and secret not in _SECRETS:
        _SECRETS.append(secret)


def node_retry_seconds(name: str) -> int:
    """The seconds between a node's attempts to reach a hub it lost: fixed for the node
    (MinTimeout = MaxTimeout) and spread over RETRY_MIN_S + 0..RETRY_SPREAD_S-1 by its name
    (stable: a re-run writes the same tinc.conf). Why: a hub's tincd 1.0 accepts 10 new meta
    connections per second and holds the rest in a tarpit, and tinc's own backoff (5, 10,
    15 ... s, all nodes in step after a hub restart) wastes most seconds of a big fleet's
    reconnection; fixed, spread retries fill every second (docs/DESIGN.md, Keepalive)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return RETRY_MIN_S + int.from_bytes(digest[:4], "big") % RETRY_SPREAD_S


def node_keepalive(name: str) -> Tuple[str, ...]:
    """A node's keepalive lines: notice a dead hub in seconds, retry it every few seconds."""
    retry = node_retry_seconds(name)
    return NODE_KEEPALIVE + ("MinTimeout = {}".format(retry), "MaxTimeout = {}".format(retry))


def render_node_tinc_conf(name: str, net: str, hubs: Sequence[str]) -> str:
    """A node's tinc.conf with several hubs: ConnectTo every hub (sorted: the bytes do not
    depend on which hub answered) and the keepalive that notices a dead hub in seconds."""
    return render_tinc_conf(name, net, sorted(hubs), extra=node_keepalive(name))


def render_hubs_record(hub_net: str, hubs: Sequence[HubEndpoint]) -> str:
    """hubs.json: the hub's net name and each hub's API endpoint and pin, in the order to ask."""
    return json.dumps({"net": hub_net, "hubs": [
        {"name": hub.name, "host": hub.host, "port": hub.port, "pin": hub.pin} for hub in hubs]},
        indent=2, sort_keys=True) + "\n"


def parse_hubs_record(text: str) -> Tuple[str, List[HubEndpoint]]:
    """(hub net, endpoints) from hubs.json; ValueError unless every field is as written."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("not JSON")
    if not isinstance(record, dict) or not isinstance(record.get("net"), str) \
            or not NET_RE.fullmatch(record["net"]) or not isinstance(record.get("hubs"), list) \
            or not 1 <= len(record["hubs"]) <= MAX_HUBS:
        raise ValueError("not a record of hubs")
    hubs = []
    for item in record["hubs"]:
        if not isinstance(item, dict) or set(item) != {"name", "host", "port", "pin"}:
            raise ValueError("a hub entry is not {name, host, port, pin}")
        hub = HubEndpoint(item["host"], item["port"], item["pin"], item["name"])
        if not valid_endpoint(hub):
            raise ValueError("a hub entry is malformed")
        hubs.append(hub)
    if len({hub.name.lower() for hub in hubs}) != len(hubs):
        raise ValueError("a hub is listed twice")
    return record["net"], hubs


def plan_hub_files(tinc_dir: str, net: str, name: str, hub_net: str, hubs: Sequence[HubInfo],
                   known: Sequence[str], current: Dict[str, Optional[str]],
                   only_changed: bool) -> Plan:
    """hosts/<hub> of every hub, tinc.conf naming them all, hubs.json; and `rm` of the host
    file of every hub in `known` (hubs this script wrote) that is no longer listed and whose
    file is there (`current`: path -> text now, None when missing). With `only_changed`,
    only the files whose text differs from `current`. Pure."""
    base = net_dir(tinc_dir, net)
    listed = [hub.name for hub in hubs]
    files = [FileSpec(os.path.join(base, "hosts", hub.name), hub.host_file.rstrip("\n") + "\n")
             for hub in hubs]
    files.append(FileSpec(os.path.join(base, "tinc.conf"),
                          render_node_tinc_conf(name, net, listed)))
    files.append(FileSpec(os.path.join(base, HUBS_FILE),
                          render_hubs_record(hub_net, [hub.api for hub in hubs]), 0o600))
    if only_changed:
        files = [spec for spec in files if current.get(spec.path) != spec.content]
    keep = {hub.lower() for hub in listed} | {name.lower()}
    gone = sorted({hub for hub in known if valid_node_name(hub) and hub.lower() not in keep})
    commands = tuple(("rm", "-f", "--", os.path.join(base, "hosts", hub)) for hub in gone
                     if current.get(os.path.join(base, "hosts", hub)) is not None)
    return Plan(files=tuple(files), commands=commands)


def read_texts(paths: Sequence[str]) -> Dict[str, Optional[str]]:
    """path -> its text now (None when missing): the facts plan_hub_files compares with."""
    texts = {}  # type: Dict[str, Optional[str]]
    for path in paths:
        try:
            texts[path] = read_text(path)
        except (OSError, UnicodeDecodeError):
            texts[path] = ""  # unreadable: differs from anything we write, so it is rewritten
    return texts


def hub_file_paths(tinc_dir: str, net: str, names: Sequence[str]) -> List[str]:
    """The files plan_hub_files may touch for these hub names (for read_texts)."""
    base = net_dir(tinc_dir, net)
    return ([os.path.join(base, "hosts", hub) for hub in names if valid_node_name(hub)]
            + [os.path.join(base, "tinc.conf"), os.path.join(base, HUBS_FILE)])


def sync_script_command(python: str, script: str, net: str, tinc_dir: str,
                        action: str) -> List[str]:
    """The line tinc-up (`--daemon`) or tinc-down (`--stop`) runs."""
    cmd = [python, script, "sync", "--net", net]
    if os.path.normpath(tinc_dir) != DEFAULT_TINC_DIR:
        cmd += ["--tinc-dir", tinc_dir]
    return cmd + [action]


def sync_python() -> str:
    """The interpreter tinc-up runs the sync loop with: this one (an absolute path)."""
    exe = sys.executable or ""
    return exe if os.path.isabs(exe) and SCRIPT_WORD_RE.fullmatch(exe) else "python3"


def own_script_source() -> Optional[bytes]:
    """This script's bytes, when it runs from a file (None when piped into `python3 -`)."""
    try:
        with open(_OWN_FILE, "rb") as handle:
            data = handle.read(MAX_ANSWER + 1)
    except OSError:
        return None
    try:
        return check_script_source(data)
    except ValueError:
        return None


def check_script_source(data: bytes) -> bytes:
    """data, if it is a Python script of this kind (shebang, UTF-8, compiles, < 1 MiB)."""
    if len(data) > MAX_ANSWER or not data.startswith(SCRIPT_SHEBANG):
        raise ValueError("not a python3 script")
    try:
        compile(data.decode("utf-8"), SCRIPT_FILE, "exec")
    except (UnicodeDecodeError, SyntaxError, ValueError) as exc:
        raise ValueError("it does not compile ({})".format(type(exc).__name__))
    return data


def fetch_script(hubs: Sequence[HubEndpoint]) -> bytes:
    """bootstrap.py from the first hub that serves it (GET /bootstrap.py, pinned TLS)."""
    reasons = []
    for hub in hubs:
        try:
            status, raw, _ = _pinned_exchange(hub.host, hub.port, hub.pin, "GET", "/bootstrap.py",
                                              None, {"User-Agent": "tinc-bootstrap/" + __version__})
            if status != 200:
                raise ValueError("HTTP {}".format(status))
            return check_script_source(raw)
        except (Unreachable, BootstrapError, ValueError) as exc:
            reasons.append("{}: {}".format(hub.name, exc))
    raise BootstrapError("cannot fetch bootstrap.py for the sync loop ({})".format(
        "; ".join(reasons)), EXIT_UNREACHABLE, "run this again, or run bootstrap.py from a file")


LOCK_WAIT = 60.0  # s: a lock held longer than this is not ours to wait for


def flock_bounded(fd: int, seconds: float, what: str) -> None:
    """flock(LOCK_EX) that gives up after `seconds`: any user who can open a directory or a
    world-readable file can flock it, and must not hang a join or the sync loop forever.
    OSError(EWOULDBLOCK) naming `what` when the time is up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            raise OSError(errno.EWOULDBLOCK, "another process has held the lock on {} for "
                          "{:.0f} s".format(what, seconds))
        time.sleep(0.05)


class net_lock:
    """flock on the net directory: join and sync never write its files at the same time.
    BootstrapError when another process holds it for LOCK_WAIT seconds."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fd = -1

    def __enter__(self) -> "net_lock":
        self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flock_bounded(self.fd, LOCK_WAIT, self.directory)
        except OSError as exc:
            os.close(self.fd)
            raise BootstrapError("cannot lock {}: {}".format(self.directory, exc.strerror),
                                 EXIT_ERROR, "see which process holds it: fuser -v {}".format(
                                     self.directory))
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class NodeRecord(NamedTuple):
    """What sync needs of a joined node, read from its net dir (read_node_record)."""
    net: str
    name: str
    address: str
    prefix: int
    hub_net: str
    hubs: Tuple[HubEndpoint, ...]
    known: Tuple[str, ...]  # hubs whose host file this script wrote
    credential: Optional[str]


def read_node_record(tinc_dir: str, net: str) -> NodeRecord:
    """The NodeRecord of net; BootstrapError (usage) when a file is missing or damaged."""
    base = net_dir(tinc_dir, net)
    rerun = "re-run the one-liner (bootstrap.py with a token from a hub of this version)"
    state = load_state(tinc_dir, net) or {}
    name, address, prefix = state.get("name"), state.get("address"), state.get("prefix")
    try:
        ipaddress.IPv4Address(address)
        valid = isinstance(name, str) and valid_node_name(name) and isinstance(prefix, int) \
            and not isinstance(prefix, bool) and 1 <= prefix <= 30
    except ValueError:
        valid = False
    if not valid:
        raise BootstrapError("{} is missing or damaged".format(os.path.join(base, STATE_FILE)),
                             EXIT_USAGE, rerun)
    text = read_private(os.path.join(base, HUBS_FILE))
    if text is None:
        raise BootstrapError("this node has no list of hubs ({} is missing)".format(
            os.path.join(base, HUBS_FILE)), EXIT_USAGE, rerun)
    try:
        hub_net, hubs = parse_hubs_record(text)
    except ValueError as exc:
        raise BootstrapError("{} is damaged: {}".format(os.path.join(base, HUBS_FILE), exc),
                             EXIT_USAGE, rerun)
    credential = (read_private(os.path.join(base, CREDENTIAL_FILE)) or "").strip()
    legacy = state.get("hub_name")
    known = [hub.name for hub in hubs] + ([legacy] if isinstance(legacy, str)
                                          and valid_node_name(legacy) else [])
    return NodeRecord(net, name, address, prefix, hub_net, tuple(hubs), tuple(known),
                      credential if valid_credential(credential) else None)


class SyncRefused(BootstrapError):
    """A hub refused this node's sync: 401 (credential not accepted), 403 (revoked) or 410
    (removed: an ephemeral node offline too long, or released by an admin)."""

    def __init__(self, status: int, message: str, hint: str) -> None:
        super().__init__(message, EXIT_REFUSED, hint)
        self.status = status


class SyncUnreachable(BootstrapError):
    """No hub gave a usable answer this round (worth retrying)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, EXIT_UNREACHABLE,
                         "the sync loop retries by itself; check the hubs' API port")
        self.retry_after = retry_after


class SyncAnswer(NamedTuple):
    hub: HubEndpoint  # the hub that answered
    hubs: List[HubInfo]
    interval: int
    names: Optional[Dict[str, str]] = None  # None: a hub that sends no names (older)


def validate_sync_answer(answer: dict, record: NodeRecord, asked: str) -> Tuple[List[HubInfo], int]:
    """(hubs, interval) of a POST /v1/sync answer, checked as strictly as an enrolment answer:
    this node's name, net, address and prefix, the hub that answered among the hubs, and an
    integer interval (bounded to SYNC_INTERVAL_MIN..MAX). ValueError says what is wrong."""
    if answer.get("name") != record.name or answer.get("net") != record.hub_net:
        raise ValueError("it is not about this node (name {}, net {})".format(
            record.name, record.hub_net))
    if answer.get("address") != record.address or answer.get("prefix") != record.prefix:
        raise ValueError("it gives this node another VPN address than {}/{} (re-run the "
                         "one-liner)".format(record.address, record.prefix))
    hubs = validate_hubs(answer.get("hubs"), record.name, record.address, record.prefix)
    if asked not in [hub.name for hub in hubs]:
        raise ValueError("the hub that answered ({}) is not in its list of hubs".format(asked))
    interval = answer.get("interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError("`interval` is not a positive integer")
    return hubs, min(max(interval, SYNC_INTERVAL_MIN), SYNC_INTERVAL_MAX)


def _one_line(text: str, limit: int = 300) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def request_sync(record: NodeRecord, timeout: float = 15.0) -> SyncAnswer:
    """POST /v1/sync to the known hubs in order (pinned TLS, never without the pin) until one
    gives a valid answer. 401 and 403 are final (the hubs share one registry); anything else
    (no connection, wrong pin, 429, 5xx, a malformed answer) passes to the next hub."""
    if record.credential is None:
        raise BootstrapError("this node has no sync credential", EXIT_USAGE,
                             "re-run the one-liner (bootstrap.py with a token) to get one")
    request = {"name": record.name, "credential": record.credential}
    if _NAMES_WRITTEN.get(record.net):  # the hub leaves out the names this node has
        request["names_tag"] = _NAMES_WRITTEN[record.net]
    body = json.dumps(request).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "tinc-bootstrap/" + __version__}
    reasons, retry_after = [], 0.0
    for hub in record.hubs:
        try:
            answer = _pinned_request(hub.host, hub.port, hub.pin, "POST", "/v1/sync", body,
                                     headers, timeout)
        except (Unreachable, BootstrapError) as exc:  # BootstrapError: wrong pin, too large
            reasons.append("{}: {}".format(hub.name, exc))
            continue
        if answer.status == 200:
            try:
                hubs, interval = validate_sync_answer(answer.body, record, hub.name)
                names = (validate_names(answer.body["names"], record.address, record.prefix)
                         if "names" in answer.body else None)
            except ValueError as exc:
                reasons.append("{}: answer refused: {}".format(hub.name, exc))
                continue
            return SyncAnswer(hub, hubs, interval, names)
        message = _one_line(str(answer.body.get("error") or "HTTP {}".format(answer.status)))
        if answer.status == 401:
            raise SyncRefused(401, "hub {} does not accept this node's credential: {}".format(
                hub.name, message), "an interrupted rotate-key finishes when run again; else "
                "re-run the one-liner on this node with a token made for it"
                " ('tinc-hub token create --name NODE'): it brings a new credential")
        if answer.status == 403:
            raise SyncRefused(403, "hub {} refuses this node: {}".format(hub.name, message),
                              "this node was revoked (tinc-hub revoke); sync stops")
        if answer.status == 410:
            raise SyncRefused(410, "hub {}: {}".format(hub.name, message),
                              "re-run the one-liner with a token that has uses left: the machine"
                              " joins again as a new node (a new address); sync stops")
        reasons.append("{}: HTTP {}: {}".format(hub.name, answer.status, message))
        retry_after = max(retry_after, answer.retry_after)
    raise SyncUnreachable("no hub answered: " + "; ".join(reasons), retry_after)


def plan_sync(tinc_dir: str, record: NodeRecord, answer: SyncAnswer,
              current: Dict[str, Optional[str]], tincd_running: bool) -> Plan:
    """What one sync round changes (pure): the hub files that differ, the `rm` of hubs no
    longer listed, and a SIGHUP to tincd (`tincd -kHUP`: it re-reads tinc.conf's ConnectTo
    and the host files) when tinc.conf or a host file changed and tincd runs."""
    files = plan_hub_files(tinc_dir, record.net, record.name, record.hub_net, answer.hubs,
                           record.known, current, only_changed=True)
    tinc_changed = bool(files.commands) or any(
        not spec.path.endswith(os.sep + HUBS_FILE) for spec in files.files)
    hup = ((tuple(tincd_base(record.net, tinc_dir) + ["-kHUP"]),)
           if tinc_changed and tincd_running else ())
    return Plan(files=files.files, commands=files.commands + hup)


class _SigtermDeferred:
    """SIGTERM (tinc-down's --stop) waits while a round writes files, then ends the process."""

    def __enter__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def __exit__(self, *exc: object) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def sync_round(tinc_dir: str, net: str) -> Tuple[SyncAnswer, List[str]]:
    """One round: ask the hubs, then (under the net lock) write what changed, remove what is
    gone, SIGHUP tincd if its files changed. Returns the answer and what changed."""
    record = read_node_record(tinc_dir, net)
    remember_secret(record.credential)
    answer = request_sync(record)
    base = net_dir(tinc_dir, net)
    with net_lock(base), _SigtermDeferred():
        record = read_node_record(tinc_dir, net)  # a join may have written meanwhile
        names = list(record.known) + [hub.name for hub in answer.hubs]
        plan = plan_sync(tinc_dir, record, answer, read_texts(hub_file_paths(tinc_dir, net, names)),
                         pid_from_file(net) is not None)
        text = describe_plan(plan)
        if text:
            REPORT.debug("sync plan:\n" + text)
        # a hub's new key alone keeps its file's mtime: the SIGHUP keeps the connection
        changed = [spec.path for spec in plan.files
                   if write_host_file(spec.path, spec.content, spec.mode)]
        for cmd in plan.commands:
            run(cmd, check=cmd[0] == "rm", timeout=30)
            changed.append(cmd[-1] if cmd[0] == "rm" else "SIGHUP tincd")
        # a hub's new key learnt 3 intervals ago (more than `tinc-hub rotate-key` waits): the
        # hub has switched; a connection older than that key ends, tincd reconnects at once
        renew = kept_key_stamps([os.path.join(base, "hosts", hub.name) for hub in answer.hubs],
                                3 * answer.interval + 10)
        for path in renew:
            os.utime(path, None)
            changed.append(path + " (a connection made before its new key ends)")
        if renew and "SIGHUP tincd" not in changed and pid_from_file(net) is not None:
            run(tincd_base(net, tinc_dir) + ["-kHUP"], check=False, timeout=30)
            changed.append("SIGHUP tincd")
        if answer.names is not None:
            changed += write_names(net, record.hub_net, answer.names)
    return answer, changed


def names_tag(names: Dict[str, str]) -> str:
    """sha256 (hex) of the canonical JSON of names (the hub computes the same)."""
    canonical = json.dumps(names, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_NAMES_WRITTEN = {}  # type: Dict[str, str]  # net -> names_tag of the names in /etc/hosts


def write_names(net: str, domain_net: str, names: Dict[str, str]) -> List[str]:
    """apply_names to /etc/hosts; its problems are logged when they are news (the file
    changed, or it could not be written). Returns [ETC_HOSTS] when it changed."""
    changed, problems = apply_names(net, domain_net, names)
    if changed is None:
        _NAMES_WRITTEN.pop(net, None)  # the next answer brings them again
    else:
        _NAMES_WRITTEN[net] = names_tag(names)
    if changed or problems != _NAMES_PROBLEMS_LOGGED:
        for problem in problems:
            REPORT.step("names: " + problem)
    _NAMES_PROBLEMS_LOGGED[:] = problems
    return [ETC_HOSTS] if changed else []


_NAMES_PROBLEMS_LOGGED = []  # type: List[str]  # a sync loop logs a lasting problem once


def sleep_until_due(seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait `seconds`, in steps of at most 5 s, and stop early when the wall clock is past the
    due time: after a suspend (the monotonic clock stood still) the next round runs at once."""
    due_wall, due_mono = time.time() + seconds, time.monotonic() + seconds
    while True:
        left = min(due_wall - time.time(), due_mono - time.monotonic())
        if left <= 0:
            return
        sleep(min(left, 5.0))


def sync_pid_path(net: str) -> str:
    """The sync loop's pid file (flock-ed while it runs): /run/tinc-bootstrap-sync.NET.pid."""
    run_dir = "/run" if os.path.isdir("/run") else "/var/run"
    return os.path.join(run_dir, "tinc-bootstrap-sync.{}.pid".format(check_net_name(net)))


def sync_hold_path(net: str) -> str:
    """While this file exists, tinc-up and tinc-down leave the sync loop alone (no Python
    start in tincd's restart: rotate-key's ping gap); rotate-key makes it just before its
    restart and removes it once the VPN is back (SyncHold)."""
    return sync_pid_path(net)[:-len(".pid")] + ".hold"


class SyncHold:
    """rotate-key's restart of tincd without tinc-down's `sync --stop` and tinc-up's
    `sync --daemon` (each a Python start, ~0.25 s off the VPN): the loop runs on across the
    restart. On leaving, the hold file goes, and the loop is made to match tincd again:
    started if tincd runs and none does, stopped if tincd does not run."""

    def __init__(self, tinc_dir: str, net: str) -> None:
        self.tinc_dir, self.net, self.path = tinc_dir, net, sync_hold_path(net)

    def __enter__(self) -> "SyncHold":
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600))
        except OSError as exc:  # the restart goes on, with the loop stopped and started
            REPORT.step("warning: cannot create {} ({}): tincd's restart starts Python "
                        "twice".format(self.path, exc.strerror))
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        base = net_dir(self.tinc_dir, self.net)
        # only a tinc-up that skips its launcher while held (one written before holds
        # existed started the loop itself, or has none)
        if shell_join([self.path]) not in (read_text(os.path.join(base, "tinc-up")) or ""):
            return
        if pid_from_file(self.net) is None:
            stop_sync_loop(self.net)
        elif sync_loop_pid(self.net) is None:
            run(sync_script_command(sync_python(), os.path.join(base, SCRIPT_FILE), self.net,
                                    self.tinc_dir, "--daemon"), check=False, timeout=60)


def acquire_sync_pid_file(net: str) -> Optional[int]:
    """An fd holding the lock of net's sync pid file (our pid written in it), or None when
    another sync loop holds it."""
    # 0600: another user who could open it could also flock it and keep every loop from starting
    fd = os.open(sync_pid_path(net), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # a file left by an older version was 0644
    # a loop holds the lock for its life; sync_loop_pid (status, tinc-up's launcher) only for
    # an instant: try again for a while before concluding that a loop runs
    try:
        flock_bounded(fd, 3.0, sync_pid_path(net))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EWOULDBLOCK:
            return None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, "{}\n".format(os.getpid()).encode())
    return fd


def sync_loop_pid(net: str) -> Optional[int]:
    """The pid of net's running sync loop (it holds the pid file's lock), else None."""
    try:
        fd = os.open(sync_pid_path(net), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
        for _ in range(40):  # the loop writes its pid right after locking
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            if text.isdigit():
                return int(text)
            time.sleep(0.05)
        return None
    finally:
        os.close(fd)


def launch_sync_loop(tinc_dir: str, net: str, log: Optional[str]) -> int:
    """tinc-up's `sync --daemon`: start the sync loop detached (own session, no fd of tincd's
    but /dev/null on 0-2, cwd /) unless one runs; return at once."""
    if sync_loop_pid(net) is not None:
        return EXIT_OK
    if not os.path.isfile(_OWN_FILE):
        raise BootstrapError("sync --daemon needs bootstrap.py as a file", EXIT_USAGE,
                             "run it as tinc-up does: python3 /etc/tinc/NET/bootstrap.py ...")
    cmd = [sync_python(), _OWN_FILE, "sync", "--net", net, "--log", log or ""]
    if os.path.normpath(tinc_dir) != DEFAULT_TINC_DIR:
        cmd += ["--tinc-dir", tinc_dir]
    env = {key: value for key, value in os.environ.items()  # the command line says it all
           if not key.startswith("TINC_BOOTSTRAP_")}
    subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True, cwd="/",
                     env=env)
    return EXIT_OK


def stop_sync_loop(net: str, timeout: float = 5.0) -> int:
    """tinc-down's `sync --stop`: SIGTERM net's sync loop and wait (at most `timeout`) for
    its lock to be free."""
    pid = sync_loop_pid(net)
    if pid is None:
        return EXIT_OK
    cmdline = (read_text("/proc/{}/cmdline".format(pid)) or "").split("\0")
    if "sync" not in cmdline:
        raise BootstrapError("pid {} holds {} but is no sync loop".format(pid, sync_pid_path(net)),
                             EXIT_ERROR)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return EXIT_OK
    deadline = time.monotonic() + timeout
    while sync_loop_pid(net) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return EXIT_OK


def sync_once(tinc_dir: str, net: str) -> int:
    """`sync --once`: one round; a line saying what changed."""
    answer, changed = sync_round(tinc_dir, net)
    REPORT.step("in step with {} hub(s) via {}: {}".format(
        len(answer.hubs), answer.hub.name, "changed " + ", ".join(changed) if changed
        else "nothing changed"))
    return EXIT_OK


def sync_loop(tinc_dir: str, net: str, sleep: Callable[[float], None] = time.sleep) -> int:
    """`sync`: a round at once, then one every `interval` s of the last answer (times 0.8 to
    1.0, so nodes spread out), at once after a suspend; while no hub answers, retries after
    5, 10, 20... up to SYNC_RETRY_MAX s (or the hub's Retry-After). A 401 is logged and retried
    every interval (a re-run of the one-liner with a token bound to this node's name brings
    a new credential); 403 (revoked), 410 (removed) and a
    missing or damaged record stop the loop. One loop per net (the pid file's lock)."""
    lock = acquire_sync_pid_file(net)
    if lock is None:
        REPORT.debug("sync: a sync loop for net {} runs already".format(net))
        return EXIT_OK
    # --stop's SIGTERM must end the loop, whatever disposition and mask tincd's script
    # runner left us (an ignored signal stays ignored across exec, a blocked one blocked)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    REPORT.step("sync loop for net {} started (pid {})".format(net, os.getpid()))
    interval, failures, last_problem = SYNC_INTERVAL_MIN * 6, 0, ""
    while True:
        problem = ""
        try:
            answer, changed = sync_round(tinc_dir, net)
            interval, failures = answer.interval, 0
            if changed:
                REPORT.step("sync: via {}: changed {}".format(answer.hub.name, ", ".join(changed)))
            wait = interval * random.uniform(0.8, 1.0)
        except SyncRefused as exc:
            if exc.status in (403, 410):
                REPORT.step("sync: error: {} (hint: {}); stopping".format(exc, exc.hint))
                return exc.code
            problem = "sync: error: {} (hint: {})".format(exc, exc.hint)
            wait = interval * random.uniform(0.8, 1.0)
        except SyncUnreachable as exc:
            failures += 1
            problem = "sync: {}; retrying".format(exc)
            wait = max(min(SYNC_RETRY_MAX, 5.0 * 2 ** min(failures - 1, 10)) * random.uniform(0.8, 1.0),
                       exc.retry_after)
        except BootstrapError as exc:
            if not isinstance(exc, CommandError):
                REPORT.step("sync: error: {} (hint: {}); stopping".format(exc, exc.hint))
                return exc.code
            problem = "sync: {}".format(exc)
            wait = interval
        except Exception as exc:  # a bug must not end the loop for good; logged, retried
            import traceback
            REPORT.debug(traceback.format_exc())
            problem = "sync: unexpected error: {}: {}".format(type(exc).__name__, exc)
            wait = interval
        if problem and problem != last_problem:
            REPORT.step(problem)
        elif not problem and last_problem:
            REPORT.step("sync: in step again")
        last_problem = problem
        sleep_until_due(wait, sleep)


# ---------------------------------------------------------------------------
# Names: every machine of the net resolves NAME.NET to its VPN address. The hubs send
# `names` ({tinc name: VPN address}) in their enrolment and sync answers; the node (and every
# hub, from its registry) writes them as a managed block of /etc/hosts.

ETC_HOSTS = "/etc/hosts"
MAX_NAMES = 16384  # names in one answer; a hub with more sends none (the answer stays < 1 MiB)
HOSTS_BEGIN = "# BEGIN tinc-bootstrap {} (managed by bootstrap.py; do not edit)"
HOSTS_END = "# END tinc-bootstrap {}"
HOSTS_LOCK_WAIT = 10.0  # s; then this round leaves the names as they are (the next retries)


def validate_names(value: object, address: str, prefix: int) -> Dict[str, str]:
    """The `names` of an answer, checked: an object of at most MAX_NAMES tinc names, each
    with a distinct canonical IPv4 host address of this node's VPN (address/prefix).
    ValueError says what is wrong."""
    if not isinstance(value, dict) or len(value) > MAX_NAMES:
        raise ValueError("`names` must be an object of at most {} names".format(MAX_NAMES))
    network = ipaddress.IPv4Network("{}/{}".format(address, prefix), strict=False)
    names, seen = {}, set()  # type: Dict[str, str], set
    for name, vpn in value.items():
        if not isinstance(name, str) or not valid_node_name(name):
            raise ValueError("`names` has a key that is not a tinc name: {!r}".format(
                _one_line(str(name), 70)))
        try:
            host = ipaddress.IPv4Address(vpn) if isinstance(vpn, str) else None
        except ValueError:
            host = None
        if host is None or str(host) != vpn or host not in network \
                or host in (network.network_address, network.broadcast_address):
            raise ValueError("name {}: {!r} is not a host address of the VPN {}".format(
                name, _one_line(str(vpn), 40), network))
        if vpn in seen:
            raise ValueError("name {}: address {} is listed twice".format(name, vpn))
        seen.add(vpn)
        names[name] = vpn
    return names


def dns_label(text: str) -> str:
    """A tinc name (or net name) as DNS writes it: lower case, `_` as `-`."""
    return text.lower().replace("_", "-")


def hosts_entries(names: Dict[str, str], net: str) -> Tuple[List[Tuple[str, str]], List[str]]:
    """([(address, NAME.NET)], problems) for /etc/hosts, sorted by address. A name whose DNS
    form is not a host label (`_` or `-` at an end) is left out, and so are all the names that
    share one DNS form (`Bree` and `bree`): each is a problem line. A net whose DNS form is no
    host name gives no entries."""
    if not names:
        return [], []
    domain = dns_label(net)
    if host_problem(domain) is not None or not re.search("[a-z]", domain):
        return [], ["net {!r} is no DNS name ({}): no names written".format(net, domain)]
    by_fqdn = {}  # type: Dict[str, List[str]]
    problems = []
    for name in sorted(names):
        label = dns_label(name)
        if not HOST_LABEL_RE.fullmatch(label) or len(label) + 1 + len(domain) > 253:
            problems.append("name {!r} is no DNS label ({}): left out".format(name, label))
            continue
        by_fqdn.setdefault(label + "." + domain, []).append(name)
    entries = []
    for fqdn, owners in by_fqdn.items():
        if len(owners) > 1:
            problems.append("names {} are all {}: left out".format(", ".join(owners), fqdn))
        else:
            entries.append((names[owners[0]], fqdn))
    entries.sort(key=lambda entry: (int(ipaddress.IPv4Address(entry[0])), entry[1]))
    return entries, problems


def render_hosts_block(net: str, entries: Sequence[Tuple[str, str]]) -> str:
    """The managed block of net (no entries: no block)."""
    if not entries:
        return ""
    lines = [HOSTS_BEGIN.format(net)] + ["{} {}".format(a, n) for a, n in entries]
    return "\n".join(lines + [HOSTS_END.format(net)]) + "\n"


def replace_hosts_block(text: str, net: str, block: str) -> str:
    """text (an /etc/hosts) with net's managed block replaced by block (where it was, else at
    the end; "" removes it). Every other line is kept byte for byte. ValueError when the
    markers are damaged (a BEGIN without its END, twice, or out of order): never guessed."""
    begin, end = HOSTS_BEGIN.format(net), HOSTS_END.format(net)
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line == begin]
    ends = [i for i, line in enumerate(lines) if line == end]
    if len(starts) > 1 or len(ends) > 1 or len(starts) != len(ends) \
            or (starts and ends[0] < starts[0]):
        raise ValueError("its block of net {} is damaged (check the '# BEGIN tinc-bootstrap {}' "
                         "and '# END' lines)".format(net, net))
    if starts:
        before = "\n".join(lines[:starts[0]])
        after = "\n".join(lines[ends[0] + 1:])
        return (before + "\n" if starts[0] else "") + block + after
    if not block:
        return text
    return text + ("\n" if text and not text.endswith("\n") else "") + block


def _write_in_place(path: str, data: bytes) -> None:
    """Rewrite path's own inode (a bind-mounted /etc/hosts cannot be renamed over)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: str, data: bytes, old: Optional[os.stat_result]) -> None:
    """Replace path by rename with data, keeping its mode, owner and SELinux label; where the
    rename cannot be done (a bind mount: EBUSY; a read-only directory), rewrite it in place."""
    directory = os.path.dirname(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".hosts.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), stat.S_IMODE(old.st_mode) if old else 0o644)
            if old is not None and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(handle.fileno(), old.st_uid, old.st_gid)
            if old is not None:
                try:
                    os.setxattr(handle.fileno(), "security.selinux",
                                os.getxattr(path, "security.selinux"))
                except OSError:
                    pass  # no SELinux (ENODATA, ENOTSUP)
            os.fsync(handle.fileno())
        os.rename(tmp, path)
        tmp = None
        fsync_directory(directory)
        return
    except OSError as exc:
        if old is None or exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EROFS,
                                            errno.EACCES, errno.EPERM):
            raise
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _write_in_place(path, data)


def update_hosts_block(net: str, entries: Sequence[Tuple[str, str]],
                       path: str = ETC_HOSTS) -> bool:
    """Make net's managed block of path hold entries (none: remove it); True when the file
    changed. Only the block's lines change; the file is written only when they differ, under
    an flock on its directory (two nets, or a hub and a node, never lose each other's
    write). OSError, or ValueError for damaged markers (nothing written)."""
    target = os.path.realpath(path)  # a symlinked /etc/hosts stays a symlink
    dir_fd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flock_bounded(dir_fd, HOSTS_LOCK_WAIT, os.path.dirname(target))
        try:
            with open(target, "rb") as handle:
                old = os.fstat(handle.fileno())  # type: Optional[os.stat_result]
                data = handle.read()
        except FileNotFoundError:
            old, data = None, b""
        text = data.decode("utf-8", "surrogateescape")  # other lines kept byte for byte
        new = replace_hosts_block(text, net, render_hosts_block(net, entries))
        if new == text:
            return False
        _replace_file(target, new.encode("utf-8", "surrogateescape"), old)
        return True
    finally:
        os.close(dir_fd)


def apply_names(net: str, domain_net: str, names: Dict[str, str],
                path: str = ETC_HOSTS) -> Tuple[Optional[bool], List[str]]:
    """Write names (validated) as net's block of path, named NAME.domain_net: (changed, or
    None when path could not be written; problems). A damaged block or an unwritable file is
    a problem, not an exception: names never stop a join or a sync."""
    entries, problems = hosts_entries(names, domain_net)
    try:
        return update_hosts_block(net, entries, path), problems
    except (OSError, ValueError) as exc:
        return None, problems + ["{} not updated: {}".format(path, exc)]


# ---------------------------------------------------------------------------
# The node's commands: join, status, leave.

class JoinOptions(NamedTuple):
    token_text: str
    hub: Optional[str]
    name: Optional[str]
    net: Optional[str]
    init: str
    key_size: int
    timeout: float
    dry_run: bool
    tinc_dir: str
    root: str
    log: Optional[str] = None  # where a real run logs (shown by a dry run)


def split_hub(value: str, default_port: int) -> Tuple[str, int]:
    """HOST[:PORT] (IPv6 in brackets) into host and port."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+)(?::(\d+))?", value.strip())
    if not match:
        raise BootstrapError("bad --hub {!r}".format(value), EXIT_USAGE, "use HOST or HOST:PORT")
    host = match.group(1) or match.group(3)
    problem = host_problem(host)
    if problem:
        raise BootstrapError("bad host in --hub {!r}: {}".format(value, problem), EXIT_USAGE,
                             "use HOST or HOST:PORT")
    port = int(match.group(2) or match.group(4) or default_port)
    if not 0 < port < 65536:
        raise BootstrapError("bad port in --hub {!r}".format(value), EXIT_USAGE)
    return host, port


def load_state(tinc_dir: str, net: str) -> Optional[dict]:
    text = read_text(os.path.join(net_dir(tinc_dir, net), STATE_FILE))
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def check_existing_net(tinc_dir: str, net: str, name: str, hubs: Sequence[str]) -> None:
    """Refuse to overwrite a net this tool did not write, or one joined as someone else."""
    conf = os.path.join(net_dir(tinc_dir, net), "tinc.conf")
    state = load_state(tinc_dir, net)
    if state is None:
        text = read_text(conf)
        resumable = text is not None and text.startswith(TINC_CONF_MARKER) and \
            re.search(r"(?m)^Name = {}$".format(re.escape(name)), text)
        if text is not None and not resumable:
            raise BootstrapError(
                "{} exists and was not written by tinc-bootstrap for node {!r}".format(
                    conf, name), EXIT_USAGE,
                "move it away, or use --net with another name")
        return
    try:
        recorded = [hub.name for hub in parse_hubs_record(
            read_private(os.path.join(net_dir(tinc_dir, net), HUBS_FILE)) or "")[1]]
    except ValueError:
        recorded = []
    if state.get("name") != name or not set([state.get("hub_name")] + recorded) & set(hubs):
        raise BootstrapError(
            "net {!r} is already joined as {!r} to hub {!r}".format(
                net, state.get("name"), state.get("hub_name")), EXIT_USAGE,
            "run `bootstrap.py leave --net {}` first, or use --net".format(net))


def plan_node_files(tinc_dir: str, net: str, name: str, public_pem: str, address: str,
                    prefix: int, hub: str, hub_host_file: str, state: dict) -> Plan:
    """The node's files after enrolment (pure)."""
    base = net_dir(tinc_dir, net)
    return Plan(files=(
        FileSpec(os.path.join(base, "hosts", name),
                 render_host_file(["Subnet = {}/32".format(address)], public_pem)),
        FileSpec(os.path.join(base, "hosts", hub), hub_host_file.rstrip("\n") + "\n"),
        FileSpec(os.path.join(base, "tinc-up"),
                 render_tinc_up(address, prefix, reply_table=reply_table(net)), 0o755),
        FileSpec(os.path.join(base, "tinc-down"),
                 render_tinc_down(address, prefix, reply_table=reply_table(net)), 0o755),
        FileSpec(os.path.join(base, STATE_FILE),
                 json.dumps(state, indent=2, sort_keys=True) + "\n"),
    ))


def plan_joined_files(tinc_dir: str, net: str, name: str, public_pem: str, address: str,
                      prefix: object, hub_net: str, hubs: Sequence[HubInfo], state: dict,
                      credential: Optional[str], python: str, known: Sequence[str],
                      current: Dict[str, Optional[str]]) -> Plan:
    """The node's files after an enrolment that listed the hubs (pure): its host file, the
    hub files (plan_hub_files: every hub's host file, tinc.conf with a ConnectTo per hub and
    the keepalive, hubs.json), tinc-up/tinc-down that start/stop the sync loop, bootstrap.json,
    the credential (0600) when the hub issued one, and this script for tinc-up."""
    base = net_dir(tinc_dir, net)
    script = os.path.join(base, SCRIPT_FILE)
    hub_files = plan_hub_files(tinc_dir, net, name, hub_net, hubs, known, current,
                               only_changed=False)
    files = [FileSpec(os.path.join(base, "hosts", name),
                      render_host_file(["Subnet = {}/32".format(address)], public_pem))]
    files += hub_files.files
    files += [
        FileSpec(os.path.join(base, "tinc-up"), render_tinc_up(address, prefix, sync_script_command(
            python, script, net, tinc_dir, "--daemon"), reply_table(net), sync_hold_path(net)), 0o755),
        FileSpec(os.path.join(base, "tinc-down"), render_tinc_down(address, prefix, sync_script_command(
            python, script, net, tinc_dir, "--stop"), reply_table(net), sync_hold_path(net)), 0o755),
        FileSpec(os.path.join(base, STATE_FILE), json.dumps(state, indent=2, sort_keys=True) + "\n")]
    if credential:
        files.append(FileSpec(os.path.join(base, CREDENTIAL_FILE), credential + "\n", 0o600))
    return Plan(files=tuple(files), commands=hub_files.commands,
                actions=("install this script as {} (mode 0755), run by tinc-up".format(script),))


class NodeJoin:
    """The join as a list of steps (join_steps). Values the hub has not answered yet are
    placeholders, which is what a dry run shows; a real run fills them in as it goes."""

    def __init__(self, opts: JoinOptions, token: Token, hubs: Sequence[HubEndpoint], net: str,
                 name: str, facts: SystemFacts, init: str) -> None:
        self.opts, self.token, self.hubs = opts, token, list(hubs)
        self.hub = hubs[0] if len(hubs) == 1 else None  # the hub that enrols this node
        self.net, self.name, self.facts, self.init = net, name, facts, init
        self.tinc_dir = opts.tinc_dir
        self.base = net_dir(opts.tinc_dir, net)
        # what the key step and the hub's answer give (placeholders until then)
        self.public_pem = "<public key>"
        self.address = "<address>"
        self.prefix = "<prefix>"  # type: object
        self.hub_host_file = "<hub host file>"
        self.hub_vpn = "<hub VPN address>"
        self.changed = []  # type: List[str]
        self.config_changed = True  # a dry run cannot know: it shows the restart
        self.tincd = TincdState()  # read when the start step is planned
        # several hubs: the answer's list (None: an older hub, which sends none), the hub's
        # net name, the credential it issued, the one this node has
        self.hub_list = None  # type: Optional[List[HubInfo]]
        self.hub_net = token.net
        self.new_credential = None  # type: Optional[str]
        self.names = None  # type: Optional[Dict[str, str]]  # None: the hub sends no names
        credential = (read_private(os.path.join(self.base, CREDENTIAL_FILE)) or "").strip()
        self.credential = credential if valid_credential(credential) else None
        remember_secret(self.credential)

    # -- the steps, in order
    def steps(self) -> List[Step]:
        return [
            Step(lambda: "tinc is installed" if self.facts.tinc_installed else "installing tinc",
                 lambda: plan_install(self.facts), self.apply_install),
            Step(self.join_title, self.plan_conf, self.apply_conf),
            Step(self.key_title, self.plan_key, self.apply_key),
            Step(lambda: "enrolling with the hub", self.plan_enrol, self.apply_enrol),
            Step(lambda: "", self.plan_files, self.apply_node_files),
            Step(lambda: "", self.plan_names, self.apply_names),
            Step(self.boot_title, self.plan_boot, apply_boot),
            Step(lambda: "", self.plan_start, self.apply_start),
            Step(lambda: "", self.plan_wait, self.apply_wait),
        ]

    def apply_install(self, plan: Plan) -> None:
        self.facts = apply_install(plan, self.facts, self.opts.root)

    def join_title(self) -> str:
        first = self.hubs[0]
        return "node {!r} joins net {!r} via hub {!r} at {}:{}{}".format(
            self.name, self.net, first.name, first.host, first.port,
            " (or one of {} more hubs)".format(len(self.hubs) - 1) if len(self.hubs) > 1 else "")

    def hub_name(self) -> str:
        return self.hub.name if self.hub else "<the hub that answers>"

    def conf_file(self, hub: str) -> FileSpec:
        return FileSpec(os.path.join(self.base, "tinc.conf"),
                        render_tinc_conf(self.name, self.net, [hub]))

    def plan_conf(self) -> Plan:
        """tinc.conf before the enrolment (`tincd -K` reads Name from it): kept when this
        script wrote it for this node (a re-run changes nothing); the node files step writes
        the final one."""
        text = read_text(os.path.join(self.base, "tinc.conf"))
        if text is not None and text.startswith(TINC_CONF_MARKER) and \
                "\nName = {}\n".format(self.name) in text:
            return Plan()
        return Plan(files=(self.conf_file(self.hubs[0].name),))

    def apply_conf(self, plan: Plan) -> None:
        self.changed += apply_files(plan.files)

    def key_title(self) -> str:
        return "key: " + ("existing key kept" if has_key(self.tinc_dir, self.net)
                          else "generating RSA {}".format(self.opts.key_size))

    def plan_key(self) -> Plan:
        return plan_key(self.tinc_dir, self.net, self.opts.key_size,
                        has_key(self.tinc_dir, self.net))

    def apply_key(self, plan: Plan) -> None:
        self.public_pem = apply_key(plan, self.tinc_dir, self.net, self.name)

    def plan_enrol(self) -> Plan:
        return Plan(actions=tuple(
            "POST https://{}:{}/v1/enroll name={} (public key of hosts/{}){}".format(
                hub.host, hub.port, self.name, self.name,
                "" if i == 0 else ", if the hubs before it do not answer")
            for i, hub in enumerate(self.hubs)))

    def apply_enrol(self, plan: Plan) -> None:
        self.hub, answer = enroll_any(self.opts.token_text, self.hubs, self.name,
                                      self.public_pem, self.opts.timeout,
                                      credential=self.credential)
        address, prefix, hub, hub_host_file = validate_answer(answer, self.name)
        if hub != self.hub.name:
            raise BootstrapError("the hub calls itself {!r}, the token {!r}".format(
                hub, self.hub.name), EXIT_REFUSED)
        if answer.get("hubs") != [] and "hubs" in answer:  # [] from a hub not yet serving
            self.accept_hubs(answer, address, prefix)
        if "names" in answer:
            try:
                self.names = validate_names(answer["names"], address, prefix)
            except ValueError as exc:
                raise BootstrapError("the hub's names are refused: {}".format(exc),
                                     EXIT_REFUSED, "hub and bootstrap versions may differ")
        self.address, self.prefix, self.hub_host_file = address, prefix, hub_host_file
        self.hub_vpn = hub_vpn_address(hub_host_file, address, prefix)
        REPORT.step("enrolled: address {}/{}{}".format(address, prefix, "" if self.hub_list is None
                                                       else ", {} hub(s)".format(len(self.hub_list))))

    def accept_hubs(self, answer: dict, address: str, prefix: int) -> None:
        """The answer's `hubs` and `credential` (validate_hubs); the hub that answered must be
        listed, and is asked first by sync."""
        hint = "hub and bootstrap versions may differ"
        try:
            hubs = validate_hubs(answer["hubs"], self.name, address, prefix)
        except ValueError as exc:
            raise BootstrapError("the hub's list of hubs is refused: {}".format(exc),
                                 EXIT_REFUSED, hint)
        if self.hub.name not in [hub.name for hub in hubs]:
            raise BootstrapError("hub {} is not in its own list of hubs".format(self.hub.name),
                                 EXIT_REFUSED, hint)
        credential = answer.get("credential")
        if credential is not None and not valid_credential(credential):
            raise BootstrapError("the hub's credential is malformed", EXIT_REFUSED, hint)
        if credential is None and self.credential is None:
            REPORT.step("warning: the hub issued no sync credential; `sync` cannot run until "
                        "this is re-run")
        remember_secret(credential)
        net = answer.get("net")
        self.hub_net = net if isinstance(net, str) and NET_RE.fullmatch(net) else self.token.net
        self.new_credential = credential
        self.hub_list = sorted(hubs, key=lambda hub: hub.name != self.hub.name)

    def state(self) -> dict:
        """What bootstrap.json records (status, leave, and the next run read it)."""
        return {"net": self.net, "name": self.name, "address": self.address,
                "prefix": self.prefix, "hub_name": self.hub_name(),
                "hub_host": self.hub.host if self.hub else "<the hub that answers>",
                "api_port": self.hub.port if self.hub else "<its API port>",
                "hub_vpn_address": self.hub_vpn, "init": self.init,
                "unit": service_unit(self.facts, self.net) if self.init == "systemd" else None}

    def planned_hubs(self) -> Optional[List[HubInfo]]:
        """The hubs the files are written for: the answer's; in a dry run the token's (with
        placeholder host files); None for an older hub (one hub, as before)."""
        if self.hub_list is not None or not self.opts.dry_run:
            return self.hub_list
        return [HubInfo(hub.name, "<host file of hub {}>".format(hub.name), hub)
                for hub in self.hubs]

    def plan_files(self) -> Plan:
        hubs = self.planned_hubs()
        if hubs is None:
            files = plan_node_files(self.tinc_dir, self.net, self.name, self.public_pem,
                                    self.address, self.prefix, self.hub_name(),
                                    self.hub_host_file, self.state()).files
            return Plan(files=(self.conf_file(self.hub_name()),) + files)
        known = [hub.name for hub in self.hubs]
        try:
            known += [hub.name for hub in parse_hubs_record(
                read_private(os.path.join(self.base, HUBS_FILE)) or "")[1]]
        except ValueError:
            pass
        legacy = (load_state(self.tinc_dir, self.net) or {}).get("hub_name")
        if isinstance(legacy, str):
            known.append(legacy)
        credential = self.new_credential or (None if not self.opts.dry_run
                                             else "<credential, when the hub issues one>")
        return plan_joined_files(
            self.tinc_dir, self.net, self.name, self.public_pem, self.address, self.prefix,
            self.hub_net, hubs, self.state(), credential, sync_python(), known,
            read_texts(hub_file_paths(self.tinc_dir, self.net, known)))

    def apply_node_files(self, plan: Plan) -> None:
        with net_lock(self.base):
            self.changed += apply_files(plan.files)
            for cmd in plan.commands:
                run(cmd)
                self.changed.append(cmd[-1])
            if plan.actions:  # the script for tinc-up's sync loop
                hubs = [self.hub] + [hub.api for hub in self.hub_list or () if hub.name != self.hub.name]
                source = own_script_source() or fetch_script(hubs)
                if write_atomic(os.path.join(self.base, SCRIPT_FILE), source, 0o755):
                    self.changed.append(os.path.join(self.base, SCRIPT_FILE))
        quiet = (STATE_FILE, HUBS_FILE, CREDENTIAL_FILE, SCRIPT_FILE)
        self.config_changed = any(os.path.basename(p) not in quiet for p in self.changed)

    def plan_names(self) -> Plan:
        if self.names is None and not self.opts.dry_run:
            return Plan()
        return Plan(actions=("write the names block of net {} in {} (NAME.{} of every hub and "
                             "node, as the hub sends them)".format(
                                 self.net, ETC_HOSTS, dns_label(self.hub_net)),))

    def apply_names(self, plan: Plan) -> None:
        if self.names is not None:
            write_names(self.net, self.hub_net, self.names)

    def boot_title(self) -> str:
        return "boot: " + {"systemd": "systemd unit " + service_unit(self.facts, self.net),
                           "rc.local": "line in " + self.facts.rc_local,
                           "sysv": "nets.boot", "none": "not registered"}[self.init]

    def plan_boot(self) -> Plan:
        return read_boot_plan(self.net, self.init, self.facts, self.tinc_dir)

    def start_how(self) -> str:
        return "systemd" if self.init == "systemd" else "direct"

    def plan_start(self) -> Plan:
        self.tincd = read_tincd_state(self.net, self.start_how(), self.facts)
        plan = plan_start(self.net, self.start_how(), self.facts, self.tincd,
                          self.config_changed, self.tinc_dir)
        if self.planned_hubs() is not None and not plan.commands and \
                sync_loop_pid(self.net) is None:  # tincd runs on: its tinc-up ran earlier
            plan = plan._replace(commands=(tuple(sync_script_command(
                sync_python(), os.path.join(self.base, SCRIPT_FILE), self.net, self.tinc_dir,
                "--daemon")),))
        return plan

    def apply_start(self, plan: Plan) -> None:
        if plan.commands and plan.commands[0][-1] == "--daemon":
            run(plan.commands[0], timeout=60)
            plan = Plan()
        action = apply_start(plan, self.tincd)
        REPORT.step("tincd {}; waiting for the hub at {} over the VPN".format(
            action, self.hub_vpn))

    def plan_wait(self) -> Plan:
        return Plan(actions=("ping {} (the hub over the VPN) until it answers, at most {:.0f} s"
                             .format(self.hub_vpn, self.opts.timeout),))

    def apply_wait(self, plan: Plan) -> None:
        if not wait_for_ping(self.hub_vpn, self.opts.timeout, interval=0.01, max_interval=0.5,
                             nudge=lambda: nudge_tincd(self.net)):
            raise BootstrapError(
                "the hub's VPN address {} did not answer within {:.0f} s".format(
                    self.hub_vpn, self.opts.timeout), EXIT_VPN_DOWN,
                "see tincd's log (journalctl -u {} or syslog)".format(
                    service_unit(self.facts, self.net)))


def join(opts: JoinOptions) -> int:
    """The whole join: check the inputs, then run (or, with --dry-run, print) NodeJoin's
    steps; print the node's VPN address."""
    token = decode_token(opts.token_text)
    hubs = token.endpoints()
    if opts.hub:  # another address for the first hub (same pin, same name)
        host, port = split_hub(opts.hub, token.port)
        hubs[0] = hubs[0]._replace(host=host, port=port)
    net = check_net_name(opts.net or token.net)
    if opts.key_size < 2048:
        raise BootstrapError("--key-size must be at least 2048", EXIT_USAGE)
    if os.geteuid() != 0 and not opts.dry_run:
        raise BootstrapError("this must run as root", EXIT_USAGE, "use sudo, or --dry-run")
    facts = detect_system(opts.root)
    REPORT.step("system: {} {} ({} family), init {}".format(
        facts.os.id or "unknown", facts.os.version, facts.family, facts.init))
    init = resolve_init(opts.init, facts)
    name = opts.name or node_name_from_hostname(socket.gethostname())
    if not valid_node_name(name) or name in [hub.name for hub in hubs]:
        raise BootstrapError("invalid node name {!r}".format(name), EXIT_USAGE,
                             "tinc names use only A-Z a-z 0-9 _ ; pass --name")
    check_existing_net(opts.tinc_dir, net, name, [hub.name for hub in hubs])
    joined = (load_state(opts.tinc_dir, net) or {}).get("hub_name")
    hubs.sort(key=lambda hub: hub.name != joined)  # a re-run asks the hub it joined first
    job = NodeJoin(opts, token, hubs, net, name, facts, init)
    run_steps(job.steps(), opts.dry_run)
    if opts.dry_run:
        REPORT.step("dry run: nothing was changed" + (
            " (a real run logs to {})".format(opts.log) if opts.log else ""))
        return EXIT_OK
    REPORT.step("joined: {} is {} on net {}".format(name, job.address, net))
    print(job.address)
    return EXIT_OK


def find_nets(tinc_dir: str) -> List[str]:
    """Nets under tinc_dir joined by this tool."""
    try:
        entries = sorted(os.listdir(tinc_dir))
    except OSError:
        return []
    return [e for e in entries if NET_RE.fullmatch(e)
            and os.path.isfile(os.path.join(tinc_dir, e, STATE_FILE))]


def check_net_name(net: str) -> str:
    """net, if it is a valid net name (one directory name, never a path); else a usage error."""
    if not NET_RE.fullmatch(net):
        raise BootstrapError("bad net name {!r}".format(net), EXIT_USAGE,
                             "use letters, digits, _ . and - (at most 64, not starting "
                             "with . or -)")
    return net


def pick_net(tinc_dir: str, net: Optional[str]) -> str:
    """The net to act on: --net (checked, and joined by this tool), or the only one joined."""
    if net:
        if load_state(tinc_dir, check_net_name(net)) is None:
            raise BootstrapError("net {!r} was not joined by tinc-bootstrap".format(net),
                                 EXIT_USAGE)
        return net
    nets = find_nets(tinc_dir)
    if len(nets) != 1:
        raise BootstrapError("{} nets joined here".format(len(nets) or "no"), EXIT_USAGE,
                             "pass --net" if nets else "run the bootstrap first")
    return nets[0]


def hub_vpn_addresses(tinc_dir: str, net: str, state: dict) -> List[str]:
    """The VPN addresses of the hubs to ping, the joined hub's first: with several hubs, any
    hub answering means the VPN is up (the one it joined through may be gone)."""
    addresses = [state["hub_vpn_address"]] if state.get("hub_vpn_address") else []
    try:
        hubs = parse_hubs_record(read_private(os.path.join(net_dir(tinc_dir, net), HUBS_FILE))
                                 or "")[1]
    except ValueError:
        hubs = []
    for hub in hubs:
        text = read_private(os.path.join(net_dir(tinc_dir, net), "hosts", hub.name)) or ""
        for subnet in host_file_subnets(text):
            if subnet.endswith("/32") and subnet[:-3] not in addresses:
                addresses.append(subnet[:-3])
    return addresses


def status(tinc_dir: str, net: Optional[str], as_json: bool) -> int:
    """Print net, name, address, service state, whether the hub answers over the VPN, and
    the sync loop's state (running, stopped, or off: no list of hubs)."""
    net = pick_net(tinc_dir, net)
    state = load_state(tinc_dir, net) or {}
    facts = detect_system("/")
    if state.get("init") == "systemd":
        service = systemctl_state("is-active", state.get("unit") or service_unit(facts, net))
    else:
        service = "running" if pid_from_file(net) else "stopped"
    reachable = any(ping(address, 2.0) for address in hub_vpn_addresses(tinc_dir, net, state))
    sync = ("off" if not os.path.exists(os.path.join(net_dir(tinc_dir, net), HUBS_FILE))
            else "running" if sync_loop_pid(net) is not None else "stopped")
    report = {"net": net, "name": state.get("name"), "address": state.get("address"),
              "prefix": state.get("prefix"), "hub": state.get("hub_name"),
              "init": state.get("init"), "service": service, "hub_reachable": reachable,
              "sync": sync}
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        for key in ("net", "name", "address", "hub", "init", "service", "hub_reachable", "sync"):
            print("{:<14} {}".format(key + ":", report[key]))
    return EXIT_OK if reachable else EXIT_VPN_DOWN


def leave(tinc_dir: str, net: Optional[str]) -> int:
    """Stop and unregister tincd for the net and remove its configuration."""
    net = pick_net(tinc_dir, net)
    state = load_state(tinc_dir, net) or {}
    facts = detect_system("/")
    init = state.get("init") or "none"
    REPORT.step("stopping tincd of {!r} and removing its boot registration ({})".format(
        net, init))
    stop_and_unregister(net, init, facts, tinc_dir)
    stop_sync_loop(net)  # tinc-down stopped it, unless tincd was not running
    shutil.rmtree(net_dir(tinc_dir, net))
    changed, problems = apply_names(net, net, {})
    for problem in problems:
        REPORT.step("warning: names: " + problem)
    if changed:
        REPORT.step("removed the names of net {} from {}".format(net, ETC_HOSTS))
    REPORT.step("removed {}; on the hub run `tinc-hub revoke {}`".format(
        net_dir(tinc_dir, net), state.get("name")))
    return EXIT_OK


# ---------------------------------------------------------------------------
# rotate-key: a new RSA key for this node, accepted by its hubs, then tincd restarted.

ROTATE_STAGED_PRIVATE = "rsa_key.priv.new"  # the staged key (0600) until the hub accepted it
ROTATE_STAGED_PUBLIC = "rsa_key.pub.new"
ROTATE_STAGED_CREDENTIAL = "credential.new"  # the credential sent with the staged key (0600)
ROTATE_WORK_DIR = ".rotate-key"  # where `tincd -K` writes before the key is staged (0700)


class RotateOptions(NamedTuple):
    net: Optional[str]
    key_size: Optional[int]  # None: the size of the current key
    timeout: float
    dry_run: bool
    tinc_dir: str
    log: Optional[str] = None


def rsa_modulus_bits(pem: str) -> int:
    """The size in bits of an RSA public key PEM block (PKCS#1 or SPKI, strict DER);
    ValueError for anything else."""
    match = PUBLIC_KEY_PEM_RE.fullmatch(pem.strip())
    if not match:
        raise ValueError("not one RSA public key PEM block")
    body = "".join(pem.strip().splitlines()[1:-1])
    try:
        der = base64.b64decode(body, validate=True)
    except ValueError:
        raise ValueError("the PEM body is not base64")
    pkcs1 = base64.b64decode("".join(rsa_public_key_pem(match.group(1), der).splitlines()[1:-1]))
    key = DerReader(pkcs1, 0, len(pkcs1)).enter(DER_SEQUENCE)
    _, content, end = key.take(DER_INTEGER)
    return int.from_bytes(pkcs1[content:end], "big").bit_length()


class RotateRefused(BootstrapError):
    """A hub refused the new key (a 4xx other than 429): final, the hubs share one registry.
    `staged_is_live`: the refusal came after the hub accepted the staged credential (it is
    the node's credential on the hubs: it must not be thrown away)."""

    def __init__(self, status: int, message: str, hint: str, staged_is_live: bool = False) -> None:
        super().__init__(message, EXIT_REFUSED, hint)
        self.status = status
        self.staged_is_live = staged_is_live


def rotate_refusal_hint(status: int, name: str) -> str:
    if status == 401:
        return ("the hubs accept neither this node's credential nor the staged one (if no "
                "rotate-key of yours replaced them, whoever copied this node's files did): "
                "re-run the one-liner with a token made for it (tinc-hub token create --name "
                "{})".format(name))
    if status == 403:
        return "this node was revoked (tinc-hub revoke)"
    if status == 409:
        return "the staged key is another node's (a cloned machine?): run rotate-key again"
    return "hub and bootstrap versions may differ"


def validate_rotate_answer(answer: dict, record: NodeRecord) -> bool:
    """Whether the hub rotated (True) or had this key already (False), from a POST
    /v1/rotate-key answer that must be about this node; ValueError otherwise."""
    if answer.get("name") != record.name or answer.get("net") != record.hub_net:
        raise ValueError("it is not about this node (name {}, net {})".format(
            record.name, record.hub_net))
    if answer.get("address") != record.address or answer.get("prefix") != record.prefix:
        raise ValueError("it gives this node another VPN address than {}/{}".format(
            record.address, record.prefix))
    rotated = answer.get("rotated")
    if not isinstance(rotated, bool):
        raise ValueError("`rotated` is not true or false")
    return rotated


def rotate_request_bodies(record: NodeRecord, public_pem: str,
                          new_credential: str) -> List[bytes]:
    """The bodies a hub is asked with, in order: proven by the current credential, then (when
    that is refused: the hub took this rotation but its answer was lost) by the staged one,
    which the hub answers as a replay."""
    if record.credential is None:
        raise BootstrapError("this node has no sync credential", EXIT_USAGE,
                             "re-run the one-liner (bootstrap.py with a token) to get one")
    proofs = [record.credential] + ([new_credential] if new_credential != record.credential
                                    else [])
    return [json.dumps({"name": record.name, "credential": proof, "public_key": public_pem,
                        "new_credential": new_credential}).encode() for proof in proofs]


def request_rotate_key(record: NodeRecord, public_pem: str, new_credential: str,
                       timeout: float, sleep: Callable[[float], None] = time.sleep
                       ) -> Tuple[HubEndpoint, bool]:
    """POST /v1/rotate-key to the known hubs in order (pinned TLS, as sync) until one accepts
    the key and `new_credential`: (that hub, whether it rotated). A 401 with the current
    credential is asked again with the staged one (rotate_request_bodies). A refusal (4xx
    other than 429) is final (the hubs share one registry); anything else passes to the next
    hub, and rounds are retried with a back-off until `timeout` s. The same key and
    credential sent again are harmless (idempotent)."""
    bodies = rotate_request_bodies(record, public_pem, new_credential)
    headers = {"Content-Type": "application/json", "User-Agent": "tinc-bootstrap/" + __version__}
    deadline = time.monotonic() + timeout
    delay, rounds = 1.0, 0
    while True:
        rounds += 1
        reasons, retry_after = [], 0.0
        for hub in record.hubs:
            for proof, body in enumerate(bodies):
                try:
                    answer = _pinned_request(hub.host, hub.port, hub.pin, "POST",
                                             "/v1/rotate-key", body, headers)
                except (Unreachable, BootstrapError) as exc:  # wrong pin, too large
                    answer = None
                    reasons.append("{}: {}".format(hub.name, exc))
                    break
                if answer.status != 401:
                    break
            if answer is None:
                continue
            if answer.status == 200:
                try:
                    return hub, validate_rotate_answer(answer.body, record)
                except ValueError as exc:
                    reasons.append("{}: answer refused: {}".format(hub.name, exc))
                    continue
            message = _one_line(str(answer.body.get("error") or "HTTP {}".format(answer.status)))
            if answer.status != 429 and answer.status < 500:
                raise RotateRefused(answer.status, "hub {} refused the new key: {}".format(
                    hub.name, message), rotate_refusal_hint(answer.status, record.name),
                    staged_is_live=proof > 0 and answer.status != 401)
            reasons.append("{}: HTTP {}: {}".format(hub.name, answer.status, message))
            retry_after = max(retry_after, answer.retry_after)
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootstrapError("no hub accepted the new key within {:.0f} s ({} rounds): {}".format(
                timeout, rounds, "; ".join(reasons)), EXIT_UNREACHABLE,
                "the key and credential stay staged: run rotate-key again later (it sends the "
                "same ones)")
        wait = delay * random.uniform(0.8, 1.0)
        if retry_after:
            wait = max(wait, retry_after * random.uniform(1.0, 1.2))
        wait = min(wait, left)
        REPORT.step("no hub answered ({}); retrying in {:.1f} s".format("; ".join(reasons), wait))
        sleep(wait)
        delay = min(delay * 2, 15.0)


def staged_public_key(base: str) -> Optional[str]:
    """The public key of a staged rotation (its private key staged too), else None."""
    if not os.path.isfile(os.path.join(base, ROTATE_STAGED_PRIVATE)):
        return None
    return public_key_block(read_private(os.path.join(base, ROTATE_STAGED_PUBLIC)) or "")


def staged_credential(base: str) -> Optional[str]:
    """The credential staged with the key (valid_credential), else None."""
    text = (read_private(os.path.join(base, ROTATE_STAGED_CREDENTIAL)) or "").strip()
    return text if valid_credential(text) else None


def stage_new_credential(base: str) -> str:
    """A new credential of the hub's form (32 random bytes as lowercase hex), staged 0600
    before any request carries it."""
    credential = secrets.token_hex(32)
    remember_secret(credential)
    write_atomic(os.path.join(base, ROTATE_STAGED_CREDENTIAL), credential + "\n", 0o600)
    return credential


class NodeRotation:
    """rotate-key as a list of steps: stage a new key (or resume with the staged one), have a
    hub accept it, put it in place, restart tincd, wait for a hub over the VPN."""

    def __init__(self, opts: RotateOptions, net: str, record: NodeRecord, state: dict,
                 facts: SystemFacts) -> None:
        self.opts, self.net, self.record, self.facts = opts, net, record, facts
        self.base = net_dir(opts.tinc_dir, net)
        self.init = state.get("init") if state.get("init") in INIT_CHOICES else "none"
        self.state = state
        self.public_pem = "<new public key>"
        self.new_credential = ""  # staged with the key (apply_stage)
        self.hub = "<the hub that answers>"
        self.tincd = TincdState()
        self.restarted = False
        self.hold = None  # type: Optional[SyncHold]

    def steps(self) -> List[Step]:
        return [
            Step(self.stage_title, self.plan_stage, self.apply_stage),
            Step(lambda: "asking the hubs to replace the key of node {!r}".format(self.record.name),
                 self.plan_request, self.apply_request),
            Step(lambda: "", self.plan_files, self.apply_files),
            Step(lambda: "", self.plan_restart, self.apply_restart),
            Step(lambda: "", self.plan_wait, self.apply_wait),
        ]

    def path(self, name: str) -> str:
        return os.path.join(self.base, name)

    def key_size(self) -> int:
        if self.opts.key_size is not None:
            return self.opts.key_size
        try:
            return rsa_modulus_bits(public_key_block(read_text(self.path(
                os.path.join("hosts", self.record.name))) or "") or "")
        except (OSError, ValueError):
            return DEFAULT_KEY_SIZE

    def stage_title(self) -> str:
        if staged_public_key(self.base):
            return "key: resuming with the staged key {}".format(self.path(ROTATE_STAGED_PRIVATE))
        return "key: generating a new RSA {} key".format(self.key_size())

    def plan_stage(self) -> Plan:
        if staged_public_key(self.base):
            return Plan(actions=("send the staged key and credential again (a rotation that "
                                 "did not finish)",))
        work = self.path(ROTATE_WORK_DIR)
        return Plan(commands=(("tincd", "-c", work, "-K{}".format(self.key_size())),),
                    actions=("in a fresh {} (0700); then stage its keys as {} and {}, and a new "
                             "credential as {} (0600)".format(
                                 work, self.path(ROTATE_STAGED_PUBLIC),
                                 self.path(ROTATE_STAGED_PRIVATE),
                                 self.path(ROTATE_STAGED_CREDENTIAL)),))

    def apply_stage(self, plan: Plan) -> None:
        with net_lock(self.base):
            staged = staged_public_key(self.base)
            if staged is None:
                staged = self.make_staged_key(plan)
            credential = staged_credential(self.base)
            if credential is None:  # a key staged without one (never sent with one)
                credential = stage_new_credential(self.base)
        remember_secret(credential)
        self.public_pem, self.new_credential = staged, credential

    def make_staged_key(self, plan: Plan) -> str:
        """Run `tincd -K` in the work dir, then stage the public key and a new credential,
        then (the commit point) rename the private key to rsa_key.priv.new: a crash leaves no
        half-staged key, and a staged key always has the credential it may have been sent
        with."""
        work = self.path(ROTATE_WORK_DIR)
        shutil.rmtree(work, ignore_errors=True)
        os.mkdir(work, 0o700)
        try:
            for cmd in plan.commands:
                run(cmd, timeout=600)
            private = os.path.join(work, "rsa_key.priv")
            pem = public_key_block(read_text(os.path.join(work, "rsa_key.pub")) or "")
            if not pem or not os.path.isfile(private):
                raise BootstrapError("tincd -K made no key pair in {}".format(work), EXIT_COMMAND)
            write_atomic(self.path(ROTATE_STAGED_PUBLIC), pem + "\n", 0o600)
            stage_new_credential(self.base)
            os.chmod(private, 0o600)
            os.rename(private, self.path(ROTATE_STAGED_PRIVATE))
            fsync_directory(self.base)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return pem

    def plan_request(self) -> Plan:
        return Plan(actions=tuple(
            "POST https://{}:{}/v1/rotate-key name={} (the new public key and credential, "
            "proven by this node's credential, or by the staged one if that is refused){}"
            .format(hub.host, hub.port, self.record.name,
                    "" if i == 0 else ", if the hubs before it do not answer")
            for i, hub in enumerate(self.record.hubs)))

    def apply_request(self, plan: Plan) -> None:
        try:
            hub, rotated = request_rotate_key(self.record, self.public_pem, self.new_credential,
                                              self.opts.timeout)
        except RotateRefused as exc:
            # the key itself is refused (and nothing was changed): the next run makes another
            if exc.status in (400, 409) and not exc.staged_is_live:
                with net_lock(self.base):
                    for name in (ROTATE_STAGED_PRIVATE, ROTATE_STAGED_PUBLIC,
                                 ROTATE_STAGED_CREDENTIAL):
                        try:
                            os.unlink(self.path(name))
                        except FileNotFoundError:
                            pass
            raise
        self.hub = hub.name
        REPORT.step("hub {} {}".format(hub.name, "accepted the new key" if rotated
                                       else "had the new key already"))

    def plan_files(self) -> Plan:
        host = FileSpec(self.path(os.path.join("hosts", self.record.name)),
                        render_host_file(["Subnet = {}/32".format(self.record.address)],
                                         self.public_pem))
        return Plan(files=(host,), actions=(
            "replace {} with the staged credential (temp file and rename, 0600)".format(
                self.path(CREDENTIAL_FILE)),
            "rename {} to {} (atomic)".format(self.path(ROTATE_STAGED_PRIVATE),
                                              self.path("rsa_key.priv")),
            "remove {} and {}".format(self.path(ROTATE_STAGED_PUBLIC),
                                      self.path(ROTATE_STAGED_CREDENTIAL))))

    def apply_files(self, plan: Plan) -> None:
        """The host file, then the credential, then the private key (the commit point): until
        the rename, a re-run resumes with the staged key and credential (the hub answers it
        as a replay); after it, every file holds the new key and credential."""
        with net_lock(self.base):
            if staged_public_key(self.base) != self.public_pem:  # another run finished it
                if public_key_block(read_text(plan.files[0].path) or "") != self.public_pem:
                    raise BootstrapError("the staged key changed during the rotation", EXIT_ERROR,
                                         "another rotate-key ran at the same time: run it again")
                return
            apply_files(plan.files)
            write_atomic(self.path(CREDENTIAL_FILE), self.new_credential + "\n", 0o600)
            os.rename(self.path(ROTATE_STAGED_PRIVATE), self.path("rsa_key.priv"))
            fsync_directory(self.base)
            for name in (ROTATE_STAGED_PUBLIC, ROTATE_STAGED_CREDENTIAL):
                try:
                    os.unlink(self.path(name))
                except FileNotFoundError:
                    pass

    def start_how(self) -> str:
        return "systemd" if self.init == "systemd" else "direct"

    def plan_restart(self) -> Plan:
        """Restart tincd (it reads its private key only at start): systemctl restart, or
        tincd -k and a new tincd. A stopped tincd is left stopped (it starts with the key)."""
        self.tincd = read_tincd_state(self.net, self.start_how(), self.facts)
        if not self.tincd.active and not self.opts.dry_run:
            return Plan(actions=("tincd of {} is not running: it uses the new key when it "
                                 "starts".format(self.net),))
        plan = plan_start(self.net, self.start_how(), self.facts,
                          self.tincd._replace(active=True), True, self.opts.tinc_dir)
        return plan._replace(actions=("create {} first: tinc-down and tinc-up leave the sync "
                                      "loop running (no Python start while off the VPN); "
                                      "removed once a hub answers".format(
                                          sync_hold_path(self.net)),))

    def apply_restart(self, plan: Plan) -> None:
        if not plan.commands:
            REPORT.step(plan.actions[0])
            return
        self.hold = SyncHold(self.opts.tinc_dir, self.net).__enter__()
        apply_start(plan, self.tincd)
        self.restarted = True
        REPORT.step("tincd restarted with the new key")

    def release_hold(self) -> None:
        """End apply_restart's SyncHold (the loop matches tincd again); idempotent."""
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.__exit__(None, None, None)

    def plan_wait(self) -> Plan:
        return Plan(actions=("ping the hubs over the VPN until one answers, at most {:.0f} s"
                             .format(self.opts.timeout),))

    def apply_wait(self, plan: Plan) -> None:
        """Any hub answering means the VPN is up again (the joined one is asked first, and
        tinc-up has run); then the sync hold ends."""
        try:
            self.wait_for_a_hub()
        finally:
            self.release_hold()

    def wait_for_a_hub(self) -> None:
        addresses = hub_vpn_addresses(self.opts.tinc_dir, self.net, self.state)
        if not self.restarted or not addresses:
            return
        deadline = time.monotonic() + self.opts.timeout
        while True:
            for address in addresses:
                if wait_for_ping(address, min(5.0, max(0.1, deadline - time.monotonic())),
                                 interval=0.01, max_interval=0.5,
                                 nudge=lambda: nudge_tincd(self.net)):
                    return
            if time.monotonic() >= deadline:
                break
        raise BootstrapError("no hub answered over the VPN within {:.0f} s of the restart".format(
            self.opts.timeout), EXIT_VPN_DOWN, "see tincd's log; the hub's log says whether it "
            "refused the key")


def rotate_key(opts: RotateOptions) -> int:
    """`bootstrap.py rotate-key`: NodeRotation's steps (printed with --dry-run)."""
    if opts.key_size is not None and opts.key_size < 2048:
        raise BootstrapError("--key-size must be at least 2048", EXIT_USAGE)
    if os.geteuid() != 0 and not opts.dry_run:
        raise BootstrapError("this must run as root", EXIT_USAGE, "use sudo, or --dry-run")
    net = pick_net(opts.tinc_dir, opts.net)
    record = read_node_record(opts.tinc_dir, net)
    if record.credential is None and not opts.dry_run:
        raise BootstrapError("this node has no sync credential, which rotate-key proves its "
                             "identity with", EXIT_USAGE, "re-run the one-liner (bootstrap.py "
                             "with a token) to get one")
    remember_secret(record.credential)
    job = NodeRotation(opts, net, record, load_state(opts.tinc_dir, net) or {},
                       detect_system("/"))
    try:
        run_steps(job.steps(), opts.dry_run)
    finally:
        job.release_hold()  # the restart failed: the loop must match tincd all the same
    if opts.dry_run:
        REPORT.step("dry run: nothing was changed" + (
            " (a real run logs to {})".format(opts.log) if opts.log else ""))
        return EXIT_OK
    REPORT.step("rotated: node {} of net {} uses its new key".format(record.name, net))
    return EXIT_OK


# ---------------------------------------------------------------------------
# Command line: every flag has a TINC_BOOTSTRAP_* environment twin.

def _env(name: str, default=None):
    return os.environ.get("TINC_BOOTSTRAP_" + name, default)


def _env_flag(name: str) -> bool:
    return (_env(name, "") or "").lower() in ("1", "yes", "true", "on")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def add_timeout_and_dry_run(parser: argparse.ArgumentParser) -> None:
    """--timeout and --dry-run, as join and rotate-key have them."""
    parser.add_argument("--timeout", type=float, default=float(_env("TIMEOUT", "300")),
                        help="seconds to keep retrying the hubs, and to wait for the VPN "
                             "(env TINC_BOOTSTRAP_TIMEOUT)")
    parser.add_argument("--dry-run", action="store_true", default=_env_flag("DRY_RUN"),
                        help="print every file and command; change nothing "
                             "(env TINC_BOOTSTRAP_DRY_RUN)")


def build_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog="bootstrap.py" + ("" if command == "join" else " " + command),
                     description=__doc__.split("\n\n")[0],
                     epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 unsupported system, "
                            "4 refused by the hub, 5 hub unreachable, 6 VPN not up, "
                            "7 command failed. Log: " + DEFAULT_LOG)
    parser.add_argument("--net", default=_env("NET"), help="tinc net name (env TINC_BOOTSTRAP_NET; "
                        "default: the hub's)")
    parser.add_argument("--tinc-dir", default=_env("TINC_DIR", DEFAULT_TINC_DIR),
                        help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", default=_env_flag("VERBOSE"),
                        help="show commands and tracebacks (env TINC_BOOTSTRAP_VERBOSE)")
    parser.add_argument("--log", default=_env("LOG", DEFAULT_LOG),
                        help="full log file (env TINC_BOOTSTRAP_LOG; '' for none)")
    if command == "join":
        parser.add_argument("--hub", default=_env("HUB"),
                            help="HOST[:PORT] of the hub's API, overriding the token's "
                                 "(env TINC_BOOTSTRAP_HUB)")
        parser.add_argument("--token", default=None,
                            help="enrolment token (prefer env TINC_BOOTSTRAP_TOKEN or "
                                 "--token-file: arguments show in ps)")
        parser.add_argument("--token-file", default=_env("TOKEN_FILE"),
                            help="file holding the token (env TINC_BOOTSTRAP_TOKEN_FILE)")
        parser.add_argument("--name", default=_env("NAME"),
                            help="node name (env TINC_BOOTSTRAP_NAME; default: the hostname "
                                 "with - and . as _)")
        parser.add_argument("--init", default=_env("INIT", "auto"), choices=INIT_CHOICES,
                            help="boot registration (env TINC_BOOTSTRAP_INIT)")
        parser.add_argument("--key-size", type=int, default=int(_env("KEY_SIZE", str(DEFAULT_KEY_SIZE))),
                            help="RSA key size (env TINC_BOOTSTRAP_KEY_SIZE)")
        add_timeout_and_dry_run(parser)
        parser.add_argument("--root", default=_env("ROOT", "/"), help=argparse.SUPPRESS)
    if command == "rotate-key":
        parser.description = ("Give this node a new RSA key and a new sync credential: made "
                              "here (staged next to the current ones until a hub accepted "
                              "them, so a re-run resumes with the same ones), sent to the hubs "
                              "with this node's credential (pinned TLS), then put in place and "
                              "tincd restarted. The old key and credential are refused from "
                              "then on.")
        parser.add_argument("--key-size", type=int, default=(
            int(_env("KEY_SIZE")) if _env("KEY_SIZE") else None),
            help="RSA key size (env TINC_BOOTSTRAP_KEY_SIZE; default: the current key's)")
        add_timeout_and_dry_run(parser)
    if command == "status":
        parser.add_argument("--json", action="store_true", default=_env_flag("JSON"),
                            help="machine-readable output (env TINC_BOOTSTRAP_JSON)")
    if command == "sync":
        parser.description = ("Keep this node's hubs in step: ask the hubs it knows (pinned "
                              "TLS) for the current list, rewrite hosts/<hub> and tinc.conf's "
                              "ConnectTo lines when they change, SIGHUP tincd. Without "
                              "--once: a loop (tinc-up starts it with --daemon, tinc-down "
                              "stops it with --stop).")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--once", action="store_true", default=_env_flag("ONCE"),
                          help="one round, then exit (env TINC_BOOTSTRAP_ONCE)")
        mode.add_argument("--daemon", action="store_true",
                          help="start the loop detached unless it runs (what tinc-up does)")
        mode.add_argument("--stop", action="store_true",
                          help="stop the loop (what tinc-down does)")
    return parser


MAX_TOKEN_FILE = 4096


def read_token(args: argparse.Namespace, env_token: Optional[str]) -> str:
    """The token from --token, else --token-file, else TINC_BOOTSTRAP_TOKEN; spaces stripped.

    The token is remembered for redact(), so no message or log line can show it.
    """
    if args.token:
        token = args.token
    elif args.token_file:
        try:
            with open(args.token_file) as handle:
                token = handle.read(MAX_TOKEN_FILE + 1)
        except (OSError, UnicodeDecodeError) as exc:
            raise BootstrapError("cannot read --token-file: {}".format(exc), EXIT_USAGE)
        if len(token) > MAX_TOKEN_FILE:
            raise BootstrapError("--token-file {} is too large for a token".format(
                args.token_file), EXIT_USAGE, "the file must hold only the token")
    elif env_token:
        token = env_token
    else:
        raise BootstrapError("no token given", EXIT_USAGE,
                             "pass --token-file FILE or set TINC_BOOTSTRAP_TOKEN")
    token = token.strip()
    if len(token) >= 8:
        _SECRETS.append(token)
        try:
            _SECRETS.append(decode_token(token).secret)
        except BootstrapError:
            pass
    return token


def sync_command(args: argparse.Namespace) -> int:
    """`bootstrap.py sync [--once|--daemon|--stop]` (root only)."""
    if os.geteuid() != 0:
        raise BootstrapError("this must run as root", EXIT_USAGE, "use sudo")
    if args.stop:  # tinc-down: the net dir may be half gone; the name is enough
        return stop_sync_loop(check_net_name(args.net or ""))
    net = pick_net(args.tinc_dir, args.net)
    if args.daemon:
        return launch_sync_loop(args.tinc_dir, net, args.log)
    if args.once:
        return sync_once(args.tinc_dir, net)
    return sync_loop(args.tinc_dir, net)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # First of all: the token leaves our environment, so that no child process (apt, yum,
    # tincd and the tinc-up it runs) inherits it.
    env_token = os.environ.pop("TINC_BOOTSTRAP_TOKEN", None)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("join", "status", "leave", "sync",
                                                  "rotate-key") else "join"
    verbose = "-v" in argv or "--verbose" in argv or _env_flag("VERBOSE")
    global REPORT
    try:
        try:
            args = build_parser(command).parse_args(argv)
        except UsageError as exc:
            raise BootstrapError(str(exc), EXIT_USAGE, "see --help")
        except ValueError as exc:
            raise BootstrapError("bad value in a TINC_BOOTSTRAP_* variable: {}".format(exc),
                                 EXIT_USAGE)
        dry = command in ("join", "rotate-key") and args.dry_run
        REPORT = Reporter(None if dry or os.geteuid() != 0 else args.log, args.verbose)
        if command == "status":
            return status(args.tinc_dir, args.net, args.json)
        if command == "leave":
            return leave(args.tinc_dir, args.net)
        if command == "sync":
            return sync_command(args)
        if command == "rotate-key":
            return rotate_key(RotateOptions(args.net, args.key_size, args.timeout, args.dry_run,
                                            args.tinc_dir, args.log))
        opts = JoinOptions(read_token(args, env_token), args.hub, args.name, args.net, args.init,
                           args.key_size, args.timeout, args.dry_run, args.tinc_dir, args.root,
                           args.log)
        return join(opts)
    except BootstrapError as exc:
        if verbose:
            import traceback
            sys.stderr.write(redact(traceback.format_exc()))
        line = "tinc-bootstrap: error: {}".format(exc)
        if exc.hint:
            line += " (hint: {})".format(exc.hint)
        if REPORT.log_path:
            REPORT.debug(line)
            line += " [log: {}]".format(REPORT.log_path)
        sys.stderr.write(redact(line) + "\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("tinc-bootstrap: interrupted\n")
        return 130
    except Exception as exc:  # the last resort: one line, traceback in the log or with -v
        import traceback
        REPORT.debug(traceback.format_exc())
        if verbose:
            sys.stderr.write(redact(traceback.format_exc()))
        sys.stderr.write(redact("tinc-bootstrap: unexpected error: {}: {} (hint: run with -v)\n"
                                .format(type(exc).__name__, exc)))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
