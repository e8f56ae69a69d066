"""The hub's HTTPS API under abuse: forged X-Forwarded-For/Forwarded headers, and floods of
idle connections, against the real ``tinc-hub serve`` on loopback (127.0.0.x source
addresses), plus the client-address rule and the accept-time caps on real sockets.

Everything stays on 127.0.0.0/8; every wait is bounded; every socket and server is closed
on exit.
"""

import asyncio
import gc
import ipaddress
import multiprocessing
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinc_hub import cli
from tinc_hub.app import FD_RESERVE, connection_caps
from tinc_hub import client_address as client_address_module
from tinc_hub.client_address import LONGEST_IP_TEXT, TrustedProxies, client_address, forwarded_chain, parse_ip
from tinc_hub.connection_caps import (DEFAULT_MAX_CONNECTIONS_PER_ADDRESS, REFUSALS_PER_ACCEPT,
                                      CappedListener, ConnectionCaps)
from hub_fixtures import HubEnv, init_hub, wait_until
from labkit.loopback_hub import HOST, Enrolment, HubProcess, Reply, free_port, post_enroll, public_keys, raise_fd_limit

ATTACKER = "127.0.0.2"  # the flooding / forging client
HONEST = "127.0.0.3"  # another machine enrolling meanwhile


# ------------------------------------------------------------------- the client address

def scope(peer: str, *headers: Tuple[str, str]) -> Dict[str, object]:
    return {"client": (peer, 40000), "headers": [(n.lower().encode(), v.encode()) for n, v in headers]}


PROXIES = TrustedProxies.parse("10.0.0.0/24, 192.0.2.7, fd00::/64")


NO = TrustedProxies()


@pytest.mark.parametrize("peer,headers,trusted,expected", [
    # no trusted proxy configured: the peer, whatever the headers say
    ("203.0.113.9", [("X-Forwarded-For", "198.51.100.1")], NO, "203.0.113.9"),
    ("127.0.0.1", [("X-Forwarded-For", "198.51.100.1")], NO, "127.0.0.1"),
    ("203.0.113.9", [("Forwarded", "for=198.51.100.1")], NO, "203.0.113.9"),
    ("::ffff:203.0.113.9", [], NO, "203.0.113.9"),
    # a peer that is not a trusted proxy: its headers are ignored
    ("203.0.113.9", [("X-Forwarded-For", "10.0.0.1")], PROXIES, "203.0.113.9"),
    # a trusted proxy: the right-most address that is not a trusted proxy
    ("10.0.0.5", [("X-Forwarded-For", "198.51.100.1")], PROXIES, "198.51.100.1"),
    ("10.0.0.5", [("X-Forwarded-For", "6.6.6.6, 198.51.100.1")], PROXIES, "198.51.100.1"),
    ("10.0.0.5", [("X-Forwarded-For", "6.6.6.6, 198.51.100.1, 192.0.2.7, 10.0.0.9")], PROXIES,
     "198.51.100.1"),
    ("10.0.0.5", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.1")], PROXIES,
     "198.51.100.1"),
    ("::ffff:10.0.0.5", [("X-Forwarded-For", "198.51.100.1")], PROXIES, "198.51.100.1"),
    ("fd00::1", [("X-Forwarded-For", "2001:db8::1")], PROXIES, "2001:db8::1"),
    ("10.0.0.5", [("X-Forwarded-For", "::ffff:198.51.100.1")], PROXIES, "198.51.100.1"),
    # malformed hops end the walk at the last address vouched for
    ("10.0.0.5", [("X-Forwarded-For", "198.51.100.1:4711")], PROXIES, "10.0.0.5"),
    ("10.0.0.5", [("X-Forwarded-For", "6.6.6.6, unknown, 192.0.2.7")], PROXIES, "192.0.2.7"),
    ("10.0.0.5", [("X-Forwarded-For", "")], PROXIES, "10.0.0.5"),
    ("10.0.0.5", [("X-Forwarded-For", "[2001:db8::1]")], PROXIES, "10.0.0.5"),
    ("10.0.0.5", [("X-Forwarded-For", "2001:db8::1%1")], PROXIES, "10.0.0.5"),
    ("10.0.0.5", [("X-Forwarded-For", " 198.51.100.1\t")], PROXIES, "198.51.100.1"),
    # only trusted hops: the left-most
    ("10.0.0.5", [("X-Forwarded-For", "10.0.0.7, 192.0.2.7")], PROXIES, "10.0.0.7"),
    # Forwarded (RFC 7239) is never read, even from a trusted proxy
    ("10.0.0.5", [("Forwarded", "for=198.51.100.1")], PROXIES, "10.0.0.5"),
    ("10.0.0.5", [], PROXIES, "10.0.0.5"),
])
def test_client_address(peer: str, headers: List[Tuple[str, str]], trusted: TrustedProxies,
                        expected: str) -> None:
    assert client_address(scope(peer, *headers), trusted) == expected


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=200)


