"""``tinc-hub backup FILE`` and ``tinc-hub restore FILE``: a whole hub in one file.

The file is a gzip-compressed ustar archive with allow-listed members (no directories, no
links, uid/gid 0), its first member ``manifest.json``::

    manifest.json              format, format_version, tinc_hub_version, schema_revision, net,
                               hub, created_at, pin, registry {kind, url, password_file},
                               files {member: {size, sha256}}, not_included
    state/hub.json             the hub's settings (init's arguments)
    state/tls/key.pem          the API's TLS key (nodes pin its public key)
    state/tls/cert.pem         its certificate
    state/registry.sqlite3     the registry, SQLite only: an online copy by sqlite3's backup API
    tinc/tinc.conf, tinc/rsa_key.priv, tinc/tinc-up, tinc/tinc-down, tinc/host-up,
    tinc/host-down, tinc/conf.d/hubs.conf, tinc/hosts/NAME    the net's tinc directory

A PostgreSQL registry is not in the file (back it up with pg_dump): the manifest names its URL
(without password) and the path of its password file, never the password.

Restore reads the archive as a hostile input: every member must be listed in the manifest
with its size and sha256, be a regular file with an allow-listed name, and stay within a size
bound; anything else is refused in one line before anything is written. It then writes only
what init cannot make again (hub.json, the TLS key and certificate, the registry, the tinc
key and hosts/), with the modes of this table and the restoring user as owner, and runs
init's own steps (tinc installed, tinc.conf, scripts, boot registration, tincd, the API and
its units) on the restored hub.json. tinc.conf, the scripts and conf.d/hubs.conf of the
archive are for the record: init renders them again.
"""

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import sqlite3
import stat
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional, Tuple

from bootstrap import bootstrap
from . import __version__
from .errors import HubError
from .state import HubConfig, StateDir

log = logging.getLogger("tinc_hub.restore")

FORMAT_NAME = "tinc-hub-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# member -> mode on restore (the archive's own modes, owners and times are never used)
STATE_MEMBERS = {"state/hub.json": 0o600, "state/tls/key.pem": 0o600,
                 "state/tls/cert.pem": 0o644, "state/registry.sqlite3": 0o600}
TINC_MEMBERS = {"tinc/tinc.conf": 0o644, "tinc/rsa_key.priv": 0o600, "tinc/tinc-up": 0o755,
                "tinc/tinc-down": 0o755, "tinc/host-up": 0o755, "tinc/host-down": 0o755,
                "tinc/conf.d/hubs.conf": 0o644}
HOST_MEMBER_RE = re.compile(r"tinc/hosts/([A-Za-z0-9_]{1,64})")
HOST_FILE_MODE = 0o644
# written by restore; the other tinc files are rendered again by init's steps
RESTORED_TINC_FILES = ("tinc/rsa_key.priv",)
REGISTRY_MEMBER = "state/registry.sqlite3"

MAX_MANIFEST_BYTES = 32 << 20  # ~250 bytes a member
MAX_TEXT_BYTES = 1 << 20  # hub.json, PEM files, tinc.conf, scripts
MAX_HOST_FILE_BYTES = 64 << 10
MAX_REGISTRY_BYTES = 4 << 30
MAX_MEMBERS = 1 << 17  # a /15 of nodes, and the hub's own files
COPY_CHUNK = 1 << 20
SHA256_RE = re.compile(r"[0-9a-f]{64}")
PRINTABLE_RE = re.compile(r"[\x20-\x7e]{1,200}")  # manifest strings that restore prints

NOT_INCLUDED = [
    "liveness (when each node was last seen): filled again as nodes connect",
    "names.json and /etc/hosts lines: written again by the API from the registry",
    "the ip_forward value recorded before the first exposure (a property of the old machine)",
    "the boot service and systemd units: installed again by restore, as init does",
    "the PostgreSQL registry and its password file (when the hub uses one)",
]


