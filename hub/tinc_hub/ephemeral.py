"""Ephemeral nodes: removed once offline for their duration, never while online.

A token made with ``tinc-hub token create --ephemeral DURATION`` stores DURATION; a node it
enrols copies it onto its row (``nodes.ephemeral_seconds``) with ``last_seen_at`` = now.

Online = on the VPN, as the hub's OWN tincd sees it: tinc 1.0 runs ``hosts/../host-up`` and
``host-down`` with ``$NODE`` whenever a node becomes reachable or unreachable in its graph;
the scripts ``init`` writes (liveness.py) leave ``STATE/liveness/NODE`` records. A record counts
only when it was written by the tincd running now (not older than its pidfile). A successful
``POST /v1/sync`` counts as seen too.

:class:`Reaper` (a thread of ``serve``) every ``REAP_INTERVAL`` s: one batched UPDATE of
``last_seen_at`` for the ephemeral nodes seen (no generation bump: no hub follows it), then
for each ephemeral node offline for its duration a conditional DELETE (the row must still say
so: another hub may have seen it since, or removed it) with its exposures and a tombstone, in
one write transaction; then the host file, one SIGHUP, an audit line per node. The other hubs
follow through the registry (the tombstone names the host file to remove).

Guard against a false removal: nothing is removed while this hub cannot tell who is online:
its tincd is not running, has run for less than the node's duration, or its host-up/host-down
are not the scripts this tinc-hub writes (an older init: re-run it).
"""

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set

from bootstrap import bootstrap
from .background import BackgroundLoop
from .listing import expiry_of
from .liveness import (Seen, online_names, read_liveness, refresh_snapshot, render_host_script,
                       tincd_started)
from .registry import (NodeRow, Registry, RegistryError, RegistryTransaction, Tombstone, iso_utc,
                       token_id)
from .state import HubConfig

log = logging.getLogger("tinc_hub.ephemeral")
audit_log = logging.getLogger("tinc_hub.audit")

REAP_INTERVAL = 5.0  # s between reaper rounds
TOMBSTONE_DAYS = 14  # a removed machine that comes back within this is told why
MAX_REFRESH = 300  # s: a seen node's last_seen_at is rewritten at least this often