@settings(max_examples=300, deadline=None)
@given(forged=st.lists(st.tuples(st.sampled_from(["X-Forwarded-For", "Forwarded", "X-Real-IP"]),
                                 header_text), max_size=4))
def test_untrusted_peer_is_the_client_whatever_it_sends(forged: List[Tuple[str, str]]) -> None:
    assert client_address(scope("203.0.113.9", *forged), PROXIES) == "203.0.113.9"


@settings(max_examples=300, deadline=None)
@given(prefix=header_text, client=st.ip_addresses(v=4).filter(lambda a: a not in PROXIES))
def test_text_left_of_the_proxys_entry_never_matters(prefix: str, client) -> None:
    """What a trusted proxy appended (the address it saw) wins over anything the client put
    before it in X-Forwarded-For."""
    value = f"{prefix},{client}" if prefix else str(client)
    assert client_address(scope("10.0.0.5", ("X-Forwarded-For", value)), PROXIES) == str(client)
    assert forwarded_chain([(b"x-forwarded-for", value.encode("latin-1"))])[-1] == str(client)


# parse_ip's rule without its length cut and its memory: ipaddress itself
parse_ip_uncached = client_address_module._parse_short_ip.__wrapped__


IP_TEXTS = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.integers(0, 2 ** 32 - 1).map(lambda n: "0000:0000:0000:0000:0000:ffff:" + str(ipaddress.IPv4Address(n))),
    st.text(alphabet="0123456789abcdefABCDEF:.%/ []", max_size=60),
    st.from_regex(r"\A(0{0,3}[0-9a-f]{1,4}:){7}0{0,3}[0-9a-f]{1,4}\Z"),
)


@given(IP_TEXTS)
@settings(max_examples=500, deadline=None)
def test_parse_ip_remembered_and_cut_agrees_with_ipaddress(text: str) -> None:
    """The length cut (nothing longer than LONGEST_IP_TEXT is an IP literal) and the memory
    change no answer: the same text twice, and the straight ipaddress parse, agree."""
    expected = parse_ip_uncached(text)
    assert parse_ip(text) == expected
    assert parse_ip(text) == expected
    if expected is not None:
        assert len(text) <= LONGEST_IP_TEXT


def test_the_longest_ip_literal_is_longest_ip_text_long() -> None:
    longest = "0000:0000:0000:0000:0000:ffff:255.255.255.255"
    assert len(longest) == LONGEST_IP_TEXT and parse_ip(longest) == ipaddress.IPv4Address("255.255.255.255")
    assert parse_ip("0" + longest) is None and parse_ip_uncached("0" + longest) is None


