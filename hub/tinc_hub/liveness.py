"""Node liveness from tincd's own events.

``tinc-hub init`` writes the hub's ``host-up`` and ``host-down`` scripts; tincd runs them
(synchronously, with ``NODE`` and ``REMOTEADDRESS`` in the environment) whenever a node
becomes reachable or unreachable. Each run atomically replaces one small file,
``STATE/liveness/NODE`` = ``up|down UNIX-SECONDS REMOTE-ADDRESS``: no SQLite, no lock, nothing
tincd could block on. ``tinc-hub nodes`` reads these files.
"""

import os
import shlex
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Set

from bootstrap import bootstrap

LIVENESS_DIR_NAME = "liveness"
MAX_RECORD_BYTES = 4096  # a record is "up|down SECONDS ADDRESS": anything longer is not one
SCRIPT_MARKER = "# Written by tinc-hub init: node liveness for 'tinc-hub nodes'."


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
    than MAX_RECORD_BYTES or not UTF-8. Each file is opened relative to the directory: a
    fleet's 50,000 records take a fraction of a second (``tinc-hub nodes`` reads them all)."""
    seen: Dict[str, Seen] = {}
    try:
        directory = os.open(liveness_dir(state_root), os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return seen
    try:
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
    finally:
        os.close(directory)
    return seen


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


def online_names(seen: Dict[str, Seen], started: Optional[float]) -> Set[str]:
    """Nodes the running tincd (started at ``started``) reports reachable: their last record
    is host-up, written since it started (an older one is another tincd's)."""
    if started is None:
        return set()
    return {name for name, record in seen.items() if record.up and record.at >= int(started)}


def node_status(record: Optional[Seen], hub_running: bool, now: int) -> Dict[str, object]:
    """``online`` and ``last_seen`` (unix seconds or None) of one node.

    Online: its last event was host-up and the hub's tincd still runs. Last seen: now when
    online, else the time of its last event (a node never seen has None)."""
    if record is None:
        return {"online": False, "last_seen": None}
    online = record.up and hub_running
    return {"online": online, "last_seen": now if online else record.at}
