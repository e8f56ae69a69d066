"""Node liveness from tincd's own events.

``tinc-hub init`` writes the hub's ``host-up`` and ``host-down`` scripts; tincd runs them
(synchronously, with ``NODE`` and ``REMOTEADDRESS`` in the environment) whenever a node
becomes reachable or unreachable. Each run atomically replaces one small file,
``STATE/liveness/NODE`` = ``up|down UNIX-SECONDS REMOTE-ADDRESS``: no SQLite, no lock, nothing
tincd could block on. ``tinc-hub nodes`` reads these files.

A fleet's 50,000 records take 0.3-0.5 s to open and read, so readers also leave a snapshot of
them, ``STATE/liveness.snapshot``, stamped with the records directory as it was before the read
that wrote it. Records are only ever replaced by rename (the scripts' temp file + mv), which
changes the directory's mtime and ctime: a snapshot whose stamp still matches holds exactly
what reading the records gives, and the next reader uses it alone. The scripts' write path is
unchanged; a snapshot is never stale by design (see read_liveness).
"""

import contextlib
import itertools
import os
import re
import shlex
import stat
import threading
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Set, Tuple

from bootstrap import bootstrap

LIVENESS_DIR_NAME = "liveness"
MAX_RECORD_BYTES = 4096  # a record is "up|down SECONDS ADDRESS": anything longer is not one
SCRIPT_MARKER = "# Written by tinc-hub init: node liveness for 'tinc-hub nodes'."
# STATE/liveness.snapshot = a header line "tinc-hub liveness snapshot 1 DEV INO MTIME_NS
# CTIME_NS COUNT" (the stamp: the records directory as stat'ed BEFORE the read that wrote it),
# then one line "NAME up|down SECONDS[ ADDRESS]" per record, in canonical form. Written only
# when the directory's last change lies SNAPSHOT_MARGIN_NS before the read began: a change in
# the same coarse kernel clock tick as the stamp would leave mtime and ctime equal.
SNAPSHOT_NAME = "liveness.snapshot"  # beside liveness/, so writing it changes nothing inside
SNAPSHOT_MAGIC = "tinc-hub liveness snapshot 1"
SNAPSHOT_MARGIN_NS = 2_000_000_000
MAX_SNAPSHOT_BYTES = 64 << 20  # 65,536 records of 64-character names and IPv6 addresses: ~9 MB
SNAPSHOT_TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 300  # a snapshot temp file untouched this long: its writer died
# a line of the snapshot: a node name (bootstrap.valid_node_name), the event, the seconds as
# str(int) writes them, and the address as parse_record takes it (a run of non-whitespace:
# re's \s is str.isspace), or none
SNAPSHOT_LINE_RE = re.compile(r"^([A-Za-z0-9_]{1,64}) (up|down) (0|[1-9][0-9]*)(?: (\S+))?\n", re.MULTILINE)
# the state dir needs only x permission (O_PATH), as a path through it did
OPEN_DIRECTORY_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY


class Seen(NamedTuple):
    up: bool  # the last event was host-up
    at: int  # unix seconds of that event
    remote: str  # REMOTEADDRESS tincd reported ("" if none)


def liveness_dir(state_root: Path) -> Path:
    return Path(state_root) / LIVENESS_DIR_NAME


def render_host_script(state_root: Path, event: str) -> str:
    """The hub's ``host-up`` (event "up") or ``host-down`` ("down") script."""
    if event not in ("up", "down"):
        raise ValueError(event)
    directory = shlex.quote(str(liveness_dir(state_root)))
    return "\n".join([
        "#!/bin/sh",
        SCRIPT_MARKER,
        "case \"$NODE\" in ''|*[!A-Za-z0-9_]*) exit 0 ;; esac",
        f"dir={directory}",
        "mkdir -p \"$dir\" || exit 0",
        f"printf '{event} %s %s\\n' \"$(date +%s)\" \"${{REMOTEADDRESS:-}}\" > \"$dir/.$NODE.$$\" &&"
        " mv -f \"$dir/.$NODE.$$\" \"$dir/$NODE\"",
        "exit 0",
    ]) + "\n"


def parse_record(text: str) -> Optional[Seen]:
    parts = text.split()
    if len(parts) < 2 or parts[0] not in ("up", "down") or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    return Seen(parts[0] == "up", int(parts[1]), parts[2] if len(parts) > 2 else "")


