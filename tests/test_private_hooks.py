"""One loud test per private hook the hub relies on, where neither uvicorn nor asyncio offers a
public setting (checked against uvicorn 0.54's Config and changelog: no request-header timeout,
no TLS handshake timeout, no TLS read-buffer size, no accept hook). Each test checks the
shape the hook relies on AND its behaviour on a real ``tinc-hub serve`` on 127.0.0.1; a failure
names the hook and the file to fix. Run after any upgrade of uvicorn, starlette or Python.

  test_hook_header_timeout         HeaderTimeoutH11Protocol(H11Protocol), http_timeouts.py
  test_hook_tls_handshake_timeout  ssl_handshake_timeout given to create_server, app.py _serve
  test_hook_tls_read_buffer        SSLProtocol.max_size, app.py limit_tls_read_buffers
  test_hook_capped_listener        CappedListener.accept / _real_close, connection_caps.py
"""

import asyncio
import asyncio.selector_events
import asyncio.sslproto
import contextlib
import inspect
import platform
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import uvicorn
from uvicorn.protocols.http import h11_impl

from tinc_hub.app import TLS_READ_BUFFER
from tinc_hub.http_timeouts import HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, HeaderTimeoutH11Protocol
from hub_fixtures import init_hub, wait_until
from labkit.loopback_hub import HubProcess, free_port

HOST = "127.0.0.1"
IDLE_CONNECTIONS = 400
# asyncio's default TLS read buffer alone is 256 KiB a connection; with the hook a connection
# costs ~80 KiB in all (measured: 81 KiB with the hook, 308 KiB without, uvicorn 0.54, 3.11)
MAX_KIB_PER_IDLE_CONNECTION = 160


def broken(hook: str, where: str, what: str) -> str:
    return (f"PRIVATE HOOK BROKEN: {hook} ({where}): {what} "
            f"[uvicorn {uvicorn.__version__}, Python {platform.python_version()}]. Fix {where}, "
            f"or hold uvicorn (hub/pyproject.toml) or Python back to the last version that passed.")


def closed_after(elapsed: float) -> str:
    return "never closed" if elapsed == float("inf") else f"closed after {elapsed:.1f} s"


@contextlib.contextmanager
def running_hub(root: Path, *serve_args: str) -> Iterator[HubProcess]:
    """``tinc-hub serve --listen 127.0.0.1 [serve_args]`` on a free port, stopped on exit."""
    port = free_port()
    env = init_hub(root, api_port=port)
    hub = HubProcess(env.state.root, port, env.state.cert_file, root / "serve.log", serve_args)
    try:
        hub.start(timeout=20)
        yield hub
    finally:
        hub.stop()