def member_mode(name: str) -> Optional[int]:
    """The mode a member is restored with; None when the name is not allowed."""
    if name in STATE_MEMBERS:
        return STATE_MEMBERS[name]
    if name in TINC_MEMBERS:
        return TINC_MEMBERS[name]
    match = HOST_MEMBER_RE.fullmatch(name)
    if match and bootstrap.valid_node_name(match.group(1)):
        return HOST_FILE_MODE
    return None


def member_limit(name: str) -> int:
    if name == REGISTRY_MEMBER:
        return MAX_REGISTRY_BYTES
    if name.startswith("tinc/hosts/"):
        return MAX_HOST_FILE_BYTES
    return MAX_TEXT_BYTES


# -- backup --------------------------------------------------------------------------------

@dataclass
class BackupResult:
    path: str  # "-" for stdout
    members: int
    size: int  # bytes of the archive
    registry: str  # what the registry part says (copied, or where it is)
    left_out: List[str] = field(default_factory=list)  # files of the net dir not backed up


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes (not through a symlink), refused past ``limit``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise HubError(f"{path} is not a regular file: not backed up")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise HubError(f"{path} is larger than {limit} bytes: not backed up",
                       "a hub's own files are small; look at what it holds")
    return data


def copy_sqlite_registry(source: Path, target: Path) -> str:
    """An online, consistent copy of the SQLite registry (sqlite3's backup API: one read
    transaction, WAL contents included); returns its schema revision."""
    if not source.is_file():
        raise HubError(f"registry {source} not found", "run 'tinc-hub init' first")
    src = sqlite3.connect(source.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(str(target))
        try:
            src.backup(dst)
            revision = schema_revision_of(dst)
        finally:
            dst.close()
    finally:
        src.close()
    return revision


def schema_revision_of(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = "
                       "'alembic_version'").fetchone()
    if row is None:
        return "legacy"
    found = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return str(found[0]) if found else "legacy"


def gather_tinc_files(config: HubConfig) -> Tuple[Dict[str, bytes], List[str]]:
    """member -> bytes of the net's tinc directory (allow-listed files only), and what of the
    net directory was left out."""
    net_dir, files, left_out = config.net_dir, {}, []
    for member in TINC_MEMBERS:
        path = net_dir / member[len("tinc/"):]
        if path.exists() or path.is_symlink():
            files[member] = read_bounded(path, member_limit(member))
    known = {m[len("tinc/"):] for m in TINC_MEMBERS} | {"hosts", "conf.d"}
    for entry in sorted(os.listdir(net_dir)):
        if entry not in known:
            left_out.append(str(net_dir / entry))
    for entry in sorted(os.listdir(config.hosts_dir)):
        member = "tinc/hosts/" + entry
        path = config.hosts_dir / entry
        if member_mode(member) is None or path.is_symlink() or not path.is_file():
            left_out.append(str(path))  # temporary files of a crashed write, strangers
            continue
        files[member] = read_bounded(path, MAX_HOST_FILE_BYTES)
    if "tinc/rsa_key.priv" not in files or f"tinc/hosts/{config.name}" not in files:
        raise HubError(f"{net_dir} holds no rsa_key.priv or hosts/{config.name}",
                       "is this hub initialised? ('tinc-hub init')")
    return files, left_out


def write_archive(out: IO[bytes], manifest: dict, members: Dict[str, bytes],
                  registry_copy: Optional[Path], mtime: int) -> None:
    """The gzip'd ustar stream: the manifest first, then every member in name order."""
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=mtime) as zipped, \
            tarfile.open(fileobj=zipped, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, size: int, data: IO[bytes], mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, mode, mtime
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, data)

        text = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        add(MANIFEST, len(text), io.BytesIO(text), 0o600)
        names = sorted(list(members) + ([REGISTRY_MEMBER] if registry_copy else []))
        for name in names:
            mode = member_mode(name) or 0o600
            if name == REGISTRY_MEMBER and registry_copy is not None:
                with open(registry_copy, "rb") as handle:
                    add(name, os.fstat(handle.fileno()).st_size, handle, mode)
            else:
                add(name, len(members[name]), io.BytesIO(members[name]), mode)


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_backup(state: StateDir, target: str, force: bool, registry_url: Optional[str] = None,
                registry_password_file: Optional[str] = None,
                stdout: Optional[IO[bytes]] = None) -> BackupResult:
    """Write the backup of the hub in ``state`` to ``target`` ("-": ``stdout``), atomically,
    created with mode 0600; refuses an existing target unless ``force``."""
    from .registry import Registry
    from .tls import pin_of_cert_file

    config = state.load_config()
    registry = Registry.for_state(state, registry_url, registry_password_file)
    # a newer schema refused, as by every command; an older one is copied as it is (a backup
    # writes nothing to what it copies; restore upgrades it)
    from .migrations import refuse_unknown_revision
    refuse_unknown_revision(registry.schema_revision(), registry.describe())
    if target != "-":
        target = os.path.abspath(target)
        if os.path.lexists(target) and not force:
            raise HubError(f"{target} exists: not overwritten", "give another FILE, or --force")
        if os.path.isdir(target):
            raise HubError(f"{target} is a directory", "give a file name")
    members: Dict[str, bytes] = {}
    for member in ("state/hub.json", "state/tls/key.pem", "state/tls/cert.pem"):
        path = state.root / member[len("state/"):]
        try:
            members[member] = read_bounded(path, MAX_TEXT_BYTES)
        except FileNotFoundError:
            raise HubError(f"{path} is missing: this hub is incomplete",
                           "re-run 'tinc-hub init' with its original arguments") from None
    tinc_files, left_out = gather_tinc_files(config)
    members.update(tinc_files)
    created = int(time.time())
    work = Path(tempfile.mkdtemp(prefix=".tinc-hub-backup-", dir=str(state.root)))
    try:
        registry_copy: Optional[Path] = None
        if registry.dialect == "sqlite":
            assert registry.db_path is not None
            registry_copy = work / "registry.sqlite3"
            revision = copy_sqlite_registry(registry.db_path, registry_copy)
            registry_part = {"kind": "sqlite"}
            described = f"SQLite registry {registry.db_path} included"
        else:
            revision = registry.schema_revision() or "none"
            registry_part = {"kind": "postgresql", "url": registry.describe(),
                             "password_file": config.registry_password_file}
            described = (f"the PostgreSQL registry {registry.describe()} is NOT in the backup"
                         " (back it up with pg_dump)")
        files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                 for name, data in members.items()}
        if registry_copy is not None:
            files[REGISTRY_MEMBER] = {"size": registry_copy.stat().st_size,
                                      "sha256": sha256_of_file(registry_copy)}
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "tinc_hub_version": __version__, "schema_revision": revision,
            "net": config.net, "hub": config.name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "pin": pin_of_cert_file(state.cert_file), "registry": registry_part,
            "files": files, "not_included": NOT_INCLUDED,
        }
        if target == "-":
            out = stdout if stdout is not None else sys.stdout.buffer
            counter = _CountingWriter(out)
            write_archive(counter, manifest, members, registry_copy, created)
            out.flush()
            size = counter.count
        else:
            size = write_private_file(target, force, lambda handle: write_archive(
                handle, manifest, members, registry_copy, created))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BackupResult(target, len(files) + 1, size, described, left_out)