def read_liveness(state_root: Path) -> Dict[str, Seen]:
    """Node name -> its last recorded event. Skipped: names that are not node names, and
    records that are unreadable, torn, not regular files (symlinks are not followed), longer
    than MAX_RECORD_BYTES or not UTF-8.

    From the snapshot (STATE/liveness.snapshot) when nothing was renamed, created or removed
    in the records directory since the read that wrote it (its identity, mtime and ctime are
    unchanged); else every record is read (each opened relative to the directory) and, when
    this process owns the directory and the directory was last changed at least
    SNAPSHOT_MARGIN_NS before this read began, the snapshot is replaced for the next reader."""
    try:
        root = os.open(state_root, OPEN_DIRECTORY_PATH)
    except FileNotFoundError:
        return {}
    try:
        try:
            directory = os.open(LIVENESS_DIR_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
        except FileNotFoundError:
            return {}
        try:
            began_ns = time.time_ns()
            stamp = _directory_stamp(os.fstat(directory))
            seen = _read_snapshot(root, stamp)
            if seen is not None:
                return seen
            seen = read_records(directory)
            after = os.fstat(directory)
            if _snapshot_worth_writing(after, stamp, began_ns):
                _write_snapshot(root, stamp, seen, stat.S_IMODE(after.st_mode) & 0o666)
            return seen
        finally:
            os.close(directory)
    finally:
        os.close(root)


def refresh_snapshot(state_root: Path) -> bool:
    """Writes the snapshot when the records directory settled since the last one (serve calls
    it every few seconds, so ``tinc-hub nodes`` finds it ready). Costs a stat and the snapshot's
    first line when the directory is still changing, or nothing changed since; else a
    read_liveness. True when it read the records."""
    try:
        root = os.open(state_root, OPEN_DIRECTORY_PATH)
    except FileNotFoundError:
        return False
    try:
        try:
            st = os.stat(LIVENESS_DIR_NAME, dir_fd=root)
        except FileNotFoundError:
            return False
        stamp = _directory_stamp(st)
        if st.st_uid != os.geteuid() or max(stamp[2], stamp[3]) > time.time_ns() - SNAPSHOT_MARGIN_NS:
            return False
        header = _snapshot_header(stamp, "").encode()
        try:
            fd = os.open(SNAPSHOT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root)
            try:
                if os.read(fd, len(header)) == header:
                    return False
            finally:
                os.close(fd)
        except OSError:
            pass
    finally:
        os.close(root)
    read_liveness(state_root)
    return True


def read_records(directory: int) -> Dict[str, Seen]:
    """Every record in the open records directory ``directory``, read one by one (no
    snapshot); what is skipped: see read_liveness."""
    seen: Dict[str, Seen] = {}
    for name in os.listdir(directory):
        if name.startswith(".") or not bootstrap.valid_node_name(name):
            continue
        try:  # O_NONBLOCK: a FIFO planted here cannot hang the listing
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
        except OSError:
            continue
        try:
            data = os.read(fd, MAX_RECORD_BYTES + 1)
        except OSError:  # a directory, a FIFO without a writer
            continue
        finally:
            os.close(fd)
        try:
            record = parse_record(data.decode("utf-8")) if len(data) <= MAX_RECORD_BYTES else None
        except UnicodeDecodeError:
            continue
        if record is not None:
            seen[name] = record
    return seen


# -- the snapshot ----------------------------------------------------------------------------


def _snapshot_header(stamp: Tuple[int, int, int, int], count: str) -> str:
    """The snapshot's first line for ``stamp`` and ``count`` records (without its newline;
    ``count`` "" gives the prefix every header of that stamp starts with)."""
    return f"{SNAPSHOT_MAGIC} {stamp[0]} {stamp[1]} {stamp[2]} {stamp[3]} {count}"


def _directory_stamp(st: os.stat_result) -> Tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _snapshot_worth_writing(after: os.stat_result, stamp: Tuple[int, int, int, int],
                            began_ns: int) -> bool:
    """This process owns the directory, nothing changed in it during the read, and its last
    change lies SNAPSHOT_MARGIN_NS before the read began (none can share the stamp's tick)."""
    return (after.st_uid == os.geteuid() and _directory_stamp(after) == stamp
            and max(stamp[2], stamp[3]) <= began_ns - SNAPSHOT_MARGIN_NS)


def _read_snapshot(root: int, stamp: Tuple[int, int, int, int]) -> Optional[Dict[str, Seen]]:
    """The snapshot's records when its stamp is ``stamp``; None when it is missing, of
    another stamp, or anything but a well-formed regular file no larger than the cap."""
    try:
        fd = os.open(SNAPSHOT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SNAPSHOT_BYTES:
            return None
        chunks = []
        size = 0
        while size <= MAX_SNAPSHOT_BYTES:
            chunk = os.read(fd, MAX_SNAPSHOT_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    if size > MAX_SNAPSHOT_BYTES:
        return None
    try:
        return parse_snapshot(b"".join(chunks).decode("utf-8"), stamp)
    except UnicodeDecodeError:
        return None


def parse_snapshot(text: str, stamp: Tuple[int, int, int, int]) -> Optional[Dict[str, Seen]]:
    """The records of a snapshot's text whose header names ``stamp``; None for any other
    text (another stamp, torn, a line that is not what render_snapshot writes, a name twice)."""
    header, newline, body = text.partition("\n")
    count = header.rpartition(" ")[2]
    if header != _snapshot_header(stamp, count) or not newline:
        return None
    if body and not body.endswith("\n"):
        return None
    # each match is a whole line (^ only after a newline, "\n" at its end): as many matches
    # as lines means that every line is one
    fields = SNAPSHOT_LINE_RE.findall(body)
    if len(fields) != body.count("\n") or str(len(fields)) != count:
        return None
    if not fields:
        return {}
    # Seen(event == "up", int(at), remote) per line, column by column in C (a third of the time)
    names, events, ats, remotes = zip(*fields)
    seen = dict(zip(names, map(tuple.__new__, itertools.repeat(Seen),
                                 zip(map("up".__eq__, events), map(int, ats), remotes))))
    return seen if len(seen) == len(fields) else None  # a name twice: not what we write


def render_snapshot_line(name: str, record: Seen) -> str:
    event = "up" if record.up else "down"
    return f"{name} {event} {record.at} {record.remote}" if record.remote else f"{name} {event} {record.at}"


def render_snapshot(stamp: Tuple[int, int, int, int], seen: Dict[str, Seen]) -> str:
    lines = [_snapshot_header(stamp, str(len(seen)))]
    lines.extend(render_snapshot_line(name, record) for name, record in seen.items())
    return "\n".join(lines) + "\n"


def _write_snapshot(root: int, stamp: Tuple[int, int, int, int], seen: Dict[str, Seen],
                    mode: int) -> None:
    """Replaces the snapshot atomically (temp file + rename) with ``mode``, the mode of the
    records (the directory's, without x bits); a failure (read-only state dir, full disk)
    leaves the previous snapshot, whose stamp no longer matches."""
    data = render_snapshot(stamp, seen).encode("utf-8")
    if len(data) > MAX_SNAPSHOT_BYTES:
        return
    # one temp file per process and thread (serve's reaper and key rotation both read)
    temp = f".{SNAPSHOT_NAME}.{os.getpid()}.{threading.get_ident()}{SNAPSHOT_TEMP_SUFFIX}"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=root)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=root)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(temp, SNAPSHOT_NAME, src_dir_fd=root, dst_dir_fd=root)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=root)
        return
    _remove_stale_temps(root, temp)


