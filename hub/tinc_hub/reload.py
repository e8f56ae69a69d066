"""SIGHUP of the hub's tincd (so it loads new host files and Subnets), batched for bursts.

tinc 1.0 with TunnelServer only learns a node's Subnet on start or SIGHUP, so every
enrolment must be followed by a SIGHUP before its answer is sent. Many enrolments arriving
together share one SIGHUP: at most one every ``min_interval`` seconds.
"""

import asyncio
import logging
import os
import signal
import time
from typing import Callable, Optional, Set

from bootstrap import bootstrap

log = logging.getLogger("tinc_hub.reload")
_warned: Set[str] = set()  # nets whose failed SIGHUP was already logged as a warning


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


class ReloadBatcher:
    """Coalesce reload requests: ``await batcher.reload()`` returns once a SIGHUP sent after
    the call has gone out. One flusher task sends them, at most one per ``min_interval``."""

    def __init__(self, sighup: Callable[[], bool], min_interval: float = 0.3) -> None:
        self._sighup = sighup
        self.min_interval = min_interval
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
            delay = self._last_sent + self.min_interval - time.monotonic()
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