class _CountingWriter(io.RawIOBase):
    """Counts the bytes written through it (the archive's size on stdout)."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.count = out, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.out.write(data)
        self.count += len(data)
        return len(data)


def write_private_file(target: str, force: bool, write) -> int:
    """Create ``target`` with mode 0600 from the start (a temp file beside it, fsync'd, then
    linked into place: an existing target is never replaced unless ``force``); returns its size."""
    directory = os.path.dirname(target)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                               dir=directory)  # 0600 whatever the umask
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
        if force:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if it appeared meanwhile: never overwritten
            except FileExistsError:
                raise HubError(f"{target} exists: not overwritten",
                               "give another FILE, or --force") from None
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    bootstrap.fsync_directory(directory)
    return size


# -- reading an archive (hostile input) ------------------------------------------------------

class ArchiveError(HubError):
    """The file is not a backup this tinc-hub can restore (one line, nothing written)."""


def refuse(message: str) -> ArchiveError:
    return ArchiveError(f"backup refused: {message}",
                        "use an undamaged file written by 'tinc-hub backup'")


@dataclass
class Staged:
    """An archive read and checked into a private staging directory."""
    manifest: dict
    root: Path  # staging dir: member names are paths below it

    def path(self, member: str) -> Path:
        return self.root / member

    def has(self, member: str) -> bool:
        return member in self.manifest["files"]

    def text(self, member: str) -> str:
        try:
            return self.path(member).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise refuse(f"{member} is not UTF-8 text") from None

    def host_members(self) -> List[str]:
        return sorted(m for m in self.manifest["files"] if m.startswith("tinc/hosts/"))


def check_manifest(data: bytes) -> dict:
    """The manifest, checked field by field (format, version, names, sizes, digests)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refuse(f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise refuse(f"{MANIFEST} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise refuse(f"format_version {version!r} is not a version")
    if version > FORMAT_VERSION:
        raise ArchiveError(
            f"backup refused: format version {version} (tinc-hub"
            f" {str(manifest.get('tinc_hub_version'))[:40]!r}) is newer than this tinc-hub"
            f" {__version__} reads ({FORMAT_VERSION})",
            "restore with the tinc-hub version that wrote it, or newer")
    for key in ("tinc_hub_version", "schema_revision", "net", "hub", "created_at", "pin"):
        value = manifest.get(key)
        if not isinstance(value, str) or not PRINTABLE_RE.fullmatch(value):
            raise refuse(f"{MANIFEST}: {key} is missing or not a short printable string")
    registry = manifest.get("registry")
    if not isinstance(registry, dict) or registry.get("kind") not in ("sqlite", "postgresql"):
        raise refuse(f"{MANIFEST}: registry.kind must be sqlite or postgresql")
    files = manifest.get("files")
    if not isinstance(files, dict) or not 0 < len(files) <= MAX_MEMBERS:
        raise refuse(f"{MANIFEST}: files must list 1 to {MAX_MEMBERS} members")
    for name, entry in files.items():
        if member_mode(name) is None:
            raise refuse(f"member {name[:80]!r} is not one a backup holds")
        if not isinstance(entry, dict) or set(entry) != {"size", "sha256"}:
            raise refuse(f"{MANIFEST}: entry of {name} must be {{size, sha256}}")
        size, digest = entry["size"], entry["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= member_limit(name):
            raise refuse(f"{MANIFEST}: size of {name} is out of bounds")
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise refuse(f"{MANIFEST}: sha256 of {name} is not a hex digest")
    required = ["state/hub.json", "state/tls/key.pem", "state/tls/cert.pem", "tinc/rsa_key.priv",
                f"tinc/hosts/{manifest['hub']}"]
    if registry["kind"] == "sqlite":
        required.append(REGISTRY_MEMBER)
    elif REGISTRY_MEMBER in files:
        raise refuse("a PostgreSQL hub's backup holds a SQLite registry")
    missing = [m for m in required if m not in files]
    if missing:
        raise refuse(f"{MANIFEST} lists no {', '.join(missing)}")
    return manifest


def _members(tar: "tarfile.TarFile") -> Iterator["tarfile.TarInfo"]:
    count = 0
    for info in tar:
        count += 1
        if count > MAX_MEMBERS + 1:
            raise refuse(f"more than {MAX_MEMBERS + 1} members")
        yield info


def _copy_member(source: IO[bytes], target: Path, size: int) -> str:
    """Stream exactly ``size`` bytes to a new 0600 file; returns their sha256."""
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        left = size
        while left:
            chunk = source.read(min(COPY_CHUNK, left))
            if not chunk:
                raise refuse(f"{target.name} ends early")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class StrictTarInfo(tarfile.TarInfo):
    """A member header that refuses, from the header alone, anything but a plain regular
    file: tarfile itself would read a GNU long name's or a pax header's data into memory,
    whatever size its header claims. (TarInfo._proc_member is tarfile's private hook, called
    for every header since Python 3.0; test_hub_backup checks that it still is.)"""

    def _proc_member(self, tar):  # type: ignore[override]
        if self.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise refuse(f"member {self.name[:80]!r} is not a regular file (links, devices,"
                         " directories and extended headers are never in a backup)")
        return super()._proc_member(tar)


def read_archive(source: IO[bytes], staging: Path) -> Staged:
    """Read the archive stream into ``staging`` (an empty private directory), refusing
    anything but exactly the members the manifest lists, each once, whole and intact."""
    try:
        with tarfile.open(fileobj=source, mode="r|gz", tarinfo=StrictTarInfo) as tar:
            return _read_members(tar, staging)
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeError) as exc:
        raise refuse(f"not a readable gzip'd tar archive ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120] or type(exc).__name__


def _read_members(tar: "tarfile.TarFile", staging: Path) -> Staged:
    manifest: Optional[dict] = None
    seen = set()
    for info in _members(tar):
        name = info.name
        if info.pax_headers:
            raise refuse(f"member {name[:80]!r} carries pax headers")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.issparse():
            raise refuse(f"member {name[:80]!r} is not a regular file (links, devices and"
                         " directories are never in a backup)")
        if manifest is None:
            if name != MANIFEST:
                raise refuse(f"the first member is {name[:80]!r}, not {MANIFEST}")
            if info.size > MAX_MANIFEST_BYTES:
                raise refuse(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
            handle = tar.extractfile(info)
            assert handle is not None
            manifest = check_manifest(handle.read(info.size))
            continue
        entry = manifest["files"].get(name)
        if entry is None:
            raise refuse(f"member {name[:80]!r} is not listed in {MANIFEST}")
        if name in seen:
            raise refuse(f"member {name} appears twice")
        seen.add(name)
        if info.size != entry["size"]:
            raise refuse(f"{name} has {info.size} bytes, the manifest says {entry['size']}")
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = tar.extractfile(info)
        assert handle is not None
        if _copy_member(handle, target, info.size) != entry["sha256"]:
            raise refuse(f"{name} is damaged (its sha256 differs from the manifest's)")
    if manifest is None:
        raise refuse("the archive is empty")
    missing = sorted(set(manifest["files"]) - seen)
    if missing:
        raise refuse(f"{len(missing)} member(s) listed in {MANIFEST} are missing, e.g. {missing[0]}")
    return Staged(manifest, staging)


# -- restore ---------------------------------------------------------------------------------

@dataclass
class RestoreResult:
    config: HubConfig
    manifest: dict
    pin: str
    schema_upgraded: List[str]
    moved_aside: List[str]
    tincd: str
    api_service: Optional[str]
    registry: str


def check_restored_config(staged: Staged) -> HubConfig:
    """hub.json of the archive, as strictly as init checks its arguments."""
    from .hub_init import InitRequest, validate_request
    from .service import checked_path

    try:
        data = json.loads(staged.text("state/hub.json"))
    except ValueError:
        raise refuse("state/hub.json is not JSON") from None
    if not isinstance(data, dict):
        raise refuse("state/hub.json is not a JSON object")
    try:
        config = HubConfig.from_dict(data)
        validate_request(InitRequest(net=config.net, name=config.name, address=config.address,
                                     vpn_subnet=config.vpn_subnet, port=config.port,
                                     api_port=config.api_port, init=config.init,
                                     tinc_dir=config.tinc_dir))
        if checked_path(config.tinc_dir, "tinc dir") != config.tinc_dir:
            raise HubError(f"tinc_dir {config.tinc_dir!r} is not a normalised path")
        import ipaddress

        if ipaddress.IPv4Address(config.hub_address) not in config.network:
            raise HubError(f"hub_address {config.hub_address} is outside {config.vpn_subnet}")
    except (HubError, ValueError) as exc:
        raise refuse(f"state/hub.json: {_short(exc)}") from None
    manifest = staged.manifest
    if (config.net, config.name) != (manifest["net"], manifest["hub"]):
        raise refuse(f"hub.json is hub {config.name!r} of net {config.net!r}, the manifest"
                     f" says {manifest['hub']!r} of {manifest['net']!r}")
    sqlite_config = config.registry is None or config.registry.startswith("sqlite:")
    if sqlite_config != (manifest["registry"]["kind"] == "sqlite"):
        raise refuse("hub.json's registry and the manifest's disagree")
    return config


def check_keys(staged: Staged, config: HubConfig) -> int:
    """The TLS key and certificate belong together and give the manifest's pin; the tinc key
    is the one of the hub's host file. Returns the tinc key's size in bits."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from .tls import spki_pin

    def public_der(key) -> bytes:
        return key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    try:
        tls_key = serialization.load_pem_private_key(staged.path("state/tls/key.pem").read_bytes(),
                                                     password=None)
        cert = x509.load_pem_x509_certificate(staged.path("state/tls/cert.pem").read_bytes())
    except (ValueError, TypeError) as exc:
        raise refuse(f"the TLS key or certificate is unreadable ({_short(exc)})") from None
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey) or \
            public_der(tls_key.public_key()) != public_der(cert.public_key()):
        raise refuse("the TLS certificate is not the TLS key's")
    if spki_pin(cert) != staged.manifest["pin"]:
        raise refuse("the TLS certificate's pin is not the manifest's")
    try:
        tinc_key = serialization.load_pem_private_key(
            staged.path("tinc/rsa_key.priv").read_bytes(), password=None)
        host_pem = bootstrap.public_key_block(staged.text(f"tinc/hosts/{config.name}"))
        host_key = serialization.load_pem_public_key((host_pem or "").encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise refuse(f"the tinc key or the hub's host file is unreadable ({_short(exc)})") from None
    if not isinstance(tinc_key, rsa.RSAPrivateKey) or \
            public_der(tinc_key.public_key()) != public_der(host_key):
        raise refuse(f"rsa_key.priv is not the key of hosts/{config.name}")
    for member in staged.host_members():
        text = staged.text(member)
        if "\x00" in text or any(ord(c) < 32 and c not in "\t\r\n" for c in text):
            raise refuse(f"{member} holds control characters")
    return tinc_key.key_size


def prepare_registry(staged: Staged, config: HubConfig) -> Tuple[str, List[str]]:
    """The staged SQLite registry: intact, the net of hub.json, this code's schema (an older
    one upgraded here, a newer one refused), in WAL mode. Returns (revision, applied)."""
    from .registry import SCHEMA_REVISION, Registry, RegistryError, RegistrySchemaError

    path = staged.path(REGISTRY_MEMBER)
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True)
        try:
            check = conn.execute("PRAGMA quick_check").fetchall()
            conn.execute("PRAGMA journal_mode = WAL").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise refuse(f"the registry is not a SQLite database ({_short(exc)})") from None
    if check != [("ok",)]:
        raise refuse(f"the registry is damaged ({_short(str(check[:3]))})")
    registry = Registry(path, staged.root / "registry.lock")
    revision: Optional[str] = None
    try:
        revision = registry.schema_revision()
        if revision is None:
            raise refuse("the registry holds no tables")
        applied = registry.upgrade_schema()
        with registry.reading() as view:
            settings = view.settings()
    except RegistrySchemaError:
        raise ArchiveError(
            f"backup refused: its registry has schema revision {str(revision)[:40]!r}, newer than"
            f" this tinc-hub {__version__} knows ({SCHEMA_REVISION})",
            f"restore with tinc-hub {staged.manifest['tinc_hub_version']} (which made the"
            " backup) or newer") from None
    except RegistryError as exc:
        raise refuse(f"the registry cannot be read ({_short(exc.message)})") from None
    finally:
        registry.dispose()
    for key, mine in (("net", config.net), ("vpn_subnet", config.vpn_subnet)):
        if settings.get(key, mine) != mine:
            raise refuse(f"the registry's {key} {settings[key]!r} is not hub.json's {mine!r}")
    return revision, applied


def existing_state(state: StateDir, config: HubConfig, registry_path: Optional[Path]) -> List[Path]:
    """What of a hub is already on this machine (restore refuses to overwrite it)."""
    found = []
    registry_files = [registry_path, Path(f"{registry_path}-wal"), Path(f"{registry_path}-shm")] \
        if registry_path is not None else []  # an old WAL must never meet the restored file
    for path in [state.config_file, state.key_file, state.cert_file, *registry_files,
                 config.net_dir / "rsa_key.priv", config.net_dir / "tinc.conf"]:
        if path is not None and (path.exists() or path.is_symlink()):
            found.append(path)
    return found


def move_aside(paths: List[Path], stamp: str) -> List[str]:
    """--force: rename each path to PATH.replaced-STAMP (nothing is deleted); returns the new names."""
    moved = []
    for path in paths:
        if path.exists() or path.is_symlink():
            aside = path.with_name(f"{path.name}.replaced-{stamp}")
            os.rename(path, aside)
            moved.append(str(aside))
    return moved


def place_file(source: Path, target: Path, mode: int) -> None:
    """Put a staged file at ``target`` (atomic rename, or a copy across file systems) with ``mode``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(source, mode)
    try:
        os.replace(source, target)
    except OSError as exc:
        import errno

        if exc.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(prefix="." + target.name + ".", suffix=".tmp",
                                   dir=str(target.parent))
        with os.fdopen(fd, "wb") as out, open(source, "rb") as handle:
            shutil.copyfileobj(handle, out, COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    bootstrap.fsync_directory(str(target.parent))


def restore_backup(state: StateDir, source: str, force: bool, start: bool = True,
                   registry_url: Optional[str] = None, registry_password_file: Optional[str] = None,
                   stdin: Optional[IO[bytes]] = None) -> RestoreResult:
    """The whole ``tinc-hub restore``: read and check everything, then write, then init's steps."""
    from .hub_init import HubInit, InitRequest
    from .registry import Registry
    from .tls import pin_of_cert_file

    parent = state.root.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tinc-hub-restore-", dir=str(parent)))
    try:
        if source == "-":
            staged = read_archive(stdin if stdin is not None else sys.stdin.buffer, staging)
        else:
            try:
                handle = open(source, "rb")
            except FileNotFoundError:
                raise HubError(f"{source} not found", "give the file 'tinc-hub backup' wrote") from None
            with handle:
                staged = read_archive(handle, staging)
        config = check_restored_config(staged)
        key_bits = check_keys(staged, config)
        sqlite = staged.manifest["registry"]["kind"] == "sqlite"
        # hub.json (archive data) says where the registry is written, as root: a path outside
        # the state dir is written only where the admin names it too
        if sqlite and registry_url != config.registry:
            if config.registry is None:
                raise HubError("this backup holds its SQLite registry: --registry is not used by"
                               " restore", "leave --registry out")
            if not PRINTABLE_RE.fullmatch(config.registry):
                raise refuse("state/hub.json: registry is not a short printable string")
            raise HubError(f"the backup's hub.json puts the SQLite registry at"
                           f" {config.registry!r}, outside the state dir",
                           f"if that is right, run restore with --registry {shlex.quote(config.registry)}")
        if sqlite:
            registry_url = None  # init reads it from the restored hub.json
        applied: List[str] = []
        if sqlite:
            _revision, applied = prepare_registry(staged, config)
        # where hub.json's registry is (the state dir's file unless it names another)
        probe = StateDir(staging / "probe")
        registry_path = (Registry.for_state(probe, config.registry).db_path
                         if sqlite and config.registry else state.registry_file if sqlite else None)
        if not sqlite:
            password_file = registry_password_file or config.registry_password_file
            if password_file and not os.path.exists(password_file):
                raise HubError(f"the registry's password file {password_file} is missing",
                               "put it in place first (it is never in a backup), or pass"
                               " --registry-password-file")
        found = existing_state(state, config, registry_path)
        if found and not force:
            shown = ", ".join(map(str, found[:3])) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise HubError(f"a hub's state exists already: {shown}",
                           "restore onto a fresh machine, or --force (the old files are kept"
                           " as NAME.replaced-TIME)")
        from .service import UNIT_NAME

        api_was_active = start and config.init == "systemd" and \
            bootstrap.systemctl_state("is-active", UNIT_NAME) == "active"
        moved = move_aside(found, time.strftime("%Y%m%dT%H%M%S")) if found else []
        # -- from here on, writes: the state dir, then the tinc files
        state.root.mkdir(parents=True, exist_ok=True)
        os.chmod(state.root, 0o700)
        state.tls_dir.mkdir(exist_ok=True)
        os.chmod(state.tls_dir, 0o700)
        for member in ("state/tls/key.pem", "state/tls/cert.pem"):
            place_file(staged.path(member), state.root / member[len("state/"):], STATE_MEMBERS[member])
        if sqlite and registry_path is not None:
            place_file(staged.path(REGISTRY_MEMBER), registry_path, STATE_MEMBERS[REGISTRY_MEMBER])
        config.hosts_dir.mkdir(parents=True, exist_ok=True)
        for member in staged.host_members():
            bootstrap.write_atomic(str(config.hosts_dir / member[len("tinc/hosts/"):]),
                                   staged.text(member), HOST_FILE_MODE)
        place_file(staged.path("tinc/rsa_key.priv"), config.net_dir / "rsa_key.priv",
                   TINC_MEMBERS["tinc/rsa_key.priv"])
        place_file(staged.path("state/hub.json"), state.config_file, STATE_MEMBERS["state/hub.json"])
        # -- init's own steps on the restored hub.json: tinc, files, boot, tincd, the API
        request = InitRequest(net=config.net, name=config.name, address=config.address,
                              vpn_subnet=config.vpn_subnet, port=config.port,
                              api_port=config.api_port, key_size=key_bits, init=config.init,
                              tinc_dir=config.tinc_dir, start=start, registry=registry_url,
                              registry_password_file=registry_password_file)
        try:
            job = HubInit(state, request)
            bootstrap.run_steps(job.steps(), dry_run=False, say=log.debug)
        except Exception as exc:
            raise HubError(f"the hub's files are restored, but init's steps failed: "
                           f"{' '.join(str(exc).split())}",
                           "fix the cause, then run 'tinc-hub restore FILE --force' again"
                           " (or 'tinc-hub init' with hub.json's values)") from exc
        init_result = job.result()
        if api_was_active and init_result.api_service and UNIT_NAME not in init_result.changed:
            bootstrap.run(("systemctl", "restart", UNIT_NAME))  # it held the replaced registry
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pin = pin_of_cert_file(state.cert_file)
    return RestoreResult(config=init_result.config, manifest=staged.manifest, pin=pin,
                         schema_upgraded=applied, moved_aside=moved, tincd=init_result.tincd,
                         api_service=init_result.api_service,
                         registry=str(registry_path) if registry_path else
                         staged.manifest["registry"].get("url", "PostgreSQL"))
