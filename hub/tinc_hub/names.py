"""NAME.NET for every hub and node: the ``names`` of the enrolment and sync answers, and the
hub's own block of /etc/hosts.

``names`` is ``{tinc name: VPN address}`` of every usable hub and every node that is not
revoked, rows checked like host files (hostfiles.host_row_problem). It is computed once per
registry generation (``NamesCache``): a sync costs one generation read, not a scan of every
node. Its ``names_tag`` (sha256 of the canonical JSON) lets a node that already has these names
get an answer without them. Each machine writes them as a managed block of /etc/hosts with the
one writer of bootstrap.py (``bootstrap.apply_names``: lower case, ``_`` as ``-``, under
NAME.NET).
"""

import ipaddress
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from bootstrap import bootstrap
from .hostfiles import host_row_problem
from .registry import HubRow, NodeRow, RegistryView
from .roster import usable_hubs
from .state import HubConfig

log = logging.getLogger("tinc_hub.names")

MAX_NAMES_BYTES = 512 * 1024  # names beyond this are not sent (a node reads at most 1 MiB)


class Names(NamedTuple):
    """The names of one registry generation; ``names`` None when too many to send."""
    names: Optional[Dict[str, str]]
    tag: Optional[str]


def vpn_names(config: HubConfig, hubs: Sequence[HubRow], nodes: Sequence[NodeRow]) -> Dict[str, str]:
    """tinc name -> VPN address of every usable hub (this one too, even before it recorded
    itself) and every node not revoked whose row is sound."""
    network = config.network  # a property: built once, not once per node
    names = {hub.name: hub.address for hub in usable_hubs(hubs, network)}
    names.setdefault(config.name, config.hub_address)
    for node in nodes:
        if node.revoked or node.name in names:
            continue
        if host_row_problem(node.name, node.address, node.public_key, network) is None:
            names[node.name] = node.address
    return names


def sendable(names: Dict[str, str]) -> Names:
    """names with their tag, or Names(None, None) (logged) when they are too many to send."""
    size = sum(len(name) + len(address) + 6 for name, address in names.items())
    if len(names) > bootstrap.MAX_NAMES or size > MAX_NAMES_BYTES:
        log.warning("the net has %d names (%d bytes): too many to send; nodes keep the names "
                    "they have", len(names), size)
        return Names(None, None)
    return Names(names, bootstrap.names_tag(names))  # the tag the node computes


TOO_MANY_RECHECK = 1.0  # s a "too many to send" verdict is kept without reading the registry


class NamesCache:
    """The names of the newest registry generation seen, computed once per generation.

    A registry with more than MAX_NAMES rows that are not revoked has too many names to send:
    that is decided by counting those rows no further than MAX_NAMES + 1 (the unsound rows
    vpn_names leaves out count too), never by reading them all, and the verdict is kept
    TOO_MANY_RECHECK s without even reading the generation. So at fleet size an enrolment
    or a sync costs the same as in an empty registry; the node gets its names from a sync
    once they fit again."""

    def __init__(self, config: HubConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._generation: Optional[int] = None
        self._names = Names(None, None)
        self._too_many_since: Optional[float] = None  # when the registry last had too many

    def get(self, view: RegistryView, hubs: Optional[Sequence[HubRow]] = None) -> Names:
        """The names as ``view`` sees them (``hubs``: its list_hubs, when already read)."""
        with self._lock:
            if self._too_many_since is not None and \
                    0 <= self.clock() - self._too_many_since < TOO_MANY_RECHECK:
                return self._names
        generation = view.generation()
        with self._lock:
            if generation == self._generation:
                return self._names
        checked_at = self.clock()
        active = view.count_active_up_to(bootstrap.MAX_NAMES + 1)
        if active > bootstrap.MAX_NAMES:
            names, too_many_since = Names(None, None), checked_at
            if self._too_many_since is None:
                log.warning("the net has more than %d nodes and hubs: too many names to send;"
                            " nodes keep the names they have", bootstrap.MAX_NAMES)
        else:
            names, too_many_since = sendable(vpn_names(
                self.config, view.list_hubs() if hubs is None else hubs, view.list_nodes())), None
        with self._lock:
            self._generation, self._names = generation, names
            self._too_many_since = too_many_since
        return names


def hosts_writable(path: str = bootstrap.ETC_HOSTS) -> bool:
    """True when this process may replace path (the API's sandbox makes /etc read-only)."""
    target = os.path.realpath(path)
    return os.access(os.path.dirname(target), os.W_OK) or os.access(target, os.W_OK)


def write_hub_names(config: HubConfig, names: Dict[str, str],
                    path: str = bootstrap.ETC_HOSTS) -> bool:
    """This hub's block of /etc/hosts (bootstrap.apply_names); True when it changed. Its
    problems are logged (warnings)."""
    changed, problems = bootstrap.apply_names(config.net, config.net, names, path)
    for problem in problems:
        log.warning("names: %s", problem)
    return bool(changed)


# -- the root side under systemd ---------------------------------------------------------------
# The API runs sandboxed (service.py): /etc is read-only to it. It writes the names into
# NAMES_FILE in its state directory; tinc-hub-names.path starts tinc-hub-names.service (root,
# a sandbox of its own that may write /etc only) when the file changes, which runs
# `tinc-hub names apply --net NET --vpn-subnet CIDR`. Net and subnet come from that command
# line (written by init, as root), never from the API-writable state directory, and every name
# is checked again (bootstrap.validate_names): a compromised API can at most point NAME.NET at
# another address of the VPN, never any other name of the machine.

NAMES_FILE = "names.json"
NAMES_SERVICE, NAMES_PATH_UNIT = "tinc-hub-names.service", "tinc-hub-names.path"
MAX_NAMES_FILE = 2 * 1024 * 1024


def write_names_file(state_root: Path, names: Dict[str, str]) -> bool:
    """The names for the root side (0600; written only when they change: the path unit fires
    on each write)."""
    return bootstrap.write_atomic(str(state_root / NAMES_FILE),
                                  json.dumps(names, indent=1, sort_keys=True) + "\n", 0o600)


def read_names_file(path: Path) -> Optional[bytes]:
    """The names file's bytes (None when missing); never through a symlink, at most
    MAX_NAMES_FILE bytes (ValueError beyond)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_NAMES_FILE + 1)
    if len(data) > MAX_NAMES_FILE:
        raise ValueError(f"{path} is larger than {MAX_NAMES_FILE} bytes")
    return data


def apply_names_file(state_root: Path, net: str, vpn_subnet: str,
                     path: str = bootstrap.ETC_HOSTS) -> Tuple[bool, List[str]]:
    """`tinc-hub names apply`: the names file, checked, as net's block of path; again while
    the file changed meanwhile (at most 5 rounds). (changed, problems); ValueError for a file
    that is not names of this net (nothing written)."""
    network = ipaddress.IPv4Network(vpn_subnet)
    changed: bool = False
    problems: List[str] = []
    for _ in range(5):
        data = read_names_file(state_root / NAMES_FILE)
        if data is None:
            return changed, problems
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ValueError(f"{state_root / NAMES_FILE} is not JSON") from None
        names = bootstrap.validate_names(value, str(network.network_address), network.prefixlen)
        done, problems = bootstrap.apply_names(net, net, names, path)
        if done is None:
            return changed, problems
        changed = changed or done
        if read_names_file(state_root / NAMES_FILE) == data:
            break
    return changed, problems
