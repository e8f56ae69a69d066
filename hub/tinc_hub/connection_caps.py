"""Caps on concurrent connections, in total and per client address, enforced when the
listening socket accepts: before the TLS handshake and before asyncio allocates anything for
the connection. A connection over a cap is reset at once (RST, no TLS byte, no TIME_WAIT).

How: asyncio's selector event loop calls ``accept()`` on the very socket object given to
``loop.create_server(sock=...)`` (uvicorn's ``serve(sockets=[...])``). ``CappedListener`` is
that socket; the connections it returns give their slot back when really closed
(``_real_close``, or when garbage-collected unclosed). The address is the TCP peer: no
header exists yet, so a proxy counts as one address (trusted proxies are exempt from the
per-address cap; the total cap still applies). Counts change only on the event loop thread
(in ``accept()``); a close, wherever it happens, queues its address: no lock is needed.

Private hooks (uvicorn's ``limit_concurrency`` answers 503 after the handshake, per server, not
per address): asyncio calling ``accept()`` on this object, and ``socket.socket._accept`` /
``_real_close``; tests/test_private_hooks.py::test_hook_capped_listener fails loudly if an upgrade
breaks them.
"""

import collections
import logging
import socket
import struct
import time
import weakref
from typing import Deque, Dict, Optional, Tuple

from .client_address import NO_PROXY, TrustedProxies, parse_ip

log = logging.getLogger("tinc_hub.serve")

DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 1024
REFUSALS_PER_ACCEPT = 64  # then give the event loop back (asyncio accepts again next tick)
REFUSAL_LOG_INTERVAL = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)


class ConnectionCaps:
    """Counts of open connections, in total and per address, against two caps."""

    def __init__(self, max_total: int, max_per_address: int, exempt: TrustedProxies = NO_PROXY,
                 clock=time.monotonic) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.exempt = exempt
        self.clock = clock
        self._total = 0
        self._per_address: Dict[str, int] = {}
        self._closed: Deque[str] = collections.deque()  # appended by closes, drained by admit
        self._refused = 0
        self._refused_example = ""
        self._refusals_logged_at = clock() - REFUSAL_LOG_INTERVAL  # the first one is logged

    @property
    def total(self) -> int:
        """Connections open now."""
        self._drain_closed()
        return self._total

    def held_from(self, address: str) -> int:
        """Connections open now from ``address``."""
        self._drain_closed()
        return self._per_address.get(address, 0)

    def admit(self, address: str) -> bool:
        """Take a slot for a new connection from ``address``; False if over a cap."""
        self._drain_closed()
        count = self._per_address.get(address, 0)
        if self._total >= self.max_total:
            return self._refuse(f"{address}: {self._total} connections open, --max-connections "
                                f"{self.max_total}")
        if count >= self.max_per_address and parse_ip(address) not in self.exempt:
            return self._refuse(f"{address}: {count} connections from it, "
                                f"--max-connections-per-address {self.max_per_address}")
        self._total += 1
        self._per_address[address] = count + 1
        return True

    def release(self, address: str) -> None:
        """A connection closed (any thread, even from a garbage collection inside admit)."""
        self._closed.append(address)

    def _drain_closed(self) -> None:
        while self._closed:
            address = self._closed.popleft()
            count = self._per_address.pop(address, 0) - 1
            if count > 0:
                self._per_address[address] = count
            self._total -= 1

    def _refuse(self, example: str) -> bool:
        """Count a refusal; one log line per REFUSAL_LOG_INTERVAL at most (no log flood)."""
        self._refused += 1
        self._refused_example = self._refused_example or example
        now = self.clock()
        if now - self._refusals_logged_at >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d connection(s) over the caps since the last such line (e.g. %s)",
                        self._refused, self._refused_example)
            self._refused, self._refused_example, self._refusals_logged_at = 0, "", now
        return False


class CountedConnection(socket.socket):
    """An accepted connection that gives its slot back when its descriptor is closed."""

    _release: Optional[weakref.finalize] = None

    def _real_close(self, *args: object) -> None:
        try:
            super()._real_close(*args)  # type: ignore[misc]
        finally:
            if self._release is not None:
                self._release()  # a finalize runs once: a later garbage collection does nothing


class CappedListener(socket.socket):
    """A listening socket whose ``accept()`` resets connections over ``caps`` at once."""

    caps: Optional[ConnectionCaps] = None

    def accept(self) -> Tuple[socket.socket, object]:
        if self.caps is None:
            return super().accept()
        for _ in range(REFUSALS_PER_ACCEPT):
            fd, peer = self._accept()  # type: ignore[attr-defined]  # BlockingIOError: none left
            address = str(parse_ip(peer[0]) or peer[0]) if isinstance(peer, tuple) else "-"
            if self.caps.admit(address):
                conn = CountedConnection(self.family, self.type, self.proto, fileno=fd)
                conn._release = weakref.finalize(conn, self.caps.release, address)
                if socket.getdefaulttimeout() is None and self.gettimeout():
                    conn.setblocking(True)
                return conn, peer
            refused = socket.socket(self.family, self.type, self.proto, fileno=fd)
            try:
                refused.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            refused.close()
        raise ConnectionAbortedError("connections over the caps refused")  # asyncio: next tick
