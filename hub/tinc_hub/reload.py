"""SIGHUP of the hub's tincd (so it loads new host files and Subnets), paced by its cost.

tinc 1.0 with TunnelServer only learns a node's Subnet on start or SIGHUP (it accepts the
node's meta connection without one, reading hosts/NAME then, but ignores its ADD_SUBNET as
"unauthorized"), so every enrolment must be followed by a SIGHUP before its answer is sent.

A SIGHUP is not cheap at fleet size: tincd (single-threaded: no packet is relayed meanwhile)
re-reads tinc.conf, stats hosts/NAME of every connection and, with TunnelServer, parses EVERY
file in hosts/ (load_all_subnets); 1.0.36 also leaks one subnet_t (64 bytes) per Subnet already
known, per reload. So :class:`TincdReloader` sends at most one SIGHUP per interval, the interval
growing with the measured duration of the last reload (tincd spends at most ``BUSY_FRACTION``
of its time reloading), and :class:`ReloadBatcher` lets many enrolments share one. An idle hub
still reloads at once. Facts and figures: docs/DESIGN.md (SIGHUP pacing), bench/sighup_scale.py.
"""

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Callable, NamedTuple, Optional, Set

from bootstrap import bootstrap

log = logging.getLogger("tinc_hub.reload")
_warned: Set[str] = set()  # nets whose failed SIGHUP was already logged as a warning

BUSY_FRACTION = 0.1  # tincd spends at most this share of its time in SIGHUP reloads
MIN_INTERVAL = 0.3  # s between SIGHUPs, however cheap they are
MAX_INTERVAL = 15.0  # s between SIGHUPs at most (an enrolment waits for one: clients wait 300 s)
RELOAD_POLL = 0.005  # s between looks at tincd's state while it reloads


def send_sighup(net: str, tinc_dir: str = bootstrap.DEFAULT_TINC_DIR) -> bool:
    """SIGHUP the hub's tincd (pid from /var/run/tinc.NET.pid); fall back to ``tincd -n NET -kHUP``.

    True on success; False (and a warning) when no tincd could be signalled.
    """
    pid = bootstrap.pid_from_file(net)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
            _warned.discard(net)
            return True
        except OSError as exc:
            log.warning("SIGHUP to tincd pid %s failed: %s", pid, exc)
    try:
        bootstrap.run(bootstrap.tincd_base(net, tinc_dir) + ["-kHUP"], timeout=10)
    except bootstrap.BootstrapError as exc:
        if net not in _warned:
            log.warning("could not SIGHUP tincd of net %s (not running?): %s", net, exc)
            _warned.add(net)
        else:
            log.debug("could not SIGHUP tincd of net %s: %s", net, exc)
        return False
    _warned.discard(net)
    return True


class TincdState(NamedTuple):
    state: str  # R running or runnable, D uninterruptible, S sleeping (tincd: in pselect) ...
    cpu_seconds: float  # utime + stime