def seconds_until_closed(sock: socket.socket, limit: float) -> Tuple[float, bytes]:
    """Seconds until the server closes ``sock`` (EOF or reset), and what it sent first; the
    seconds are ``inf`` if it is still open after ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        data = sock.recv(100)
    except (ConnectionError, ssl.SSLError):
        data = b""
    except socket.timeout:
        return float("inf"), b""
    return time.monotonic() - started, data


def test_hook_header_timeout(tmp_path: Path) -> None:
    """HeaderTimeoutH11Protocol subclasses uvicorn's private H11Protocol: a connection that has
    not sent a complete request head within HEADER_TIMEOUT is closed, on a fresh connection and
    after a response (where uvicorn's keep-alive timer, cancelled by any byte, would not)."""
    hook, where = "HeaderTimeoutH11Protocol(uvicorn H11Protocol)", "hub/tinc_hub/http_timeouts.py"
    assert issubclass(HeaderTimeoutH11Protocol, h11_impl.H11Protocol)
    for name in ("connection_made", "data_received", "on_response_complete", "connection_lost"):
        assert callable(getattr(h11_impl.H11Protocol, name, None)), \
            broken(hook, where, f"H11Protocol.{name} is gone")
    init = inspect.signature(h11_impl.H11Protocol.__init__).parameters
    assert "config" in init, broken(hook, where, f"H11Protocol.__init__ is now {list(init)}")
    source = inspect.getsource(h11_impl)
    for used in ("self.cycle", "self.transport", "self.loop", "self.logger", "self.client",
                 "response_complete"):
        assert used in source, broken(hook, where, f"uvicorn's h11_impl no longer has {used}")

    results = {}

    def fresh() -> None:
        with hub.tls_socket(5) as sock:
            sock.sendall(b"GET /heal")
            results["fresh"] = seconds_until_closed(sock, HEADER_TIMEOUT + 10)

    def after_a_response() -> None:
        with hub.tls_socket(5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head or not head.rstrip().endswith(b"}"):
                head += sock.recv(1000)
            sock.sendall(b"GET /heal")
            results["kept-alive"] = seconds_until_closed(sock, HEADER_TIMEOUT + 10)

    with running_hub(tmp_path) as hub:
        threads = [threading.Thread(target=f) for f in (fresh, after_a_response)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HEADER_TIMEOUT + 20)
        assert hub.healthy()
    for case in ("fresh", "kept-alive"):
        assert case in results, broken(hook, where, f"the {case} probe failed; log:\n{hub.log.read_text()}")
        elapsed, data = results[case]
        assert data == b"" and HEADER_TIMEOUT - 1 <= elapsed <= HEADER_TIMEOUT + 5, broken(
            hook, where, f"a {case} connection with half a request line was {closed_after(elapsed)} "
                         f"(sent {data!r}), not after HEADER_TIMEOUT={HEADER_TIMEOUT:.0f} s")


def test_hook_tls_handshake_timeout(tmp_path: Path) -> None:
    """_serve wraps this loop's create_server to pass ssl_handshake_timeout, as uvicorn calls
    loop.create_server(..., ssl=...) and has no setting for it (asyncio's default: 60 s)."""
    hook, where = "create_server(ssl_handshake_timeout=HANDSHAKE_TIMEOUT)", "hub/tinc_hub/app.py (_serve)"
    assert "ssl_handshake_timeout" in inspect.signature(asyncio.BaseEventLoop.create_server).parameters
    startup = inspect.getsource(uvicorn.Server.startup)
    assert "loop.create_server(" in startup and "ssl=" in startup, broken(
        hook, where, "uvicorn's Server.startup no longer calls loop.create_server(..., ssl=...)")
    with running_hub(tmp_path) as hub:
        with socket.create_connection((HOST, hub.port), timeout=5) as sock:  # and no ClientHello
            elapsed, data = seconds_until_closed(sock, HANDSHAKE_TIMEOUT + 10)
        assert hub.healthy()
    assert data == b"" and elapsed <= HANDSHAKE_TIMEOUT + 5, broken(
        hook, where, f"a connection that never starts TLS was {closed_after(elapsed)}, "
                     f"not after HANDSHAKE_TIMEOUT={HANDSHAKE_TIMEOUT:.0f} s")


def test_hook_tls_read_buffer(tmp_path: Path) -> None:
    """limit_tls_read_buffers lowers asyncio's private SSLProtocol.max_size (Python >= 3.11: a
    256 KiB buffer per connection, allocated at accept): idle connections stay cheap."""
    hook, where = "asyncio.sslproto.SSLProtocol.max_size", "hub/tinc_hub/app.py (limit_tls_read_buffers)"
    if sys.version_info >= (3, 11):
        default = getattr(asyncio.sslproto.SSLProtocol, "max_size", None)
        assert isinstance(default, int) and default > TLS_READ_BUFFER, broken(
            hook, where, f"SSLProtocol.max_size is {default!r}, not an int above {TLS_READ_BUFFER}")
    with running_hub(tmp_path) as hub:
        before_fds, before_kib = hub.open_fds(), hub.rss_kib()
        socks: List[socket.socket] = []
        try:
            for _ in range(IDLE_CONNECTIONS):  # no TLS byte: the buffer is made at accept
                socks.append(socket.create_connection((HOST, hub.port), timeout=5))
            # all accepted (less one: the health probe's socket may have been open before);
            # measured well within HANDSHAKE_TIMEOUT, which closes them
            assert wait_until(lambda: hub.open_fds() >= before_fds + IDLE_CONNECTIONS - 1, 5), \
                f"the hub accepted {hub.open_fds() - before_fds} of {IDLE_CONNECTIONS} connections; " \
                f"log:\n{hub.log.read_text()}"
            per_connection = (hub.rss_kib() - before_kib) / IDLE_CONNECTIONS
        finally:
            for sock in socks:
                sock.close()
        assert hub.healthy()
    print(f"{IDLE_CONNECTIONS} idle connections: {per_connection:.0f} KiB each")
    assert per_connection < MAX_KIB_PER_IDLE_CONNECTION, broken(
        hook, where, f"an idle TLS connection costs {per_connection:.0f} KiB of RSS "
                     f"(at most {MAX_KIB_PER_IDLE_CONNECTION} expected with a "
                     f"{TLS_READ_BUFFER // 1024} KiB buffer)")


def test_hook_capped_listener(tmp_path: Path) -> None:
    """CappedListener relies on asyncio's selector loop calling accept() on the listening
    socket object, and CountedConnection on socket.socket._real_close: a connection over the
    cap is reset before any TLS byte, and a closed connection gives its slot back."""
    hook, where = "CappedListener.accept / CountedConnection._real_close", "hub/tinc_hub/connection_caps.py"
    assert hasattr(socket.socket, "_accept") and hasattr(socket.socket, "_real_close"), broken(
        hook, where, "socket.socket._accept or ._real_close is gone")
    accept_source = inspect.getsource(asyncio.selector_events.BaseSelectorEventLoop._accept_connection)
    assert "sock.accept()" in accept_source, broken(
        hook, where, "asyncio's selector loop no longer calls accept() on the listening socket")
    with running_hub(tmp_path, "--max-connections-per-address", "2") as hub:
        held = [hub.tls_socket(5), hub.tls_socket(5)]  # handshakes done: both slots taken
        try:
            started, outcome = time.monotonic(), "still open after 5 s"
            try:  # the reset may even beat connect() back to this thread
                with socket.create_connection((HOST, hub.port), timeout=5) as over:
                    outcome = f"sent {over.recv(100)!r}"
            except ConnectionResetError:
                outcome = "reset"
            except socket.timeout:
                pass
            elapsed = time.monotonic() - started
            assert outcome == "reset" and elapsed < 2, broken(
                hook, where, f"a connection over --max-connections-per-address 2 was not reset at "
                             f"accept ({outcome} after {elapsed:.1f} s)")
        finally:
            held.pop().close()
        assert wait_until(hub.healthy, 10, 0.1), broken(
            hook, where, "a closed connection did not give its slot back")
        for sock in held:
            sock.close()
