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

import hashlib
import json
import logging
import os
import threading
from typing import Dict, NamedTuple, Optional, Sequence

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
    names = {hub.name: hub.address for hub in usable_hubs(hubs, config.network)}
    names.setdefault(config.name, config.hub_address)
    for node in nodes:
        if node.revoked or node.name in names:
            continue
        if host_row_problem(node.name, node.address, node.public_key, config.network) is None:
            names[node.name] = node.address
    return names


def names_tag(names: Dict[str, str]) -> str:
    """sha256 (hex) of the canonical JSON of names: equal names, equal tag."""
    canonical = json.dumps(names, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def sendable(names: Dict[str, str]) -> Names:
    """names with their tag, or Names(None, None) (logged) when they are too many to send."""
    size = sum(len(name) + len(address) + 6 for name, address in names.items())
    if len(names) > bootstrap.MAX_NAMES or size > MAX_NAMES_BYTES:
        log.warning("the net has %d names (%d bytes): too many to send; nodes keep the names "
                    "they have", len(names), size)
        return Names(None, None)
    return Names(names, names_tag(names))


class NamesCache:
    """The names of the newest registry generation seen, computed once per generation."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._generation: Optional[int] = None
        self._names = Names(None, None)

    def get(self, view: RegistryView, hubs: Optional[Sequence[HubRow]] = None) -> Names:
        """The names as ``view`` sees them (``hubs``: its list_hubs, when already read)."""
        generation = view.generation()
        with self._lock:
            if generation == self._generation:
                return self._names
        names = sendable(vpn_names(self.config, view.list_hubs() if hubs is None else hubs,
                                   view.list_nodes()))
        with self._lock:
            self._generation, self._names = generation, names
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