def tincd_state(pid: int) -> Optional[TincdState]:
    """State and CPU time of process ``pid`` from /proc/PID/stat; None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # after the comm field, which may hold anything
    try:
        return TincdState(fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    except (IndexError, ValueError):
        return None


def wait_reloaded(pid: int, timeout: float, poll: float = RELOAD_POLL,
                  clock: Callable[[], float] = time.monotonic) -> Optional[float]:
    """Seconds until tincd ``pid``, just SIGHUPed, sleeps again (its reload is done: kill()
    leaves it runnable, 'R', until it is back in pselect); None when it cannot be watched.
    At most ``timeout`` (then ``timeout``)."""
    started = clock()
    while True:
        now = clock() - started
        state = tincd_state(pid)
        if state is None:
            return None
        if state.state not in ("R", "D") or now >= timeout:
            return now
        time.sleep(poll)


def pace_interval(duration: Optional[float], busy_fraction: float = BUSY_FRACTION,
                  min_interval: float = MIN_INTERVAL, max_interval: float = MAX_INTERVAL) -> float:
    """Seconds between SIGHUPs after a reload that took ``duration`` s (None: unknown), so that
    tincd reloads at most ``busy_fraction`` of the time, within [min_interval, max_interval]."""
    interval = min_interval if duration is None else duration / busy_fraction
    return min(max(interval, min_interval), max_interval)


class TincdReloader:
    """Thread-safe SIGHUPs of the hub's tincd (API enrolments through :class:`ReloadBatcher`,
    the registry follower, the ephemeral reaper): at most one per :attr:`interval`, which is
    the last reload's measured duration divided by ``busy_fraction``, within
    [``min_interval``, ``max_interval``]. :meth:`reload` blocks until the next SIGHUP may go,
    sends it, and returns once tincd finished reloading (or could not be watched)."""

    def __init__(self, net: str, tinc_dir: str = bootstrap.DEFAULT_TINC_DIR,
                 busy_fraction: float = BUSY_FRACTION, min_interval: float = MIN_INTERVAL,
                 max_interval: float = MAX_INTERVAL) -> None:
        self.net, self.tinc_dir = net, tinc_dir
        self.busy_fraction, self.min_interval, self.max_interval = busy_fraction, min_interval, max_interval
        self.interval = min_interval
        self._logged = min_interval  # the interval last logged
        self.last_duration: Optional[float] = None  # s, the last reload's (None: not measured)
        self.last_sent = float("-inf")
        self._lock = threading.Lock()

    def due_in(self) -> float:
        """Seconds until the next SIGHUP may be sent (0 or less: now)."""
        return self.last_sent + self.interval - time.monotonic()

    def reload(self) -> bool:
        """Wait until due, SIGHUP tincd, wait for its reload; False when nothing was signalled."""
        with self._lock:
            delay = self.due_in()
            if delay > 0:
                time.sleep(delay)
            pid = bootstrap.pid_from_file(self.net)
            ok = send_sighup(self.net, self.tinc_dir)
            self.last_sent = time.monotonic()
            duration = wait_reloaded(pid, self.max_interval * self.busy_fraction) if ok and pid else None
            self._pace(duration)
            return ok

    def _pace(self, duration: Optional[float]) -> None:
        self.last_duration = duration
        interval = pace_interval(duration, self.busy_fraction, self.min_interval, self.max_interval)
        if not self._logged / 2 < interval < self._logged * 2:  # a line per doubling or halving
            self._logged = interval
            log.info("tincd reloads take %.2f s: at most one SIGHUP every %.1f s", duration or 0.0, interval)
        self.interval = interval


class ReloadBatcher:
    """Coalesce reload requests: ``await batcher.reload()`` returns once a SIGHUP sent after
    the call has gone out (with a TincdReloader: and tincd has reloaded). One flusher task
    sends them, at most one per ``min_interval`` and not before ``due_in()`` says."""

    def __init__(self, sighup: Callable[[], bool], min_interval: float = MIN_INTERVAL,
                 due_in: Callable[[], float] = lambda: 0.0) -> None:
        self._sighup = sighup
        self.min_interval = min_interval
        self._due_in = due_in  # a TincdReloader's: its pace (the SIGHUP's cost) on top
        self._next: Optional[asyncio.Future] = None
        self._flusher: Optional[asyncio.Task] = None
        self._inflight: Optional[asyncio.Future] = None  # the batch whose SIGHUP is being sent
        self._last_sent = float("-inf")
        self._failing = False

    async def reload(self) -> None:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        await asyncio.shield(self._next)

    async def settled(self) -> None:
        """Wait for already requested SIGHUPs (pending or being sent) without asking for one.

        A replayed enrolment changes no file, but the SIGHUP for its first request may still
        be on its way; the replay must not be answered before it went out."""
        waiting = [f for f in (self._inflight, self._next) if f is not None and not f.done()]
        if waiting:
            await asyncio.shield(asyncio.gather(*waiting))

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._next is not None:
            delay = max(self._last_sent + self.min_interval - time.monotonic(), self._due_in())
            if delay > 0:
                await asyncio.sleep(delay)
            future, self._next = self._next, None
            self._inflight = future
            try:
                ok = await loop.run_in_executor(None, self._sighup)
            except Exception as exc:  # a failed reload must not hang enrolments
                log.warning("reload failed: %s", exc)
                ok = False
            self._last_sent = time.monotonic()
            if ok and self._failing:
                log.info("tincd reloads work again")
            self._failing = not ok
            self._inflight = None
            if not future.done():
                future.set_result(None)
