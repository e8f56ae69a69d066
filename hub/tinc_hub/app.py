"""The HTTPS server: a thin Starlette app over the pure enrolment handler, run by uvicorn."""

import asyncio
import gc
import json
import logging
import resource
import socket
import time
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from bootstrap import script_source
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .client_address import NO_PROXY, TrustedProxies, client_address
from .connection_caps import (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
                              CappedListener, ConnectionCaps)
from .enroll import MAX_BODY_BYTES, Attempt, Enroller, audit_line, audit_log
from .ephemeral import Reaper
from .errors import HubError
from .node_rotate import RotateKeyHandler, rotate_audit_line
from .node_sync import MAX_SYNC_BODY_BYTES, SYNC_INTERVAL, SyncHandler
from .http_timeouts import HANDSHAKE_TIMEOUT, HeaderTimeoutH11Protocol
from .openapi import openapi_schema
from .prechecks import PrecheckPool, checked_and_written
from .ratelimit import DEFAULT_RATE_LIMIT, RateLimit, RateLimiter, parse_rate_limit, retry_after_header
from .registry import POSTGRES_POOL_SIZE, Registry
from .key_rotation import public_key_to_record
from .registry_follower import RegistryFollower
from .roster import hub_row, register_hub
from .reload import ReloadBatcher, TincdReloader
from .state import HubConfig, StateDir
from .tls import pin_of_cert_file

log = logging.getLogger("tinc_hub.serve")
access_log = logging.getLogger("tinc_hub.access")

BODY_TIMEOUT = 10.0
# Enrolment pre-checks (Enroller.request) at once: the precheck pool's threads
# (tinc_hub.prechecks). SQLite's reads are local and the checks are CPU under the GIL: every
# extra thread is one more contender for it with the group commit writer and the event loop,
# whose every system call gives it away (measured, 1000 concurrent enrolments: anyio's 40 ~15 %
# slower than 4; 4 -> 2 pool threads ~0.4 ms less hub CPU per enrolment; 2 -> 1: 0.92x the
# wall time, 0.96x the CPU, 8 alternating rounds). One is enough: a pre-check waits on the disk
# only when the writer (its fsyncs) waits on it too, and no enrolment gets further than the
# writer. PostgreSQL's reads wait on the network: as many as its pool has connections.
SQLITE_PRECHECK_THREADS = 1


def precheck_threads(dialect: str) -> int:
    return SQLITE_PRECHECK_THREADS if dialect == "sqlite" else POSTGRES_POOL_SIZE