def refresh_due(node: NodeRow, now: int) -> bool:
    """Whether a seen node's last_seen_at is worth writing now: every round for short
    durations, at most every duration/3 (up to MAX_REFRESH s) for long ones, so that a fleet
    costs few writes and another hub still sees it long before its duration runs out."""
    if node.last_seen_at is None or node.ephemeral_seconds is None:
        return True
    every = min(max(node.ephemeral_seconds // 3, int(REAP_INTERVAL)), MAX_REFRESH)
    return now - node.last_seen_at >= every


def seen_here(nodes: Iterable[NodeRow], records: Dict[str, Seen], started: Optional[float],
              synced: Set[str], now: int) -> Dict[str, int]:
    """When this hub last saw each ephemeral node online, as far as it knows: ``now`` for a
    node its running tincd reports reachable or that synced since the last round; the time of
    the host-down event for one its running tincd saw leave (tinc's own detection time, so a
    node is never counted offline before it went). Nodes it knows nothing of are left out."""
    online = online_names(records, started)
    times: Dict[str, int] = {}
    for node in nodes:
        record = records.get(node.name)
        if node.name in online or node.name in synced:
            times[node.name] = now
        elif started is not None and record is not None and not record.up and record.at >= int(started):
            times[node.name] = min(record.at, now)
    return times


def last_seen_writes(nodes: Iterable[NodeRow], times: Dict[str, int], now: int) -> Dict[str, int]:
    """The last_seen_at values worth writing: a leave time later than the row's, and a "seen
    now" when refresh_due (short durations every round, long ones every duration/3)."""
    writes = {}
    for node in nodes:
        at = times.get(node.name)
        if at is None or (node.last_seen_at is not None and at <= node.last_seen_at):
            continue
        if at < now or refresh_due(node, now):
            writes[node.name] = at
    return writes


def removal_due(node: NodeRow, online: bool, started: Optional[float], now: int) -> bool:
    """True when ephemeral ``node`` must go now: offline here, last seen at least its duration
    ago, and this hub's tincd has run for at least that long (else it cannot tell)."""
    duration = node.ephemeral_seconds
    if duration is None or node.revoked or online or node.last_seen_at is None:
        return False
    if started is None or now - started < duration:
        return False
    return node.last_seen_at + duration <= now


def expiry(node: NodeRow, online: bool, started: Optional[float], now: int) -> Optional[str]:
    """What ``tinc-hub nodes`` shows: None (not ephemeral), "online", "paused" (this hub's
    tincd is down: it removes nothing), or the ISO time of the removal."""
    return expiry_of(node.ephemeral_seconds, node.last_seen_at, online, started, now)


def refusal_message(stone: Tombstone) -> str:
    """The 410 answer to a machine whose node was removed."""
    when = iso_utc(stone.removed_at)
    if stone.offline_seconds is None:
        why = f"node {stone.name!r} was removed by the hub's admin at {when} (revoke --release)"
    else:
        why = (f"node {stone.name!r} was removed at {when} after {stone.offline_seconds} s"
               " offline (ephemeral)")
    return why + "; join again with the one-liner and a token that has uses left (a new address)"


def scripts_are_ours(config: HubConfig, state_root: Path) -> bool:
    """True when hosts-dir's host-up and host-down are the liveness scripts this code writes,
    with the journal or (an init of an earlier version) without: both replace the records."""
    texts = [bootstrap.read_text(str(config.net_dir / f"host-{event}")) for event in ("up", "down")]
    return any(texts == [render_host_script(state_root, event, journal) for event in ("up", "down")]
               for journal in (True, False))


def reap_in_transaction(tx: RegistryTransaction, due: Iterable[NodeRow], now: int,
                        online: Callable[[], Set[str]] = set) -> List[NodeRow]:
    """The conditional DELETEs (exposures first) and a tombstone per node removed; returns
    the rows removed (as read inside the transaction). ``online``: who is online here now,
    read again under the write lock (a node that came back since the round began stays)."""
    removed = []
    back = online()
    for candidate in due:
        if candidate.name in back:
            continue
        node = tx.get_node(candidate.name)
        if node is None or not tx.reap_node(node.name, now):
            continue  # seen meanwhile (by another hub), or removed by one
        offline = now - (node.last_seen_at or now)
        tx.add_tombstone(Tombstone(node.name, node.credential_sha256, now, offline))
        removed.append(node)
    if removed:
        tx.prune_tombstones(now - TOMBSTONE_DAYS * 86400)
    return removed


class _NothingRemoved(Exception):
    """Rolls back a reaper transaction that removed nothing (no generation bump)."""


class Reaper(BackgroundLoop):
    """The ``serve`` thread that removes ephemeral nodes (see the module doc)."""

    thread_name = "ephemeral-reaper"

    def __init__(self, config: HubConfig, registry: Registry, state_root: Path,
                 sighup: Callable[[], bool], interval: float = REAP_INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.registry, self.state_root = config, registry, Path(state_root)
        self.sighup, self.interval, self.clock = sighup, interval, clock
        self._synced: Set[str] = set()
        self._synced_lock = threading.Lock()
        super().__init__()
        self._paused: Optional[str] = None  # why the last round removed nothing, once logged

    def note_sync(self, name: str) -> None:
        """A successful POST /v1/sync of node ``name`` (counts as seen at the next round)."""
        with self._synced_lock:
            self._synced.add(name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.round()
                refresh_snapshot(self.state_root)  # 'tinc-hub nodes' then reads one file
            except RegistryError as exc:
                log.warning("ephemeral nodes: registry unreachable this round: %s", exc)
            except Exception as exc:  # the thread must outlive any one failure
                log.error("ephemeral nodes: %s: %s", type(exc).__name__, exc)

    def _pause(self, why: Optional[str]) -> None:
        if why != self._paused:
            if why:
                log.warning("ephemeral nodes: none removed while %s", why)
            elif self._paused:
                log.info("ephemeral nodes: removals resumed")
        self._paused = why

    def round(self) -> List[NodeRow]:
        """One round: record who was seen, remove who is due; returns the nodes removed."""
        now = int(self.clock())
        with self._synced_lock:
            synced, self._synced = self._synced, set()
        with self.registry.reading() as view:
            nodes = [n for n in view.list_nodes() if n.ephemeral_seconds is not None and not n.revoked]
        if not nodes:
            return []
        started = tincd_started(self.config.net)
        ours = scripts_are_ours(self.config, self.state_root)
        records = read_liveness(self.state_root) if ours else {}
        times = seen_here(nodes, records, started, synced, now)
        writes = last_seen_writes(nodes, times, now)
        if writes:
            with self.registry.exclusive(), self.registry.transaction(bump=False) as tx:
                tx.mark_seen(writes)
        # decide on what this hub knows, even where it did not write it (refresh_due)
        nodes = [replace(n, last_seen_at=max(n.last_seen_at or 0, times[n.name])) if n.name in times else n
                 for n in nodes]
        seen = {name for name, at in times.items() if at == now}
        if not ours:
            self._pause(f"{self.config.net_dir}/host-up and host-down are not tinc-hub's"
                        " (re-run 'tinc-hub init')")
            return []
        if started is None:
            self._pause(f"the hub's tincd (net {self.config.net}) is not running")
            return []
        self._pause(None)
        due = [n for n in nodes if removal_due(n, n.name in seen, started, now)]
        if not due:
            return []
        try:
            with self.registry.exclusive(), self.registry.transaction() as tx:
                removed = reap_in_transaction(
                    tx, due, now, lambda: online_names(read_liveness(self.state_root), started))
                if not removed:
                    raise _NothingRemoved()
        except _NothingRemoved:
            return []
        # here, not at the top: 'tinc-hub nodes' imports this module and needs neither (the
        # enroller imports cryptography: a tenth of a second for every listing)
        from .enroll import log_value
        from .hostfiles import remove_if_present

        for node in removed:
            remove_if_present(self.config.hosts_dir / node.name)
            audit_log.info("ephemeral result=removed name=%s address=%s offline=%ds duration=%ds token=%s",
                           log_value(node.name), log_value(node.address),
                           now - (node.last_seen_at or now), node.ephemeral_seconds,
                           log_value(token_id(node.token_sha256) or "-"))
        self.sighup()  # one for the whole batch
        return removed


def describe_duration(seconds: int) -> str:
    """Seconds in the largest unit that divides them (``--ephemeral``'s own syntax): 90s, 30m, 2h."""
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
