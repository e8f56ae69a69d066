"""The hub's ``hosts/`` directory: node host files written atomically and only on change.

tinc 1.0 drops, on SIGHUP, every connection whose host file mtime changed, so a host file
is rewritten only when its bytes differ. Writes use a unique temporary file in the same
directory, fsync, rename, then fsync the directory, so concurrent writers and crashes never
leave a torn file. ``reconcile_host_files`` (``serve`` start) makes the directory match the
registry again after a crash between a commit and its host file; ``HostFilesFollower`` (the
follower of ``serve``) then follows only the rows that changed.
"""

import ipaddress
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from bootstrap import bootstrap
from .registry import NODE, Registry
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


def _real_path(path: Path, real_dirs: Dict[str, str]) -> str:
    """os.path.realpath(path), each directory resolved once per ``real_dirs`` (a batch writes
    many files into one hosts/): the same answer, as a file that is not a symlink adds only
    its name to its directory's real path; a symlink (or "." / "..") takes the full walk."""
    head, tail = os.path.split(os.fspath(path))
    if tail in ("", ".", "..") or os.path.islink(path):
        return os.path.realpath(path)
    real_dir = real_dirs.get(head)
    if real_dir is None:
        real_dir = real_dirs[head] = os.path.realpath(head)
    return os.path.join(real_dir, tail)


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
    real_dirs: Dict[str, str] = {}
    try:
        for path, content in files:
            data = content.encode("utf-8")
            real = _real_path(path, real_dirs)
            if real in planned:
                same = planned[real] == data
            else:
                kept = bootstrap.keep_if_same(real, data, mode)
                if kept is not None:  # the same bytes (its mode perhaps set)
                    changed.append(kept)
                    continue
                same = False
            changed.append(not same)
            if same:
                continue
            fd, tmp = bootstrap.stage_temp_file(real, data, mode)
            open_fds.append(fd)
            staged.append((fd, tmp, real))
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


HostFacts = Tuple[str, str, str, Optional[int], str]  # RegistryView.host_facts: name, address,
# public_key, revoked_at, kind


def follow_host_row(config: HubConfig, row: HostFacts, written: List[str], removed: List[str]) -> None:
    """Make the host file of one node row say what the row says (the one copy of the rules):
    a row with a problem is left out (logged), a revoked node's file removed, an active node's
    written when its bytes differ (a new key alone keeps the mtime: replace_key_keeping_mtime).
    Appends the name to ``written`` or ``removed`` when the file changed."""
    name, address, public_key, revoked_at, _ = row
    problem = host_row_problem(name, address, public_key, config.network)
    if problem:  # the registry may be shared by several hubs: never trusted blindly
        log.warning("node %r of the registry is left out of hosts/: %s", str(name)[:80], problem)
        return
    path = config.hosts_dir / name
    if revoked_at is not None:
        if remove_if_present(path):
            removed.append(name)
    elif replace_key_keeping_mtime(path, render_node_host_file(address, public_key))[0]:
        written.append(name)


def host_file_follows(config: HubConfig, row: HostFacts) -> bool:
    """True when the host file of ``row`` already is what :func:`follow_host_row` would make it
    (one file read, no write)."""
    name, address, public_key, revoked_at, _ = row
    if host_row_problem(name, address, public_key, config.network):
        return True
    path = config.hosts_dir / name
    if revoked_at is not None:
        return not os.path.lexists(path)
    return host_file_in_place(path, render_node_host_file(address, public_key))


def remove_tombstoned(config: HubConfig, name: str, removed: List[str]) -> None:
    """Remove the host file of a removed node whose name no row holds now."""
    if bootstrap.valid_node_name(name) and remove_if_present(config.hosts_dir / name):
        removed.append(name)


def reconcile_host_files(config: HubConfig, registry: Registry,
                         followed: "Optional[HostFilesFollower]" = None) -> Dict[str, list]:
    """Make hosts/ match the registry: rewrite missing or different host files of active nodes,
    remove those of revoked nodes, of removed nodes (tombstones: an ephemeral node offline too
    long, revoke --release) whose name no row holds now, and temporary files a crash left
    behind. Host files of names the registry does not know are left alone. Every row and every
    file is read under the write lock (``serve`` start, CLI commands). ``followed``: records
    what is now on disk (its later rounds compare with it). Returns
    {"written": [...], "removed": [...]}.
    """
    written: List[str] = []
    removed: List[str] = []
    with registry.exclusive():
        removed.extend(remove_stale_temp_files(config.hosts_dir))
        with registry.snapshot() as view:
            rows = view.host_facts()
            gone = view.tombstoned_names() - {row[0] for row in rows}
        for name in sorted(gone):
            remove_tombstoned(config, name, removed)
        for row in rows:
            if row[4] == NODE:
                follow_host_row(config, row, written, removed)
        if followed is not None:
            followed.record_all(rows, gone)
    return {"written": written, "removed": removed}


FOLLOW_ALL_UNDER_LOCK = 2048  # more rows changed than this: one read of every row under the lock
VERIFY_INTERVAL = 600.0  # s between rounds that also compare every file (outside the lock)


