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

The scripts also append the event to ``STATE/liveness.journal`` after replacing the record.
While that journal speaks for the records (it is newer than their directory's last change),
the snapshot is "the records as of the journal's first OFFSET bytes" and a reader adds the
journal's lines since: no system call per record even right after a change (see "the
journal" below). Without a journal (an earlier init's scripts), the directory stamp above.
"""

import contextlib
import itertools
import json
import os
import re
import shlex
import stat
import threading
import time
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Set, Tuple

from bootstrap import bootstrap

LIVENESS_DIR_NAME = "liveness"
MAX_RECORD_BYTES = 4096  # a record is "up|down SECONDS ADDRESS": anything longer is not one
SCRIPT_MARKER = "# Written by tinc-hub init: node liveness for 'tinc-hub nodes'."
# STATE/liveness.snapshot = a header line "tinc-hub liveness snapshot 3 DEV INO MTIME_NS
# CTIME_NS COUNT" (the stamp: the records directory as stat'ed BEFORE the read that wrote it),
# then one line of JSON, the records as four columns [[NAME...], [UP...], [SECONDS...],
# [ADDRESS...]] (UP true/false, ADDRESS "" for none), exactly as render_snapshot writes it:
# json.loads parses it in C, and the columns are checked a column at a time (see
# parse_snapshot_body). Snapshots of the earlier line-per-record formats (1, 2) are simply not
# used: the next reader reads the records and writes this one. Written only
# when the directory's last change lies SNAPSHOT_MARGIN_NS before the read began: a change in
# the same coarse kernel clock tick as the stamp would leave mtime and ctime equal.
SNAPSHOT_NAME = "liveness.snapshot"  # beside liveness/, so writing it changes nothing inside
SNAPSHOT_MAGIC = "tinc-hub liveness snapshot 3"
SNAPSHOT_MARGIN_NS = 2_000_000_000
MAX_SNAPSHOT_BYTES = 64 << 20  # 65,536 records of 64-character names and IPv6 addresses: ~9 MB
SNAPSHOT_TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 300  # a snapshot temp file untouched this long: its writer died
# the snapshot's columns, each joined by newlines: node names (bootstrap.valid_node_name), and
# addresses as parse_record takes them (a run of non-whitespace: re's \s is str.isspace) or ""
SNAPSHOT_NAMES_RE = re.compile(r"[A-Za-z0-9_]{1,64}(?:\n[A-Za-z0-9_]{1,64})*")
SNAPSHOT_ADDRESS_SPACE_RE = re.compile(r"[^\S\n]")
SNAPSHOT_JSON_SEPARATORS = (",", ":")
# STATE/liveness.journal: one line "NAME up|down SECONDS ADDRESS" per event, appended by the
# scripts after they replaced the record (O_APPEND, one write each). With it, the snapshot is
# "tinc-hub liveness snapshot 4 DIR_DEV DIR_INO JOURNAL_DEV JOURNAL_INO OFFSET COUNT" (the same
# columns follow): the records
# as of the journal's first OFFSET bytes; a reader adds the journal's complete lines from OFFSET
# on. serve sets a journal larger than JOURNAL_COMPACT_BYTES aside as liveness.journal.old
# (rename; the scripts create a new one), and readers of a snapshot of that inode finish it first.
JOURNAL_NAME = "liveness.journal"
JOURNAL_ASIDE_NAME = "liveness.journal.old"
JOURNAL_SNAPSHOT_MAGIC = "tinc-hub liveness snapshot 4"
JOURNAL_COMPACT_BYTES = 2 << 20  # ~45,000 events
# a record changed by something that does not journal (an admin's rm, an earlier init's scripts)
# and then hidden by a journaled change: serve reads every record (and sets the journal aside)
# at its first refresh and at least this often, so such a change is seen within this bound
JOURNAL_FULL_READ_SECONDS = 600.0
_last_full_read: Dict[Tuple[int, int], float] = {}  # records directory (dev, ino) -> monotonic
MAX_JOURNAL_DELTA_BYTES = 8 << 20  # more unread journal than this: read the records instead
# a journal line exactly as the scripts write it (a name over 64 characters gets none)
JOURNAL_LINE_RE = re.compile(rb"^([A-Za-z0-9_]{1,64}) (up|down) (0|[1-9][0-9]{0,18}) ([0-9A-Za-z.:%_-]{0,64})$",
                             re.MULTILINE)
JOURNAL_HEADER_RE = re.compile(re.escape(JOURNAL_SNAPSHOT_MAGIC) + r"( (?:0|[1-9][0-9]{0,19})){6}")
JournalKey = Tuple[int, int]  # (st_dev, st_ino)
# the state dir needs only x permission (O_PATH), as a path through it did
OPEN_DIRECTORY_PATH = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY


class Seen(NamedTuple):
    up: bool  # the last event was host-up
    at: int  # unix seconds of that event
    remote: str  # REMOTEADDRESS tincd reported ("" if none)


def liveness_dir(state_root: Path) -> Path:
    return Path(state_root) / LIVENESS_DIR_NAME


def render_host_script(state_root: Path, event: str, journal: bool = True) -> str:
    """The hub's ``host-up`` (event "up") or ``host-down`` ("down") script. ``journal``: also
    append the event to STATE/liveness.journal (journal=False: the scripts of earlier
    versions, records only; still accepted, see ephemeral.scripts_are_ours)."""
    if event not in ("up", "down"):
        raise ValueError(event)
    directory = shlex.quote(str(liveness_dir(state_root)))
    if not journal:
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
    journal_path = shlex.quote(str(Path(state_root) / JOURNAL_NAME))
    # the record first, then the journal line: a reader that sees the line finds the record
    # at least as new. One printf of < PIPE_BUF bytes to an O_APPEND file is one write(2):
    # appenders never interleave. Names over 64 characters (no reader takes them) and
    # addresses that are not plain IP text get no line / no address.
    return "\n".join([
        "#!/bin/sh",
        SCRIPT_MARKER,
        "case \"$NODE\" in ''|*[!A-Za-z0-9_]*) exit 0 ;; esac",
        "addr=${REMOTEADDRESS:-}",
        "case \"$addr\" in *[!0-9A-Za-z.:%_-]*) addr= ;; esac",
        "[ ${#addr} -le 64 ] || addr=",
        f"dir={directory}",
        "mkdir -p \"$dir\" || exit 0",
        "now=$(date +%s)",
        f"printf '{event} %s %s\\n' \"$now\" \"$addr\" > \"$dir/.$NODE.$$\" &&"
        " mv -f \"$dir/.$NODE.$$\" \"$dir/$NODE\" || exit 0",
        f"[ ${{#NODE}} -le 64 ] && printf '%s {event} %s %s\\n' \"$NODE\" \"$now\" \"$addr\" >> {journal_path}",
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
            journal_read = _read_with_journal(root, directory, rewrite=False)
            if journal_read is not None:
                return journal_read[0]
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


def refresh_snapshot(state_root: Path, compact_bytes: int = JOURNAL_COMPACT_BYTES,
                     full_read_seconds: float = JOURNAL_FULL_READ_SECONDS) -> bool:
    """Writes the snapshot when the records directory settled since the last one (serve calls
    it every few seconds, so ``tinc-hub nodes`` finds it ready). Costs a stat and the snapshot's
    first line when the directory is still changing, or nothing changed since; else a
    read_liveness. True when it read the records.

    With a journal: adds its new lines to the snapshot (no record read), or sets it aside
    when larger than JOURNAL_COMPACT_BYTES and reads every record once (which also repairs
    a line a full disk kept out of it)."""
    journal_done = refresh_journal_snapshot(state_root, compact_bytes, full_read_seconds)
    if journal_done is not None:
        return journal_done
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
        if _snapshot_starts_with(root, _snapshot_header(stamp, "")):
            return False
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


def _snapshot_header(stamp: Tuple[int, ...], count: str, magic: str = SNAPSHOT_MAGIC) -> str:
    """The snapshot's first line for ``stamp`` and ``count`` records (without its newline;
    ``count`` "" gives the prefix every header of that stamp starts with)."""
    return " ".join([magic, *map(str, stamp), count])


def _snapshot_starts_with(root: int, header: str) -> bool:
    """Does the snapshot file (not followed if a symlink, never waited on) begin with
    ``header``? False when it is missing or unreadable."""
    expected = header.encode()
    try:
        fd = os.open(SNAPSHOT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root)
    except OSError:
        return False
    try:
        return os.read(fd, len(expected)) == expected
    except OSError:
        return False
    finally:
        os.close(fd)


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
    text = _read_snapshot_text(root)
    return None if text is None else parse_snapshot(text, stamp)


def _read_snapshot_text(root: int) -> Optional[str]:
    """The snapshot file's text; None when it is missing, not a regular file, larger than
    MAX_SNAPSHOT_BYTES or not UTF-8."""
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
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        return None


def parse_snapshot(text: str, stamp: Tuple[int, int, int, int]) -> Optional[Dict[str, Seen]]:
    """The records of a snapshot's text whose header names ``stamp``; None for any other
    text (another stamp, torn, a line that is not what render_snapshot writes, a name twice)."""
    header, newline, body = text.partition("\n")
    count = header.rpartition(" ")[2]
    if header != _snapshot_header(stamp, count) or not newline:
        return None
    return parse_snapshot_body(body, count)


def parse_snapshot_body(body: str, count: str) -> Optional[Dict[str, Seen]]:
    """The records of a snapshot's text after its header, which said ``count``; None unless it
    is exactly what render_snapshot writes for records read_records could give (node names,
    each once; up a bool; seconds an int >= 0; an address of non-whitespace or "")."""
    try:
        columns = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, an int of too many digits, nested too deep
        return None
    if type(columns) is not list or len(columns) != 4 or any(type(column) is not list for column in columns):
        return None
    names, ups, ats, remotes = columns
    if str(len(names)) != count or not len(names) == len(ups) == len(ats) == len(remotes):
        return None
    if names:
        try:
            joined_names, joined_remotes = "\n".join(names), "\n".join(remotes)  # TypeError: not all str
            joined_remotes.encode("utf-8")  # no lone surrogate (read_records decodes UTF-8)
        except (TypeError, UnicodeEncodeError):
            return None
        # one line per name (none holds a newline), each a node name; as many lines of
        # addresses, none with other whitespace; types exact (not 1 for true, 1.0 for 1)
        lines = len(names) - 1
        if (joined_names.count("\n") != lines or not SNAPSHOT_NAMES_RE.fullmatch(joined_names)
                or joined_remotes.count("\n") != lines or SNAPSHOT_ADDRESS_SPACE_RE.search(joined_remotes)
                or not set(map(type, ups)) <= {bool} or not set(map(type, ats)) <= {int} or min(ats) < 0):
            return None
    if not _is_rendered(body, names, ups, ats, remotes):  # the JSON as written: no other spacing or escapes
        return None
    # Seen(up, at, remote) per record, column by column in C
    seen = dict(zip(names, map(tuple.__new__, itertools.repeat(Seen), zip(ups, ats, remotes))))
    return seen if len(seen) == len(names) else None  # a name twice: not what we write


def _is_rendered(body: str, names: list, ups: list, ats: list, remotes: list) -> bool:
    """Is ``body``, the JSON text of these columns (checked: strs, bools, ints >= 0), exactly
    what _render_columns writes for them? JSON text with no whitespace but a final newline,
    no escape (backslash), minus (-0), DEL or non-ASCII character spells them one way only,
    render's (its separators have no spaces; it escapes only '"', backslash, the controls, DEL
    and non-ASCII); any other text is compared with the rendering (a fifth of the parse)."""
    if body.endswith("\n") and body.count("\n") == 1 and body.isascii() and not any(
            character in body for character in " \t\r\\-\x7f"):
        return True
    return _render_columns(names, ups, ats, remotes) == body


def _render_columns(names: Sequence[str], ups: Sequence[bool], ats: Sequence[int], remotes: Sequence[str]) -> str:
    return json.dumps([names, ups, ats, remotes], separators=SNAPSHOT_JSON_SEPARATORS) + "\n"


def render_snapshot(stamp: Tuple[int, ...], seen: Dict[str, Seen], magic: str = SNAPSHOT_MAGIC) -> str:
    ups, ats, remotes = zip(*seen.values()) if seen else ((), (), ())
    return _snapshot_header(stamp, str(len(seen)), magic) + "\n" + _render_columns(list(seen), ups, ats, remotes)


def _write_snapshot(root: int, stamp: Tuple[int, ...], seen: Dict[str, Seen],
                    mode: int, magic: str = SNAPSHOT_MAGIC) -> None:
    """Replaces the snapshot atomically (temp file + rename) with ``mode``, the mode of the
    records (the directory's, without x bits); a failure (read-only state dir, full disk)
    leaves the previous snapshot, whose stamp no longer matches."""
    data = render_snapshot(stamp, seen, magic).encode("utf-8")
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


# -- the journal -----------------------------------------------------------------------------


def parse_journal(data: bytes) -> Optional[Dict[str, Seen]]:
    """The last event of each node in ``data``, complete journal lines (empty, or ending in
    a newline), in order; None when any line is not one the scripts write (a write a full
    disk cut short, a hand edit): the caller reads the records instead."""
    if data and not data.endswith(b"\n"):
        return None
    fields = JOURNAL_LINE_RE.findall(data)
    if len(fields) != data.count(b"\n"):
        return None
    return {name.decode(): Seen(event == b"up", int(at), remote.decode()) for name, event, at, remote in fields}


def parse_journal_snapshot(text: str, directory: JournalKey
                           ) -> Optional[Tuple[JournalKey, int, Dict[str, Seen]]]:
    """(journal key, offset, records) of a journal snapshot's text for the records directory
    ``directory`` (dev, ino); None for any other text."""
    header, newline, body = text.partition("\n")
    if not newline or not JOURNAL_HEADER_RE.fullmatch(header):
        return None
    dir_dev, dir_ino, dev, ino, offset, count = map(int, header[len(JOURNAL_SNAPSHOT_MAGIC):].split())
    if (dir_dev, dir_ino) != directory:
        return None
    seen = parse_snapshot_body(body, str(count))
    return None if seen is None else ((dev, ino), offset, seen)


def _open_journal(root: int, name: str, owner: int) -> Optional[Tuple[int, os.stat_result]]:
    """(descriptor, stat) of journal ``name`` in the state dir when it is a regular file of
    ``owner`` (the records directory's: the scripts write both); None otherwise. Symlinks are
    not followed; a FIFO cannot hang the open."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
        os.close(fd)
        return None
    return fd, st


def _complete_lines(fd: int, offset: int, budget: int) -> Optional[Tuple[bytes, int]]:
    """(the complete lines from ``offset`` to the journal's end as of now, the offset after
    them); an unterminated last line is left for the next read. None when the journal is
    shorter than ``offset`` (not the one the snapshot saw) or more than ``budget`` bytes
    are unread."""
    size = os.fstat(fd).st_size
    if offset > size or size - offset > budget:
        return None
    chunks, position = [], offset
    while position < size:
        chunk = os.pread(fd, size - position, position)
        if not chunk:
            break
        chunks.append(chunk)
        position += len(chunk)
    data = b"".join(chunks)
    cut = data.rfind(b"\n") + 1
    return data[:cut], offset + cut


def _replay(root: int, fd: int, key: JournalKey, owner: int, base_key: JournalKey, offset: int,
            seen: Dict[str, Seen]) -> Optional[int]:
    """Adds to ``seen`` (a snapshot's records as of ``offset`` in journal ``base_key``) the
    journal's lines since; returns the offset reached in the journal ``fd`` (``key``). When
    the snapshot's journal was set aside since, its rest is read first (whatever a script
    appended to it before the rename). None: records needed (the snapshot's journal is
    gone, too much unread, a bad line)."""
    budget = MAX_JOURNAL_DELTA_BYTES
    if base_key != key:
        aside = _open_journal(root, JOURNAL_ASIDE_NAME, owner)
        if aside is None:
            return None
        aside_fd, aside_st = aside
        try:
            if (aside_st.st_dev, aside_st.st_ino) != base_key:
                return None
            part = _complete_lines(aside_fd, offset, budget)
        finally:
            os.close(aside_fd)
        events = None if part is None else parse_journal(part[0])
        if events is None:
            return None
        seen.update(events)
        budget, offset = budget - len(part[0]), 0
    part = _complete_lines(fd, offset, budget)
    events = None if part is None else parse_journal(part[0])
    if events is None:
        return None
    seen.update(events)
    return part[1]


def _journal_speaks_for(journal_st: os.stat_result, dir_st: os.stat_result) -> bool:
    """Is the journal at least as new as the records directory's last change? The scripts
    append after they replace the record: a record change later than the journal's last
    write was made by something that does not journal."""
    return journal_st.st_mtime_ns >= max(dir_st.st_mtime_ns, dir_st.st_ctime_ns)


def _write_journal_snapshot(root: int, dir_st: os.stat_result, key: JournalKey, offset: int,
                            seen: Dict[str, Seen]) -> None:
    """_write_snapshot of ``seen`` as the records as of ``offset`` in journal ``key``, with
    the records' mode."""
    _write_snapshot(root, (dir_st.st_dev, dir_st.st_ino, *key, offset), seen,
                    stat.S_IMODE(dir_st.st_mode) & 0o666, JOURNAL_SNAPSHOT_MAGIC)


def _read_with_journal(root: int, directory: int, rewrite: bool) -> Optional[Tuple[Dict[str, Seen], bool]]:
    """read_liveness with the journal: (the snapshot plus the journal's lines since, False),
    or (every record, True) when no snapshot serves (then a snapshot is written for the next
    reader when this process owns the records). None: no journal that speaks for the records (missing, not
    the records' owner's, or older than the records' last change: scripts that do not write
    it ran since). ``rewrite``: also write the snapshot after adding new lines (serve)."""
    dir_st = os.fstat(directory)
    opened = _open_journal(root, JOURNAL_NAME, dir_st.st_uid)
    if opened is None:
        return None
    fd, journal_st = opened
    try:
        if not _journal_speaks_for(journal_st, dir_st):
            return None
        dir_key, key = (dir_st.st_dev, dir_st.st_ino), (journal_st.st_dev, journal_st.st_ino)
        text = _read_snapshot_text(root)
        base = None if text is None else parse_journal_snapshot(text, dir_key)
        if base is not None:
            base_key, base_offset, seen = base
            offset = _replay(root, fd, key, dir_st.st_uid, base_key, base_offset, seen)
            if offset is not None:
                if rewrite and (key, offset) != (base_key, base_offset) and dir_st.st_uid == os.geteuid():
                    _write_journal_snapshot(root, dir_st, key, offset, seen)
                return seen, False
        # every record, read after the journal's size was taken: each event whose line lies
        # before that offset had its record replaced before, so the snapshot holds it
        offset = os.fstat(fd).st_size
        seen = read_records(directory)
        if dir_st.st_uid == os.geteuid():
            _write_journal_snapshot(root, dir_st, key, offset, seen)
        return seen, True
    finally:
        os.close(fd)


def refresh_journal_snapshot(state_root: Path, compact_bytes: int = JOURNAL_COMPACT_BYTES,
                             full_read_seconds: float = JOURNAL_FULL_READ_SECONDS) -> Optional[bool]:
    """refresh_snapshot with a journal this process owns (else None: the caller goes on
    without): sets it aside when larger than ``compact_bytes``, at this process's first
    refresh and ``full_read_seconds`` after its last (the scripts create the next journal;
    serve's is the only renamer) and reads every record once, else adds its new lines to the
    snapshot. True when it read the records."""
    try:
        root = os.open(state_root, OPEN_DIRECTORY_PATH)
    except FileNotFoundError:
        return None
    try:
        try:
            directory = os.open(LIVENESS_DIR_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)
        except FileNotFoundError:
            return None
        try:
            dir_st = os.fstat(directory)
            if dir_st.st_uid != os.geteuid():
                return None
            opened = _open_journal(root, JOURNAL_NAME, dir_st.st_uid)
            if opened is None:
                return None
            fd, journal_st = opened
            os.close(fd)
            if not _journal_speaks_for(journal_st, dir_st):
                return None
            dir_key = (dir_st.st_dev, dir_st.st_ino)
            last = _last_full_read.get(dir_key)
            if journal_st.st_size > compact_bytes or last is None or time.monotonic() - last >= full_read_seconds:
                _last_full_read[dir_key] = time.monotonic()
                return _set_journal_aside(root, directory, dir_st, stat.S_IMODE(journal_st.st_mode))
            if _snapshot_starts_with(root, _snapshot_header(
                    (dir_st.st_dev, dir_st.st_ino, journal_st.st_dev, journal_st.st_ino, journal_st.st_size),
                    "", JOURNAL_SNAPSHOT_MAGIC)):
                return False  # nothing appended since
            journal_read = _read_with_journal(root, directory, rewrite=True)
            return None if journal_read is None else journal_read[1]
        finally:
            os.close(directory)
    finally:
        os.close(root)


def _set_journal_aside(root: int, directory: int, dir_st: os.stat_result, mode: int) -> bool:
    """Renames the journal to JOURNAL_ASIDE_NAME, creates the next one (a script may have
    done so already: then its lines are kept) and snapshots every record as of the new
    journal's size, read after that size was taken. A script that opened the old path before
    the rename appends to the old inode: its record was replaced before, so the records read
    here hold it; readers of an older snapshot finish the old inode before the new one."""
    try:
        os.rename(JOURNAL_NAME, JOURNAL_ASIDE_NAME, src_dir_fd=root, dst_dir_fd=root)
        fd = os.open(JOURNAL_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=root)
    except OSError:
        return False
    try:
        journal_st = os.fstat(fd)
        if not stat.S_ISREG(journal_st.st_mode):
            return False
        with contextlib.suppress(OSError):  # a script's journal of another owner keeps its mode
            os.fchmod(fd, mode)  # the old one's (serve's UMask=0077 would narrow it)
        offset = journal_st.st_size
    finally:
        os.close(fd)
    seen = read_records(directory)
    _write_journal_snapshot(root, dir_st, (journal_st.st_dev, journal_st.st_ino), offset, seen)
    return True


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