@pytest.mark.parametrize("text,networks", [
    ("10.0.0.5", ["10.0.0.5/32"]), ("10.1.0.0/16, 192.0.2.1", ["10.1.0.0/16", "192.0.2.1/32"]),
    ("fd00::/8", ["fd00::/8"]), ("::ffff:10.0.0.5", ["10.0.0.5/32"]),
])
def test_trusted_proxies_parse(text: str, networks: List[str]) -> None:
    assert [str(n) for n in TrustedProxies.parse(text).networks] == networks


@pytest.mark.parametrize("text", ["", "10.0.0.1/8", "proxy.example", "10.0.0.0/33", "0.0.0.0/0",
                                  "::/0", "10.0.0.5,", "10.0.0.5:80", " 10.0.0.5 10.0.0.6"])
def test_trusted_proxies_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        TrustedProxies.parse(text)


def test_serve_options_and_env_twins(monkeypatch, capsys) -> None:
    args = cli.build_parser().parse_args(["serve"])
    assert not args.trusted_proxy and args.max_connections_per_address == DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    args = cli.build_parser().parse_args(["serve", "--trusted-proxy", "10.0.0.0/8,192.0.2.1",
                                          "--trusted-proxy", "fd00::1", "--max-connections", "50",
                                          "--max-connections-per-address", "5"])
    assert str(args.trusted_proxy) == "10.0.0.0/8,192.0.2.1/32,fd00::1/128"
    assert (args.max_connections, args.max_connections_per_address) == (50, 5)
    monkeypatch.setenv("TINC_HUB_TRUSTED_PROXY", "192.0.2.0/24")
    monkeypatch.setenv("TINC_HUB_MAX_CONNECTIONS_PER_ADDRESS", "7")
    args = cli.build_parser().parse_args(["serve"])
    assert (str(args.trusted_proxy), args.max_connections_per_address) == ("192.0.2.0/24", 7)
    args = cli.build_parser().parse_args(["serve", "--trusted-proxy", "10.0.0.1"])
    assert str(args.trusted_proxy) == "10.0.0.1/32"  # the command line replaces the env twin
    monkeypatch.delenv("TINC_HUB_TRUSTED_PROXY")
    for argv in (["serve", "--trusted-proxy", "10.0.0.1/8"], ["serve", "--max-connections", "0"]):
        assert cli.main(argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tinc-hub: error: ") and "hint:" in err
    assert cli.main(["serve", "--trusted-proxy", "10.0.0.1/8"]) == cli.EXIT_USAGE
    assert "host bits must be zero" in capsys.readouterr().err
    monkeypatch.setenv("TINC_HUB_TRUSTED_PROXY", "everyone")
    assert cli.main(["serve"]) == cli.EXIT_USAGE
    assert "$TINC_HUB_TRUSTED_PROXY" in capsys.readouterr().err


# ------------------------------------------------- the accept-time caps on real sockets

def reset_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the other end reset/closed ``sock`` (within ``timeout``)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture
def listener() -> Iterator[CappedListener]:
    sock = CappedListener(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(128)
    sock.setblocking(False)  # as asyncio uses it: accept() until BlockingIOError
    yield sock
    sock.close()


def connect_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((HOST, port))
    return sock


def test_capped_listener_resets_over_cap_and_frees_slots_on_close(listener: CappedListener) -> None:
    caps = listener.caps = ConnectionCaps(max_total=3, max_per_address=2)
    port = listener.getsockname()[1]
    clients = [connect_from(ATTACKER, port) for _ in range(3)] + [connect_from(HONEST, port)]
    try:
        first, _ = listener.accept()
        second, _ = listener.accept()
        third, peer = listener.accept()  # the attacker's third is reset inside this call
        assert peer[0] == HONEST
        assert reset_by_peer(clients[2]) and not reset_by_peer(clients[0], 0.2)
        assert (caps.total, caps.held_from(ATTACKER), caps.held_from(HONEST)) == (3, 2, 1)
        extra = connect_from("127.0.0.4", port)  # total cap reached: reset
        with pytest.raises(BlockingIOError):
            listener.accept()
        assert reset_by_peer(extra)
        extra.close()
        first.close()  # a slot comes back when the server closes
        again = connect_from(ATTACKER, port)
        fourth, peer = listener.accept()
        assert peer == again.getsockname() and caps.held_from(ATTACKER) == 2
        del fourth  # never closed: the garbage collector gives the slot back
        gc.collect()
        assert caps.total == 2 and caps.held_from(ATTACKER) == 1
        for sock in (second, third, again):
            sock.close()
    finally:
        for sock in clients:
            sock.close()


def test_trusted_proxy_is_exempt_from_the_per_address_cap_only(listener: CappedListener) -> None:
    listener.caps = ConnectionCaps(max_total=4, max_per_address=1,
                                   exempt=TrustedProxies.parse(ATTACKER))
    port = listener.getsockname()[1]
    clients = [connect_from(ATTACKER, port) for _ in range(5)]
    accepted = []
    try:
        for _ in range(4):
            accepted.append(listener.accept()[0])
        with pytest.raises(BlockingIOError):
            listener.accept()  # the fifth is over the total cap
        assert reset_by_peer(clients[4]) and listener.caps.total == 4
    finally:
        for sock in clients + accepted:
            sock.close()


def test_one_accept_call_refuses_a_bounded_number(listener: CappedListener) -> None:
    """A flood of over-cap connections costs the event loop at most REFUSALS_PER_ACCEPT
    resets per accept() call; asyncio treats ConnectionAbortedError as "try next tick"."""
    listener.caps = ConnectionCaps(max_total=10, max_per_address=0)
    port = listener.getsockname()[1]
    clients = [connect_from(ATTACKER, port) for _ in range(REFUSALS_PER_ACCEPT + 6)]
    try:
        with pytest.raises(ConnectionAbortedError):
            listener.accept()
        with pytest.raises(BlockingIOError):
            listener.accept()  # the 6 left, then the queue is empty
        assert all(reset_by_peer(sock) for sock in clients)
        assert listener.caps.total == 0
    finally:
        for sock in clients:
            sock.close()


def test_a_total_cap_lowered_by_the_open_file_limit_lowers_the_per_address_cap_alike() -> None:
    """Under `ulimit -n 1024` the total drops to 896: the per-address cap must drop with it,
    or one address could again hold every slot (the defaults keep 4 addresses' worth)."""
    caps = connection_caps(4096, 1024, TrustedProxies(), open_file_limit=1024)
    assert caps.max_total == 1024 - FD_RESERVE
    assert caps.max_per_address == caps.max_total // 4
    roomy = connection_caps(4096, 1024, TrustedProxies(), open_file_limit=65536)
    assert (roomy.max_total, roomy.max_per_address) == (4096, 1024)
    assert connection_caps(4096, 1024, TrustedProxies(), open_file_limit=130).max_per_address == 1


# ------------------------------------------------------------------ the real server

class Hub:
    def __init__(self, root: Path, extra: Tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.env: HubEnv = init_hub(root, vpn_subnet="10.92.0.0/16", api_port=self.port)
        self.log = root / "serve.log"
        self.server = HubProcess(self.env.state.root, self.port, self.env.state.cert_file,
                                 self.log, extra=list(extra))

    def context(self) -> ssl.SSLContext:
        return self.server.ssl_context()


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator:
    made: List[Hub] = []

    def make(*extra: str) -> Hub:
        hub = Hub(tmp_path / f"hub{len(made)}", extra)
        made.append(hub)
        hub.server.start()
        return hub

    yield make
    for hub in made:
        hub.server.stop()


@pytest.fixture(scope="module")
def keys() -> List[str]:
    return public_keys(40)


def post_sequence(hub: Hub, keys: List[str], count: int, tag: str,
                  headers_of=lambda i: None) -> List[Reply]:
    token = hub.env.token(uses=count).token

    async def run() -> List[Reply]:
        return [await post_enroll(hub.port, hub.context(), Enrolment(token, f"{tag}{i}", keys[i]),
                                  timeout=20, headers=headers_of(i)) for i in range(count)]

    return asyncio.run(run())


LIMIT, EXTRA = 3, 4  # --rate-limit 3/10min, then 4 more attempts at once


def forged(i: int) -> Dict[str, str]:
    return {"X-Forwarded-For": f"198.51.100.{i + 1}",
            "Forwarded": f"for=198.51.100.{i + 1}", "X-Real-IP": f"198.51.100.{i + 1}"}


def test_rotating_forwarded_headers_does_not_escape_the_rate_limit(make_hub, keys: List[str]) -> None:
    """From 127.0.0.1 (which uvicorn alone would trust): N+k attempts, each naming another
    client in X-Forwarded-For/Forwarded, get exactly the 429s that N+k plain attempts get.
    Positive control: with --trusted-proxy 127.0.0.1 the same rotation spreads them."""
    rate = ("--rate-limit", f"{LIMIT}/10min")
    plain = post_sequence(make_hub(*rate), keys, LIMIT + EXTRA, "plain")
    hub = make_hub(*rate)
    rotated = post_sequence(hub, keys, LIMIT + EXTRA, "rot", forged)
    expected = [200] * LIMIT + [429] * EXTRA
    assert [r.status for r in plain] == expected, plain
    assert [r.status for r in rotated] == expected, rotated
    # the access line is written after the reply is sent: wait for the last one, then read
    assert wait_until(lambda: access_lines(hub, "POST /v1/enroll 429") == EXTRA, 10), hub.log.read_text()
    assert all("too many enrolment attempts from 127.0.0.1;" in r.body["error"]
               for r in rotated if r.status == 429)
    assert "198.51.100." not in hub.log.read_text(), "a forged address reached the log"
    # each refusal by the rate limit is an audit line too, with the real client address
    throttled = [line for line in hub.log.read_text().splitlines()
                 if " tinc_hub.audit " in line and "status=429" in line]
    assert len(throttled) == EXTRA, throttled
    assert all(line.endswith('result=refused status=429 name=- address=- client=127.0.0.1'
                             ' token=- reason="rate limit"') for line in throttled), throttled

    proxied = make_hub(*rate, "--trusted-proxy", "127.0.0.1")
    spread = post_sequence(proxied, keys, LIMIT + EXTRA, "via", forged)
    assert [r.status for r in spread] == [200] * (LIMIT + EXTRA), spread
    assert wait_until(lambda: access_lines(proxied, "POST /v1/enroll 200") == LIMIT + EXTRA, 10)
    assert "198.51.100.7 via 127.0.0.1 POST /v1/enroll 200" in proxied.log.read_text()


def access_lines(hub: Hub, request_and_status: str) -> int:
    """How many access-log lines of the hub end with this request and status."""
    return sum(1 for line in hub.log.read_text().splitlines()
               if " tinc_hub.access " in line and request_and_status in line)


def socket_inodes(pid: int) -> set:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def held_from(pid: int, port: int, remote: str) -> int:
    """TCP connections the process ``pid`` holds on local ``port`` from ``remote`` (the
    server's own view, from /proc). Only sockets open both before and after reading the TCP
    table count, so they were all open at one instant, and each once (the kernel may list a
    socket twice while the table changes): never an overcount."""
    before = socket_inodes(pid)
    with open("/proc/net/tcp") as table:
        rows = table.read().splitlines()[1:]
    both = before & socket_inodes(pid)
    remote_hex = socket.inet_aton(remote)[::-1].hex().upper()
    held = set()
    for row in rows:
        fields = row.split()
        if (int(fields[1].split(":")[1], 16) == port and fields[2].split(":")[0] == remote_hex
                and fields[9] in both):
            held.add(fields[9])
    return len(held)


FLOOD = 2000
RETRY = 1.0  # an attacker connection that was reset tries again after this long


class Flood:
    """FLOOD connections from ATTACKER kept open and idle for as long as the hub lets them:
    each one that is reset (over the cap) or closed (the hub's handshake/header timeouts)
    is opened again after RETRY s, until ``stop``. ``tls``: each completes the TLS handshake
    and then sends nothing; otherwise it never starts TLS."""

    def __init__(self, port: int, context: Optional[ssl.SSLContext]) -> None:
        self.port, self.context = port, context
        self.stop = asyncio.Event()
        self.opened = self.refused = 0

    async def _one(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    HOST, self.port, ssl=self.context,
                    server_hostname=HOST if self.context else None,
                    local_addr=(ATTACKER, 0)), 30)
            except (OSError, asyncio.TimeoutError):  # reset at accept: no TLS handshake
                self.refused += 1
                await asyncio.sleep(RETRY)
                continue
            self.opened += 1
            closed = asyncio.ensure_future(reader.read(1))  # b"" or a reset: the hub closed it
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in (closed, stopped):
                task.cancel()
            writer.close()
            if time.monotonic() - started < 1.0:
                self.refused += 1  # a plain connection learns of its reset when it reads
                await asyncio.sleep(RETRY)

    async def run(self) -> None:
        await asyncio.gather(*(self._one() for _ in range(FLOOD)), return_exceptions=True)


def flood_process(port: int, cafile: Optional[str], stop, result) -> None:
    """A child process (its own CPU and event loop, so the test's timings are the hub's):
    the Flood until ``stop`` is set, or 180 s at most; sends back (opened, refused)."""
    raise_fd_limit(FLOOD + 256)

    async def main() -> None:
        flood = Flood(port, ssl.create_default_context(cafile=cafile) if cafile else None)
        attack = asyncio.ensure_future(flood.run())
        await asyncio.get_running_loop().run_in_executor(None, stop.wait, 180)
        flood.stop.set()
        await asyncio.wait_for(attack, 60)
        result.send((flood.opened, flood.refused))

    asyncio.run(main())


@pytest.mark.parametrize("tls", [True, False], ids=["tls-then-idle", "never-handshake"])
def test_2000_idle_connections_from_one_address_do_not_stop_another(make_hub, keys: List[str],
                                                                      tls: bool) -> None:
    """2000 idle connections from 127.0.0.2, kept up (default caps): the hub holds at most
    --max-connections-per-address of them, resets the rest at accept, and enrolments from
    127.0.0.3 meanwhile answer within 3 s each."""
    raise_fd_limit(FLOOD + 512)
    hub = make_hub()
    cap = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    token = hub.env.token(uses=5).token
    samples: List[int] = []
    found: Dict[str, object] = {}

    def sample() -> int:
        samples.append(held_from(hub.server.pid, hub.port, ATTACKER))
        return samples[-1]

    async def enrol_meanwhile() -> List[Reply]:
        replies = []
        for i in range(5):
            sample()
            replies.append(await post_enroll(hub.port, hub.context(), Enrolment(token, f"honest{i}", keys[i]),
                                             timeout=10, source=HONEST))
        sample()
        return replies

    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    result, child_end = spawn.Pipe(duplex=False)
    flood = spawn.Process(target=flood_process, daemon=True,
                          args=(hub.port, str(hub.env.state.cert_file) if tls else None, stop, child_end))
    flood.start()
    try:
        started = time.monotonic()
        assert wait_until(lambda: sample() >= cap, 60, 0.2), \
            f"the flood never reached the cap: {samples[-10:]}"
        found["saturated_after"] = time.monotonic() - started
        found["rss_mb"] = hub.server.rss_mb()
        found["replies"] = asyncio.run(enrol_meanwhile())
    finally:
        stop.set()
        got = result.poll(90)
        flood.join(30)
        if flood.is_alive():
            flood.kill()
            flood.join(10)
    assert got, "the flood process did not report"
    found["opened"], found["refused"] = result.recv()
    replies: List[Reply] = found["replies"]
    print(f"flood of {FLOOD}: hub held {cap} after {found['saturated_after']:.1f} s; "
          f"held samples {min(samples)}..{max(samples)}; attacker resets {found['refused']}; "
          f"RSS {found['rss_mb']:.0f} MB; enrolments from {HONEST}: "
          f"{', '.join(f'{r.seconds:.2f}' for r in replies)} s")
    assert max(samples) == cap, f"the hub never held {cap} connections from {ATTACKER}: {samples}"
    assert all(n <= cap for n in samples), samples
    assert found["refused"] >= FLOOD - cap, "the cap never reset the attacker's extra connections"
    assert [r.status for r in replies] == [200] * 5, replies
    slowest = max(r.seconds for r in replies)
    assert slowest <= 3.0, f"an enrolment from {HONEST} took {slowest:.2f} s during the flood"
    assert f"(e.g. {ATTACKER}: {cap} connections from it" in hub.log.read_text()
    assert wait_until(lambda: held_from(hub.server.pid, hub.port, ATTACKER) == 0, 20, 0.1)
    assert hub.server.healthy()


def test_total_cap_resets_everyone_until_a_slot_frees(make_hub, keys: List[str]) -> None:
    """--max-connections 30 --max-connections-per-address 20: 20 from one address and 10
    from another fill it; a third address is reset before TLS; a freed slot lets it in."""
    hub = make_hub("--max-connections", "30", "--max-connections-per-address", "20")
    token = hub.env.token(uses=2).token
    context = hub.context()

    async def scenario() -> Tuple[List[Reply], int]:
        async def hold(source: str, count: int) -> List[asyncio.StreamWriter]:
            out = []
            for _ in range(count):  # one by one: the order decides who is over the cap
                _, writer = await asyncio.open_connection(HOST, hub.port, local_addr=(source, 0))
                out.append(writer)
            return out

        first = await hold(ATTACKER, 20)
        second = await hold("127.0.0.4", 10)
        assert wait_until(lambda: held_from(hub.server.pid, hub.port, "127.0.0.4") == 10, 5)
        refused = await post_enroll(hub.port, context, Enrolment(token, "late0", keys[0]),
                                    timeout=10, source=HONEST)
        held = held_from(hub.server.pid, hub.port, ATTACKER)
        for writer in first[:5]:
            writer.close()
        await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        while held_from(hub.server.pid, hub.port, ATTACKER) > 15 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        admitted = await post_enroll(hub.port, context, Enrolment(token, "late1", keys[1]),
                                     timeout=10, source=HONEST)
        for writer in first[5:] + second:
            writer.close()
        return [refused, admitted], held

    (refused, admitted), held = asyncio.run(scenario())
    assert held == 20
    assert refused.status == 0 and refused.seconds < 2.0, refused  # reset: no TLS, no HTTP
    assert admitted.status == 200, admitted


def test_a_node_reset_by_the_cap_retries_and_gets_in(make_hub, keys: List[str]) -> None:
    """bootstrap.py treats a reset at accept like an unreachable hub: it backs off and
    retries, so a fleet behind one NAT address over the per-address cap is slowed, not failed."""
    from bootstrap import bootstrap

    hub = make_hub("--max-connections-per-address", "1")
    issued = hub.env.token(uses=1)
    holder = socket.create_connection((HOST, hub.port))  # takes 127.0.0.1's only slot
    waits: List[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if holder.fileno() != -1:
            holder.close()  # the slot frees while the node waits
        time.sleep(seconds)

    try:
        assert wait_until(lambda: held_from(hub.server.pid, hub.port, HOST) == 1, 5)
        answer = bootstrap.enroll(issued.token, bootstrap.decode_token(issued.token), HOST, hub.port,
                                  "natted", keys[0], timeout=30, sleep=sleep)
    finally:
        holder.close()
    assert answer["name"] == "natted" and len(waits) >= 1