class HostFilesFollower:
    """The follower's view of hosts/: per node name, the row (:data:`HostFacts`) whose host file
    it last made or found on disk, and the removed names whose file it removed.

    The first round is :func:`reconcile_host_files` (every row, every file, under the lock).
    Each later round reads the rows in a snapshot WITHOUT the write lock and compares them with
    that map in memory (no file read); only the names that differ (new, new key or address,
    revoked, removed and not taken again) are re-read under the write lock and their files
    written or removed by the same rules. So a round costs one read of the rows plus the
    changed rows, however many nodes are unchanged, and an enrolment never waits for it.

    Rounds trust the map: a host file changed behind the hub's back, or a row that changed and
    changed back between two rounds after this hub's own writer (enrolment, reaper) rewrote the
    file, is repaired by the next verifying round (every ``verify_interval`` s: every file
    compared, outside the lock, the differing ones followed) or by ``serve`` start."""

    def __init__(self, config: HubConfig, registry: Registry, verify_interval: float = VERIFY_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.registry = config, registry
        self.verify_interval, self.clock = verify_interval, clock
        self.known: Dict[str, HostFacts] = {}  # node name -> the row its file follows
        self.absent: Set[str] = set()  # removed names whose file was removed (or never was)
        self.verified_at: Optional[float] = None  # None: no full reconcile yet
        self._noted: List[HostFacts] = []  # rows whose files another writer made (note_written)
        self._noted_lock = threading.Lock()

    def note_written(self, rows: List[HostFacts]) -> None:
        """This process's enrolments wrote the host files of ``rows`` (under the write lock,
        after their COMMIT): the next round takes them as followed instead of reading each row
        and file again. Thread-safe; merged at the start of the next round, before it reads
        the rows: a row changed since is still seen to differ (a stale note can only cost a
        re-read, never a missed change)."""
        with self._noted_lock:
            self._noted.extend(rows)

    def _merge_noted(self) -> None:
        with self._noted_lock:
            noted, self._noted = self._noted, []
        for row in noted:
            self.known[row[0]] = row
            self.absent.discard(row[0])

    def record_all(self, rows: List[HostFacts], gone: Set[str]) -> None:
        """After a full reconcile: every node row and every removed name as now on disk."""
        self.known = {row[0]: row for row in rows if row[4] == NODE}
        self.absent = set(gone)
        self.verified_at = self.clock()

    def follow(self) -> Dict[str, list]:
        """One round (see the class): {"written": [...], "removed": [...]}."""
        if self.verified_at is None:
            return reconcile_host_files(self.config, self.registry, self)
        self._merge_noted()
        verify = not 0 <= self.clock() - self.verified_at < self.verify_interval
        with self.registry.snapshot() as view:
            rows = view.host_facts()
            tombstoned = view.tombstoned_names()
        changed = self._changed(rows, tombstoned, verify)
        if verify:
            self.verified_at = self.clock()
        if not changed:
            return {"written": [], "removed": []}
        return self._follow_names(changed)

    def _changed(self, rows: List[HostFacts], tombstoned: Set[str], verify: bool) -> Set[str]:
        """The names whose row differs from the map (``verify``: or whose file differs from
        its row); forgets the names no node row holds now. (Comprehensions, no per-row call:
        this runs over every row at every generation.)"""
        known = self.known
        get = known.get
        changed = {row[0] for row in rows if row[4] == NODE and get(row[0]) != row}
        if verify:
            changed.update(row[0] for row in rows if row[4] == NODE and row[0] not in changed
                           and not host_file_follows(self.config, row))
        nodes = sum(1 for row in rows if row[4] == NODE)
        new = sum(1 for name in changed if name not in known)
        if len(known) != nodes - new:  # some names of the map are no node's now
            for name in known.keys() - {row[0] for row in rows if row[4] == NODE}:
                del known[name]
        if tombstoned or self.absent:
            taken = {row[0] for row in rows}
            gone = {name for name in tombstoned if name not in taken}
            self.absent &= gone
            if verify:
                self.absent = {name for name in self.absent
                               if not bootstrap.valid_node_name(name)
                               or not os.path.lexists(self.config.hosts_dir / name)}
            changed |= gone - self.absent
        return changed

    def _follow_names(self, names: Set[str]) -> Dict[str, list]:
        """Under the write lock: re-read the rows of ``names`` and follow them."""
        written: List[str] = []
        removed: List[str] = []
        with self.registry.exclusive():
            with self.registry.snapshot() as view:
                if len(names) > FOLLOW_ALL_UNDER_LOCK:
                    rows = {row[0]: row for row in view.host_facts() if row[0] in names}
                else:
                    rows = {name: row for name in names
                            for row in [view.host_facts_of(name)] if row is not None}
                tombstoned = view.tombstoned_names() if names - rows.keys() else set()
            for name in sorted(names):
                row = rows.get(name)
                if row is None:  # no row: removed (its file goes) or deleted (left alone)
                    self.known.pop(name, None)
                    if name in tombstoned:
                        remove_tombstoned(self.config, name, removed)
                        self.absent.add(name)
                elif row[4] != NODE:  # a hub's file is mirror_registry's
                    self.known.pop(name, None)
                    self.absent.discard(name)
                else:
                    follow_host_row(self.config, row, written, removed)
                    self.known[name] = row
                    self.absent.discard(name)
        return {"written": written, "removed": removed}