def _remove_stale_temps(root: int, ours: str) -> None:
    """Removes the temp files of snapshots whose writer died mid-write (another process or
    thread's, older than STALE_TEMP_SECONDS: one being written now is left alone)."""
    prefix, cutoff = f".{SNAPSHOT_NAME}.", time.time() - STALE_TEMP_SECONDS
    try:  # root may be an O_PATH descriptor: list through one opened for reading
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
    except OSError:
        return
    try:
        names = os.listdir(listing)
    except OSError:
        return
    finally:
        os.close(listing)
    for name in names:
        if name == ours or not (name.startswith(prefix) and name.endswith(SNAPSHOT_TEMP_SUFFIX)):
            continue
        with contextlib.suppress(OSError):
            if os.stat(name, dir_fd=root, follow_symlinks=False).st_mtime < cutoff:
                os.unlink(name, dir_fd=root)


def tincd_running(net: str) -> bool:
    """True when the pidfile of the hub's tincd names a live tincd."""
    return bootstrap.pid_from_file(net) is not None


def tincd_started(net: str) -> Optional[float]:
    """When the hub's running tincd started (its pidfile's mtime); None when none runs."""
    if bootstrap.pid_from_file(net) is None:
        return None
    for path in bootstrap.pid_file_paths(net):
        try:
            return Path(path).stat().st_mtime
        except OSError:
            continue
    return None


def up_since(record: Seen, since: int) -> bool:
    """The running tincd, started at unix second ``since``, reports this node reachable: its
    last record is host-up, written since the start (an older one is another tincd's)."""
    return record.up and record.at >= since


def online_names(seen: Dict[str, Seen], started: Optional[float]) -> Set[str]:
    """Nodes the running tincd (started at ``started``) reports reachable (:func:`up_since`)."""
    if started is None:
        return set()
    since = int(started)
    return {name for name, record in seen.items() if up_since(record, since)}


def seen_status(record: Seen, hub_running: bool, now: int) -> Tuple[bool, int]:
    """(online, last seen in unix seconds) of a node with a record. Online: its last event was
    host-up and the hub's tincd still runs. Last seen: now when online, else the time of its
    last event."""
    online = record.up and hub_running
    return online, (now if online else record.at)


def node_status(record: Optional[Seen], hub_running: bool, now: int) -> Dict[str, object]:
    """``online`` and ``last_seen`` (unix seconds or None) of one node (:func:`seen_status`; a
    node never seen is offline and has None)."""
    if record is None:
        return {"online": False, "last_seen": None}
    online, last_seen = seen_status(record, hub_running, now)
    return {"online": online, "last_seen": last_seen}
