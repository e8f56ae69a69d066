"""Connection-level timeouts uvicorn does not have: complete request headers within
HEADER_TIMEOUT seconds of the connection (or of the previous response), and the TLS
handshake within HANDSHAKE_TIMEOUT seconds (passed to create_server by app._serve).

Private hook: uvicorn (up to 0.54) has no request-head timeout (``timeout_keep_alive`` runs only
between requests and any byte cancels it), so HeaderTimeoutH11Protocol subclasses its private
H11Protocol; tests/test_private_hooks.py::test_hook_header_timeout fails loudly if an upgrade
breaks it.
"""

import asyncio
from typing import Any, Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection that has not delivered a complete request
    head within ``header_timeout`` seconds is closed (slowloris, idle half-open sockets).

    The timer runs whenever no request is being served: from connection_made, and again
    after each response on a kept-alive connection, also while the client still sends the
    body of a request whose handler did not read it (a byte a second would otherwise hold
    the connection for as long as the body it declared). It is cancelled when a request head
    has been parsed and that request is being served.
    """

    header_timeout: float = HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: Optional[asyncio.TimerHandle] = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _serving(self) -> bool:
        """A request head was parsed and its response is not complete yet."""
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._serving() and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if not self._serving():
            self.logger.debug("closing connection from %s: no complete request head within %.0f s",
                             self.client[0] if self.client else "?", self.header_timeout)
            self.transport.close()
