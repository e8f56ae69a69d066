"""The hub's ``hosts/`` directory: node host files written atomically and only on change.

tinc 1.0 drops, on SIGHUP, every connection whose host file mtime changed, so a host file
is rewritten only when its bytes differ. Writes use a unique temporary file in the same
directory, fsync, rename, then fsync the directory, so concurrent writers and crashes never
leave a torn file. ``reconcile_host_files`` (``serve`` start) makes the directory match the
registry again after a crash between a commit and its host file.
"""

import ipaddress
import logging
import os
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bootstrap import bootstrap
from .registry import Registry
from .state import HubConfig

log = logging.getLogger("tinc_hub.hostfiles")


def render_node_host_file(address: str, public_pem: str) -> str:
    """The hub's copy of a node host file: its /32 Subnet and its RSA public key, nothing else."""
    return bootstrap.render_host_file([f"Subnet = {address}/32"], public_pem)


def write_if_changed(path: Path, content: str, mode: int = 0o644) -> bool:
    """Atomically replace ``path`` with ``content`` unless it already holds exactly that
    (then it is untouched, mtime kept). The shared ``bootstrap.write_atomic``."""
    return bootstrap.write_atomic(str(path), content, mode)


FSYNC_THREADS = 8  # fsyncs of one batch of host files run at once (the disk merges them)
_fsync_pool: Optional[ThreadPoolExecutor] = None
_fsync_pool_lock = threading.Lock()


def _fsync_all(fds: List[int]) -> None:
    """fsync every descriptor; several at once (measured on a busy disk: 40 files in 0.6 ms
    each against 7 ms each one after another). Raises the first error."""
    global _fsync_pool
    if len(fds) <= 1:
        for fd in fds:
            os.fsync(fd)
        return
    with _fsync_pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
    list(_fsync_pool.map(os.fsync, fds))


def write_host_files(files: Sequence[Tuple[Path, str]], mode: int = 0o644) -> List[bool]:
    """write_if_changed for many files at once, in order (a later entry for the same path
    wins), durable together: each changed file goes to a temporary file beside it, the
    temporary files are fsync'd (at once), renamed in order, then each directory is fsync'd
    once. A crash leaves each file old or new, never torn (and perhaps a temporary file,
    which remove_stale_temp_files deletes). Returns, per entry, whether it changed."""
    changed: List[bool] = []
    planned: Dict[str, bytes] = {}  # real path -> the bytes it will hold
    staged: List[Tuple[int, str, str]] = []  # (fd, temporary file, real path), in order
    open_fds: List[int] = []
    renamed = 0
    try:
        for path, content in files:
            data = content.encode("utf-8")
            real = os.path.realpath(path)
            if real in planned:
                same = planned[real] == data
            else:
                try:
                    with open(real, "rb") as existing:
                        same = existing.read() == data
                    if same and (os.stat(real).st_mode & 0o7777) != mode:
                        os.chmod(real, mode)
                        changed.append(True)
                        continue
                except FileNotFoundError:
                    same = False
            changed.append(not same)
            if same:
                continue
            directory = os.path.dirname(real)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(real) + ".", suffix=".tmp",
                                       dir=directory)
            open_fds.append(fd)
            staged.append((fd, tmp, real))
            with os.fdopen(os.dup(fd), "wb") as handle:  # all of it (a short write retried)
                handle.write(data)
            os.fchmod(fd, mode)
            planned[real] = data
        _fsync_all([fd for fd, _, _ in staged])
        while open_fds:
            os.close(open_fds.pop())
        for _, tmp, real in staged:
            os.rename(tmp, real)
            renamed += 1
    except BaseException:
        for fd in open_fds:
            os.close(fd)
        for _, tmp, _ in staged[renamed:]:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for directory in sorted({os.path.dirname(real) for real in planned}):
        bootstrap.fsync_directory(directory)
    return changed