REGISTRY_RETRY_AFTER = 5  # seconds a client waits after a 503 (the registry is unreachable)
BACKLOG = 4096


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_capped_body(request: Request, limit: int = MAX_BODY_BYTES,
                           timeout: Optional[float] = None) -> bytes:
    """The request body, at most ``limit`` bytes (413) and received within ``timeout`` s (408,
    default BODY_TIMEOUT)."""
    timeout = BODY_TIMEOUT if timeout is None else timeout
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BodyError(400, "invalid Content-Length")
        if int(declared) > limit:
            raise BodyError(413, f"request body larger than {limit} bytes")

    async def collect() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BodyError(413, f"request body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise BodyError(408, f"request body not received within {timeout:.0f} s") from None


def over_rate_limit(limiter: Optional[RateLimiter], client: str, what: str,
                    audit: Callable[[], str]) -> Optional[Response]:
    """The 429 answer (with Retry-After; the audit line logged) when ``client`` is over
    ``limiter``; None when it may go on (or there is no limit)."""
    wait = limiter.acquire(client) if limiter is not None else 0
    if wait <= 0:
        return None
    retry_after = retry_after_header(wait)
    audit_log.warning("%s", audit())
    return JSONResponse({"error": f"too many {what} from {client}; retry in {retry_after} s"},
                        status_code=429, headers={"Retry-After": retry_after, "Connection": "close"})


def answer_response(status: int, body: Dict[str, Any]) -> JSONResponse:
    """A handler's answer; a 503 (registry unreachable) says when to retry."""
    headers = {"Retry-After": str(REGISTRY_RETRY_AFTER)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def json_bytes(value: Any) -> bytes:
    """``value`` as JSONResponse renders it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":")).encode("utf-8")


def same_json(a: Any, b: Any) -> bool:
    """Do ``a`` and ``b`` encode to the same JSON? Exact for str, int, float, bool, None,
    lists and dicts (types, dict key order); False for anything else."""
    if a is b:
        return True
    kind = type(a)
    if kind is not type(b):  # 1 == True, but not in JSON
        return False
    if kind in (str, int, float):
        return a == b  # (nan is never equal: encoded again)
    if kind is list or kind is tuple:
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if kind is dict:
        return len(a) == len(b) and all(ka is kb or (type(ka) is type(kb) and ka == kb)
                                        for ka, kb in zip(a, b)) \
            and all(same_json(a[key], b[key]) for key in a)
    return False


class AnswerJSON:
    """Enrolment answers rendered as JSONResponse renders them, each member encoded apart and
    the members every answer of a generation shares encoded once: ``names`` (one dict per
    registry generation, never changed: thousands of entries in a big net; recognised by
    identity) and the net, prefix, hub and hubs (the hubs' host files are most of an answer
    without names; recognised by ``same_json``, cheap: their strings and dicts are shared)."""

    SHARED = frozenset({"net", "prefix", "hub", "hubs"})

    def __init__(self) -> None:
        self._names: Optional[Dict[str, str]] = None
        self._names_encoded = b""
        self._shared: Dict[str, Tuple[Any, bytes]] = {}
        self._keys: Dict[str, bytes] = {}

    def render(self, body: Dict[str, Any]) -> bytes:
        return b"{" + b",".join(self._member(key, value) for key, value in body.items()) + b"}"

    def _member(self, key: str, value: Any) -> bytes:
        head = self._keys.get(key)
        if head is None:
            head = json_bytes(key) + b":"
            if len(self._keys) < 64:  # answers have a handful of keys
                self._keys[key] = head
        if key == "names" and isinstance(value, dict):
            if value is not self._names:
                self._names, self._names_encoded = value, json_bytes(value)
            return head + self._names_encoded
        if key in self.SHARED:
            cached = self._shared.get(key)
            if cached is not None and same_json(cached[0], value):
                return head + cached[1]
            encoded = json_bytes(value)
            self._shared[key] = (value, encoded)
            return head + encoded
        return head + json_bytes(value)


def create_app(config: HubConfig, registry: Registry, batcher: ReloadBatcher,
               bootstrap_source: Optional[bytes] = None,
               rate_limiter: Optional[RateLimiter] = None,
               trusted_proxies: TrustedProxies = NO_PROXY,
               sync_interval: int = SYNC_INTERVAL,
               synced: Optional[Callable[[str], None]] = None,
               follower: Optional[RegistryFollower] = None) -> Callable[..., Awaitable[None]]:
    """The ASGI app (Starlette routes wrapped in a one-line-per-request access logger).
    ``rate_limiter`` limits POST /v1/enroll per client address (None: no limit); the client
    address is the TCP peer, or what a ``trusted_proxies`` peer says in X-Forwarded-For.
    ``synced``: told each ephemeral node whose sync succeeded (the reaper's "seen").
    ``follower``: serve's registry follower, whose names cache the enrolments share and which
    they tell what host files they wrote."""
    enroller = Enroller(config, registry, names=follower.names if follower else None,
                        host_files=follower.host_files if follower else None)
    prechecks = PrecheckPool(precheck_threads(registry.dialect))
    answers = AnswerJSON()
    syncer = SyncHandler(config, registry, sync_interval, seen=synced)
    rotator = RotateKeyHandler(config, registry)
    # key rotations per client address: the enrolment limit, in buckets of their own
    rotate_limiter = RateLimiter(rate_limiter.limit) if rate_limiter is not None else None
    if bootstrap_source is None:
        try:
            bootstrap_source = script_source()
        except OSError as exc:
            log.warning("bootstrap.py is missing (%s): GET /bootstrap.py will answer 503", exc)
    schema = openapi_schema()

    async def get_bootstrap(request: Request) -> Response:
        if bootstrap_source is None:
            return error_response(503, "bootstrap.py is not packaged with this hub")
        return Response(bootstrap_source, media_type="text/x-python; charset=utf-8")

    async def post_enroll(request: Request) -> Response:
        client = client_address(request.scope, trusted_proxies)
        refusal = over_rate_limit(rate_limiter, client, "enrolment attempts",
                                  lambda: audit_line("refused", 429, Attempt(client), "rate limit"))
        if refusal is not None:
            return refusal
        try:
            body = await read_capped_body(request)
        except BodyError as exc:
            audit_log.warning("%s", audit_line("refused", exc.status, Attempt(client), exc.message))
            return error_response(exc.status, exc.message, close=True)
        except ClientDisconnect:
            audit_log.warning("%s", audit_line("refused", 400, Attempt(client), "client disconnected"))
            return error_response(400, "client disconnected", close=True)
        # Enroller.process: the pre-check on a precheck thread, which queues the write (if
        # any) to the group commit; the wait for it in the event loop, not in a worker thread
        # (a batch can take more enrolments than there are threads). The answer after the
        # write is made here: no registry read, no file (the batch read the names), the audit line.
        enrolment = await checked_and_written(enroller, prechecks,
                                              request.headers.get("authorization"), body, client)
        outcome = enrolment.outcome
        assert outcome is not None
        if outcome.reload_needed:
            await batcher.reload()  # answer only after the SIGHUP that covers this node
        elif outcome.status == 200:
            await batcher.settled()  # a replay racing its first request's SIGHUP
        if outcome.status == 200:
            return Response(answers.render(outcome.body), media_type="application/json")
        return answer_response(outcome.status, outcome.body)

    async def post_sync(request: Request) -> Response:
        client = client_address(request.scope, trusted_proxies)
        try:
            body = await read_capped_body(request, MAX_SYNC_BODY_BYTES)
        except BodyError as exc:
            return error_response(exc.status, exc.message, close=True)
        except ClientDisconnect:
            return error_response(400, "client disconnected", close=True)
        outcome = await run_in_threadpool(syncer.process, body, client)
        return answer_response(outcome.status, outcome.body)

    async def post_rotate_key(request: Request) -> Response:
        client = client_address(request.scope, trusted_proxies)
        refusal = over_rate_limit(rotate_limiter, client, "key rotations",
                                  lambda: rotate_audit_line("refused", 429, None, client, "rate limit"))
        if refusal is not None:
            return refusal
        try:
            body = await read_capped_body(request)
        except BodyError as exc:
            return error_response(exc.status, exc.message, close=True)
        except ClientDisconnect:
            return error_response(400, "client disconnected", close=True)
        outcome = await run_in_threadpool(rotator.process, body, client)
        if outcome.reload_needed:
            await batcher.reload()  # answer only after the SIGHUP that drops the old key
        elif outcome.status == 200:
            await batcher.settled()  # a replay racing its first request's SIGHUP
        return answer_response(outcome.status, outcome.body)

    async def get_healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "net": config.net, "hub": config.name})

    async def get_openapi(request: Request) -> Response:
        return JSONResponse(schema)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc)
        return error_response(500, "internal error on the hub (see its log)")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    starlette = Starlette(
        routes=[
            Route("/bootstrap.py", get_bootstrap, methods=["GET"]),
            Route("/v1/enroll", post_enroll, methods=["POST"]),
            Route("/v1/sync", post_sync, methods=["POST"]),
            Route("/v1/rotate-key", post_rotate_key, methods=["POST"]),
            Route("/healthz", get_healthz, methods=["GET"]),
            Route("/openapi.json", get_openapi, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, 500: server_error, Exception: server_error},
    )
    return AccessLog(starlette, trusted_proxies)


class AccessLog:
    """ASGI middleware: one stderr line per request (client, method, path, status, ms; the
    client as ``ADDRESS via PROXY`` when a trusted proxy forwarded it). Headers (and so the
    token) and query strings are never logged."""

    def __init__(self, app: Callable[..., Awaitable[None]],
                 trusted_proxies: TrustedProxies = NO_PROXY) -> None:
        self.app = app
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def send_wrapper(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            client = client_address(scope, self.trusted_proxies)
            peer = client_address(scope)  # the TCP peer
            if self.trusted_proxies and client != peer:
                client = f"{client} via {peer}"
            access_log.info("%s %s %s %d %.0fms", client, scope["method"],
                            scope["path"][:200].encode("unicode_escape").decode("ascii"),
                            status[0], (time.monotonic() - started) * 1000)


def raise_open_file_limit() -> int:
    """Many concurrent connections need many descriptors: raise the soft limit to the hard one.
    Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


FD_RESERVE = 128  # descriptors kept for the registry, logs, tincd signalling, refused sockets


def connection_caps(max_total: int, max_per_address: int, trusted_proxies: TrustedProxies,
                    open_file_limit: int) -> ConnectionCaps:
    """The caps, with the total lowered to what the open-file limit allows (asyncio would
    otherwise stop accepting anyone for a second at each EMFILE), and the per-address cap
    lowered in proportion (else one address could hold every slot)."""
    allowed = max(1, open_file_limit - FD_RESERVE)
    if max_total > allowed:
        per_address = max(1, max_per_address * allowed // max_total)
        log.warning("--max-connections %d lowered to %d and --max-connections-per-address %d "
                    "to %d: the open-file limit is %d (raise LimitNOFILE= or ulimit -n)",
                    max_total, allowed, max_per_address, per_address, open_file_limit)
        max_total, max_per_address = allowed, per_address
    return ConnectionCaps(max_total, min(max_per_address, max_total), exempt=trusted_proxies)


def bind_listener(listen: str, port: int, backlog: int) -> CappedListener:
    """The listening socket, bound before uvicorn starts so a busy port is a clean error
    (its ``caps``, set later, are enforced at accept)."""
    try:
        infos = socket.getaddrinfo(listen, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise HubError(f"cannot resolve --listen {listen!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = CappedListener(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise HubError(f"cannot listen on {listen}:{port}: {exc.strerror}",
                       "is another 'tinc-hub serve' running? pick another --api-port") from None
    sock.set_inheritable(True)
    return sock


TLS_READ_BUFFER = 32 * 1024


def limit_tls_read_buffers(size: int = TLS_READ_BUFFER) -> None:
    """asyncio gives every TLS connection, at accept and before the handshake, a zero-filled
    256 KiB read buffer (``SSLProtocol.max_size``): 1000 connections (or 1000 idle sockets
    opened by anyone) cost 256 MB. A TLS record is at most ~16 KiB and reads loop, so a
    smaller buffer changes only memory. This process serves only the hub.
    Private hook (asyncio has no setting): tests/test_private_hooks.py::test_hook_tls_read_buffer."""
    import asyncio.sslproto

    if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > size:
        asyncio.sslproto.SSLProtocol.max_size = size


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.SelectorEventLoop):  # it calls sock.accept(): the caps
        raise HubError(f"the hub needs asyncio's selector event loop, not {type(loop).__name__}")
    limit_tls_read_buffers()
    original_create_server = loop.create_server

    async def create_server(*args: Any, **kwargs: Any) -> Any:
        # uvicorn does not pass a TLS handshake timeout (no setting up to 0.54); asyncio's
        # default is 60 s. Private hook: tests/test_private_hooks.py::test_hook_tls_handshake_timeout
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", HANDSHAKE_TIMEOUT)
        return await original_create_server(*args, **kwargs)

    loop.create_server = create_server  # type: ignore[method-assign]  # this loop only
    await server.serve(sockets=[sock])


def exposures_trigger(state_dir: StateDir, config: HubConfig, registry: Registry) -> Callable[[], None]:
    """How serve's follower gets the exposures' rules applied: under systemd the API is
    sandboxed without capabilities, so it touches the stamp file that tinc-hub-expose.path
    watches (the root oneshot then reads the registry itself); without systemd (--init none,
    sysv, rc.local: hub.json's init) serve runs as root unconfined and applies them itself."""
    from .exposure import apply_now
    from .hostfiles import write_if_changed
    from .service import EXPOSE_STAMP

    if config.init == "systemd":
        stamp = state_dir.root / EXPOSE_STAMP
        return lambda: write_if_changed(stamp, f"{time.time_ns()}\n", 0o600) and None
    return lambda: apply_now(state_dir, registry) and None


def serve(state_dir: StateDir, registry_url: Optional[str] = None,
          registry_password_file: Optional[str] = None, listen: str = "0.0.0.0", port: Optional[int] = None,
          rate_limit: Optional[RateLimit] = parse_rate_limit(DEFAULT_RATE_LIMIT),
          trusted_proxies: TrustedProxies = NO_PROXY,
          max_connections: int = DEFAULT_MAX_CONNECTIONS,
          max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
          sync_interval: int = SYNC_INTERVAL) -> int:
    """Run the HTTPS API until SIGINT/SIGTERM (enrolment attempts per client address
    limited by ``rate_limit``, None: unlimited; X-Forwarded-For read only from
    ``trusted_proxies``; concurrent connections capped at accept, before TLS)."""
    config = state_dir.load_config()
    pin = pin_of_cert_file(state_dir.cert_file)  # a missing/broken cert is a clean error
    if not state_dir.key_file.exists():
        raise HubError(f"TLS key {state_dir.key_file} is missing", "re-run 'tinc-hub init'")
    port = port or config.api_port
    sock = bind_listener(listen, port, BACKLOG)
    registry = Registry.for_state(state_dir, registry_url, registry_password_file, keep_connections=True)
    registry.ensure_schema()
    log.info("registry: %s", registry.describe())
    # this hub's place in the registry (a hub of an older tinc-hub records itself here)
    # (mid-rotation, the staged key the registry already holds: key_rotation.py)
    register_hub(registry, hub_row(config, public_key_to_record(config, registry), pin), config.net,
                 config.vpn_subnet)
    # one pace for every SIGHUP of this process: enrolments, the follower, the reaper
    reloader = TincdReloader(config.net, config.tinc_dir)
    follower = RegistryFollower(config, registry, reloader.reload,
                                state_root=state_dir.root,
                                exposures_changed=exposures_trigger(state_dir, config, registry))
    follower.catch_up()  # hosts/ and tinc.conf as the registry says, before the first answer
    follower.start()
    reaper = Reaper(config, registry, state_dir.root, reloader.reload)
    reaper.start()
    caps = connection_caps(max_connections, max_connections_per_address, trusted_proxies,
                           raise_open_file_limit())
    sock.caps = caps
    batcher = ReloadBatcher(reloader.reload, due_in=reloader.due_in)
    app = create_app(config, registry, batcher,
                     rate_limiter=RateLimiter(rate_limit) if rate_limit is not None else None,
                     trusted_proxies=trusted_proxies, sync_interval=sync_interval,
                     synced=reaper.note_sync, follower=follower)
    uv_config = uvicorn.Config(
        app,
        host=listen,
        port=port,
        ssl_certfile=str(state_dir.cert_file),
        ssl_keyfile=str(state_dir.key_file),
        http=HeaderTimeoutH11Protocol,
        loop="asyncio",  # documents it: _serve runs on asyncio.run's selector loop
        proxy_headers=False,  # uvicorn would trust X-Forwarded-For from 127.0.0.1: client_address()
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        backlog=BACKLOG,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(uv_config)
    log.info("serving net %s on https://%s:%d (pin %s; enrolment rate limit per address: %s; "
             "connections: at most %d, %d per address; trusted proxies: %s)",
             config.net, listen, port, pin, rate_limit or "off", caps.max_total,
             caps.max_per_address, trusted_proxies)
    # Everything loaded so far (the modules: SQLAlchemy's alone are ~20k objects) lives as long
    # as the process: out of the cyclic GC's sight, so its full passes under load stay short.
    gc.freeze()
    try:
        asyncio.run(_serve(server, sock))
    finally:
        reaper.stop()
        follower.stop()
        sock.close()
    return 0 if server.started else 1