def replace_key_keeping_mtime(path: Path, content: str) -> "tuple[bool, bool]":
    """write_if_changed for a node's host file whose public key alone changes (node
    rotate-key, on the hub that took the request and on the hubs that follow it): the file
    keeps its mtime, so tinc 1.0's SIGHUP keeps the connection made with the old key until the
    node restarts with the new one (tincd reads the file afresh for every new connection: the
    old key is refused from the write on). A new file, or any other change, gets a fresh mtime.
    The rule is bootstrap.only_key_differs, as for a hub's key on nodes. Returns (changed,
    mtime kept)."""
    try:
        before = os.stat(path, follow_symlinks=False)
        old = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        before, old = None, None
    changed = write_if_changed(path, content)
    kept = (changed and before is not None and stat.S_ISREG(before.st_mode)
            and bootstrap.only_key_differs(old, content))
    if kept:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns), follow_symlinks=False)
    return changed, kept


def host_file_in_place(path: Path, content: str, mode: int = 0o644) -> bool:
    """True when ``path`` (not a symlink) already holds exactly ``content`` with ``mode``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    expected = content.encode("utf-8")
    with os.fdopen(fd, "rb") as handle:
        if (os.fstat(handle.fileno()).st_mode & 0o7777) != mode:
            return False
        return handle.read(len(expected) + 1) == expected


def remove_stale_temp_files(directory: Path) -> List[str]:
    """Delete the temporary files a crash in :func:`write_if_changed` can leave
    (``.NAME.XXXX.tmp``); tinc never reads them, but they are half-written. Returns their names."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                (directory / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
    if removed:
        bootstrap.fsync_directory(str(directory))
    return removed


def remove_if_present(path: Path) -> bool:
    """Delete ``path``; True when something was removed."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    bootstrap.fsync_directory(str(path.parent))
    return True


def host_row_problem(name: str, address: str, public_key: str,
                     network: ipaddress.IPv4Network) -> Optional[str]:
    """Why a registry row (a node's or a hub's) must not become a host file (None: it may):
    its name must be a tinc name (no path), its address a host of the VPN, its key one RSA
    PEM block."""
    if not isinstance(name, str) or not bootstrap.valid_node_name(name):
        return "invalid name"
    try:
        inside = ipaddress.IPv4Address(address) in network and \
            str(ipaddress.IPv4Address(address)) == address
    except ValueError:
        inside = False
    if not inside:
        return "address outside the VPN"
    if not bootstrap.PUBLIC_KEY_PEM_RE.fullmatch(public_key.strip()):
        return "invalid public key"
    return None


def reconcile_host_files(config: HubConfig, registry: Registry) -> Dict[str, list]:
    """Make hosts/ match the registry: rewrite missing or different host files of active nodes,
    remove those of revoked nodes, of removed nodes (tombstones: an ephemeral node offline too
    long, revoke --release) whose name no row holds now, and temporary files a crash left
    behind. Host files of names the registry does not know are left alone. Returns
    {"written": [...], "removed": [...]}.
    """
    written, removed = [], []
    with registry.exclusive():
        removed.extend(remove_stale_temp_files(config.hosts_dir))
        with registry.snapshot() as view:
            nodes = view.list_nodes()
            taken = {row.name for row in view.list_rows()}
            gone = {stone.name for stone in view.list_tombstones()} - taken
        for name in sorted(gone):
            if bootstrap.valid_node_name(name) and remove_if_present(config.hosts_dir / name):
                removed.append(name)
        for node in nodes:
            problem = host_row_problem(node.name, node.address, node.public_key, config.network)
            if problem:  # the registry may be shared by several hubs: never trusted blindly
                log.warning("node %r of the registry is left out of hosts/: %s", node.name[:80], problem)
                continue
            path = config.hosts_dir / node.name
            if node.revoked:
                if remove_if_present(path):
                    removed.append(node.name)
            elif replace_key_keeping_mtime(path, render_node_host_file(node.address, node.public_key))[0]:
                written.append(node.name)
    return {"written": written, "removed": removed}
