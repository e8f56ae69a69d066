"""labkit.traffic: traffic measurements between netlab hosts (bench/vpn_throughput.py).

TCP throughput with iperf3 (Debian's package, ``-J`` output), latency with iputils ping, the
CPU time a process used (/proc/PID/stat), round trips through a TCP echo service (where ICMP
cannot go: a DNATed port) and the machine's busy share (/proc/stat), and byte
counters of tinc's port in a host (nftables named counters): all real, nothing simulated.
Every command is bounded in time; traffic only flows between namespaces the caller made.
"""

import ipaddress
import json
import os
import re
import shutil
import statistics
import time
from typing import Dict, List, NamedTuple, Optional

from labkit import netlab

IPERF_PORT = 5201
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def iperf3_missing() -> Optional[str]:
    """One line saying what is missing, or None when iperf3 is installed."""
    if shutil.which("iperf3", path=netlab.HOST_PATH):
        return None
    return "iperf3 not found: install Debian's iperf3 package (tests/setup-env does)"


class TcpResult(NamedTuple):
    bits_per_second: float  # as received by the server
    retransmits: int
    mss: int  # the client's TCP MSS (after the SYN exchange: shows MSS clamping)


def start_iperf_server(host: netlab.Host, port: int = IPERF_PORT) -> netlab.Proc:
    """A long-lived ``iperf3 -s`` in host (stopped with the topology); waits for its socket."""
    proc = host.popen(["iperf3", "-s", "-p", str(port)], log="%s.iperf3-server.log" % host.name)
    host.wait_listening(port, 10)
    return proc


def json_object(text: str, tool: str) -> dict:
    """The JSON object ``tool`` printed; ValueError naming the tool when it is none."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("%s printed no JSON: %r" % (tool, text[:200])) from None
    if not isinstance(data, dict):
        raise ValueError("%s printed JSON that is not an object" % tool)
    return data


def parse_iperf3_json(text: str) -> TcpResult:
    """The figures of one ``iperf3 -c ... -J`` TCP test; ValueError when it reports an error
    or lacks them."""
    data = json_object(text, "iperf3")
    if data.get("error"):
        raise ValueError("iperf3: %s" % data["error"])
    try:
        received = data["end"]["sum_received"]["bits_per_second"]
        retransmits = data["end"]["sum_sent"].get("retransmits", 0)
        mss = data["start"].get("tcp_mss_default", 0)
    except (KeyError, TypeError, AttributeError):
        raise ValueError("iperf3 JSON lacks end.sum_received / end.sum_sent") from None
    if not isinstance(received, (int, float)) or received < 0:
        raise ValueError("iperf3 bits_per_second is not a number: %r" % (received,))
    return TcpResult(float(received), int(retransmits or 0), int(mss or 0))


def tcp_throughput(client: netlab.Host, address: str, seconds: int, omit: int = 1,
                   port: int = IPERF_PORT) -> TcpResult:
    """One iperf3 TCP test client -> address:port for `seconds` (the first `omit` seconds,
    TCP's slow start, not counted)."""
    cp = client.run(["iperf3", "-c", address, "-p", str(port), "-t", str(seconds),
                     "-O", str(omit), "-J", "--connect-timeout", "3000"],
                    timeout=seconds + omit + 30, check=False)
    try:
        return parse_iperf3_json(cp.stdout)
    except ValueError as e:
        raise RuntimeError("iperf3 %s -> %s: %s %s" % (client.name, address, e,
                                                       cp.stderr.strip()[:300])) from None


PING_TIME_RE = re.compile(r"\btime=([0-9]+(?:\.[0-9]+)?) ms\b")


def ping_times(text: str) -> List[float]:
    """The round-trip times (ms) of iputils ping's reply lines."""
    return [float(m.group(1)) for m in PING_TIME_RE.finditer(text)]


def median_rtt_ms(client: netlab.Host, address: str, count: int,
                  interval: float = 0.02) -> Optional[float]:
    """Median round trip (ms) of `count` pings at `interval` s; None when none came back."""
    cp = client.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address],
                    timeout=count * interval + 10, check=False)
    times = ping_times(cp.stdout)
    return statistics.median(times) if times else None


class LoadedPinger:
    """Pings running alongside a throughput test (the round trip under load: the queues a
    bulk transfer fills, socket buffers included). start(), then rtt_ms() once the test ended."""

    def __init__(self, client: netlab.Host, address: str, seconds: int,
                 interval: float = 0.05) -> None:
        self.seconds = seconds
        self.proc = client.popen(["ping", "-n", "-i", str(interval), "-W", "1", "-w",
                                  str(seconds), address], log="%s.loaded-ping.log" % client.name)

    def rtt_ms(self) -> Optional[float]:
        """Median round trip (ms) once ping ended (-w bounds it); None if nothing came back."""
        self.proc.wait(timeout=self.seconds + 10)
        times = ping_times(self.proc.output())
        return statistics.median(times) if times else None


# A TCP echo service and its probe: the round trip of a path ICMP cannot take (a port the hub
# publishes is DNATed; a ping to the hub's public address stops at the hub). The server greets
# each connection with the address it sees the client as (what source NAT did), then echoes
# bytes; the probe sends one byte at a time over one connection (TCP_NODELAY) and times the
# echo. Both run with the machine's python3 inside the namespaces.
TCP_ECHO_SERVER = r"""
import socket, socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(60)
        conn.sendall(("%s\n" % self.client_address[0]).encode("ascii"))
        while True:
            data = conn.recv(64)
            if not data:
                return
            conn.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
"""

TCP_ECHO_PROBE = r"""
import json, socket, sys, time
address, port, count, interval, limit = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                         float(sys.argv[4]), float(sys.argv[5]))
deadline = time.monotonic() + limit
peer, times, error = "", [], None
try:
    conn = socket.create_connection((address, port), timeout=3)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    greeting = b""
    while not greeting.endswith(b"\n") and len(greeting) < 64:
        byte = conn.recv(1)
        if not byte:
            break
        greeting += byte
    peer = greeting.decode("ascii", "replace").strip()
    while len(times) < count and time.monotonic() < deadline:
        started = time.perf_counter()
        conn.sendall(b"x")
        if conn.recv(1) != b"x":
            error = "the echo did not come back"
            break
        times.append((time.perf_counter() - started) * 1000.0)
        time.sleep(interval)
    conn.close()
except OSError as e:
    error = str(e)
print(json.dumps({"peer": peer, "rtt_ms": times, "error": error}))
"""


class EchoResult(NamedTuple):
    peer: str  # the client's address as the echo service saw it
    rtt_ms: List[float]


def start_tcp_echo_server(host: netlab.Host, port: int, address: str = "0.0.0.0") -> netlab.Proc:
    """A long-lived TCP echo service in host (stopped with the topology); waits for its socket."""
    proc = host.popen(["python3", "-c", TCP_ECHO_SERVER, address, str(port)],
                      log="%s.tcp-echo-%d.log" % (host.name, port))
    host.wait_listening(port, 10)
    return proc


def parse_echo_probe(text: str) -> EchoResult:
    """The JSON line TCP_ECHO_PROBE prints; ValueError when it failed before any echo, saw
    no IPv4 peer address, or holds anything but a list of non-negative times."""
    data = json_object(text, "the echo probe")
    times = data.get("rtt_ms")
    if not isinstance(times, list) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in times):
        raise ValueError("echo probe times are not a list of numbers")
    if not times:
        raise ValueError("no echo came back: %s" % (data.get("error") or "no reply"))
    peer = data.get("peer")
    try:
        if not isinstance(peer, str):
            raise ValueError(peer)
        ipaddress.IPv4Address(peer)
    except ValueError:
        raise ValueError("the echo service greeted with %r, not an IPv4 address" % (peer,)) \
            from None
    return EchoResult(peer, [float(t) for t in times])


def _echo_probe_argv(address: str, port: int, count: int, interval: float, limit: float
                     ) -> List[str]:
    return ["python3", "-c", TCP_ECHO_PROBE, address, str(port), str(count), str(interval),
            str(limit)]


def tcp_echo(client: netlab.Host, address: str, port: int, count: int,
             interval: float = 0.02) -> EchoResult:
    """`count` echo round trips client -> address:port over one TCP connection, `interval` s
    apart (bounded: count * (interval + 3 s) at most)."""
    limit = count * (interval + 3.0)
    cp = client.run(_echo_probe_argv(address, port, count, interval, limit),
                    timeout=limit + 10, check=False)
    try:
        return parse_echo_probe(cp.stdout)
    except ValueError as e:
        raise RuntimeError("tcp echo %s -> %s:%d: %s %s" % (client.name, address, port, e,
                                                          cp.stderr.strip()[:300])) from None


class LoadedTcpEcho:
    """LoadedPinger's counterpart for an echo service: round trips alongside a throughput
    test, for `seconds`."""

    def __init__(self, client: netlab.Host, address: str, port: int, seconds: int,
                 interval: float = 0.05) -> None:
        self.seconds = seconds
        count = int(seconds / interval) + 1
        self.proc = client.popen(_echo_probe_argv(address, port, count, interval, seconds),
                                 log="%s.loaded-echo.log" % client.name)

    def rtt_ms(self) -> Optional[float]:
        """Median round trip (ms) once the probe ended; None if no echo came back."""
        self.proc.wait(timeout=self.seconds + 15)
        try:
            return statistics.median(parse_echo_probe(self.proc.output()).rtt_ms)
        except ValueError:
            return None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds pid has used (/proc/PID/stat; the command name may hold
    spaces and parentheses, so the fields are counted after its last ')')."""
    with open("/proc/%d/stat" % pid) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def machine_cpu() -> Dict[str, float]:
    """The machine's CPU time so far (seconds, all cores): busy and total (/proc/stat)."""
    with open("/proc/stat") as f:
        first = f.readline().split()
    if first[0] != "cpu":
        raise RuntimeError("unexpected /proc/stat: %r" % first[:3])
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return {"busy": (sum(ticks) - idle) / CLOCK_TICKS, "total": sum(ticks) / CLOCK_TICKS}


class CpuWindow:
    """CPU shares over a window: each watched pid's % of one core, and the machine's busy %
    of all cores. start() then stop() -> {"pid label": %, ..., "machine": %}."""

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = dict(pids)
        self.before: Dict[str, float] = {}
        self.machine_before: Dict[str, float] = {}
        self.started = 0.0

    def start(self) -> "CpuWindow":
        self.started = time.monotonic()
        self.before = {label: process_cpu_seconds(pid) for label, pid in self.pids.items()}
        self.machine_before = machine_cpu()
        return self

    def stop(self) -> Dict[str, float]:
        wall = max(time.monotonic() - self.started, 1e-6)
        shares = {label: 100.0 * (process_cpu_seconds(pid) - self.before[label]) / wall
                  for label, pid in self.pids.items()}
        now = machine_cpu()
        total = now["total"] - self.machine_before["total"]
        busy = now["busy"] - self.machine_before["busy"]
        shares["machine"] = 100.0 * busy / total if total > 0 else 0.0
        return shares


# tinc's port in one host: bytes in and out over UDP and over TCP (the meta connections, which
# also carry packets tincd does not send over UDP: before PMTU discovery found a size, above
# it, or with TCPOnly)
TINC_COUNTERS = ("udp_in", "udp_out", "tcp_in", "tcp_out")


def tinc_counters_ruleset(table: str, port: int = 655) -> str:
    """An nftables table counting the bytes of tinc's port; `table` and `port` checked."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", table) or not 0 < port < 65536:
        raise ValueError("bad table name or port")
    counters = "".join("    counter %s {}\n" % name for name in TINC_COUNTERS)
    return ("table inet %s {\n%s"
            "    chain input {\n        type filter hook input priority 0; policy accept;\n"
            "        udp dport %d counter name udp_in\n        tcp dport %d counter name tcp_in\n"
            "    }\n"
            "    chain output {\n        type filter hook output priority 0; policy accept;\n"
            "        udp sport %d counter name udp_out\n        tcp sport %d counter name tcp_out\n"
            "    }\n}\n" % (table, counters, port, port, port, port))


def install_tinc_counters(host: netlab.Host, table: str = "benchtinc", port: int = 655) -> None:
    host.run(["nft", "-f", "-"], input=tinc_counters_ruleset(table, port))


def read_tinc_counters(host: netlab.Host, table: str = "benchtinc") -> Dict[str, int]:
    """name -> bytes so far of the counters install_tinc_counters made in host."""
    cp = host.run(["nft", "-j", "list", "counters", "table", "inet", table])
    found: Dict[str, int] = {}
    for item in json.loads(cp.stdout).get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") in TINC_COUNTERS:
            found[counter["name"]] = int(counter["bytes"])
    if set(found) != set(TINC_COUNTERS):
        raise RuntimeError("counters missing in %s: %s" % (host.name, sorted(found)))
    return found


def counter_delta(after: Dict[str, int], before: Dict[str, int]) -> Dict[str, int]:
    return {name: after[name] - before[name] for name in TINC_COUNTERS}


def link_mtu(host: netlab.Host, ifname: str) -> int:
    return int(host.read_file("/sys/class/net/%s/mtu" % ifname).strip())


def parse_udp_snmp(text: str) -> Dict[str, int]:
    """The "Udp:" counters of /proc/net/snmp (a header line of names, then a line of values)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) != 2 or len(rows[0]) != len(rows[1]):
        raise ValueError("no Udp: header and value lines in /proc/net/snmp")
    return {name: int(value) for name, value in zip(rows[0], rows[1])}


def udp_drops(host: netlab.Host) -> Dict[str, int]:
    """UDP datagrams the host's kernel dropped so far for a full receive / send buffer."""
    udp = parse_udp_snmp(host.read_file("/proc/net/snmp"))
    return {"rcvbuf": udp.get("RcvbufErrors", 0), "sndbuf": udp.get("SndbufErrors", 0)}


def loss_ruleset(table: str, per_mille: int) -> str:
    """An nftables table for a router: drop `per_mille` / 1000 of the packets it forwards, at
    random (numgen), both ways: a lossy underlay without sch_netem. Arguments checked."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,30}", table) or not 0 < per_mille <= 500:
        raise ValueError("bad table name or loss")
    return ("table ip %s {\n    chain forward {\n"
            "        type filter hook forward priority -10; policy accept;\n"
            "        numgen random mod 1000 < %d drop\n    }\n}\n" % (table, per_mille))


def add_forwarding_loss(router: netlab.Host, per_mille: int, table: str = "benchloss") -> None:
    router.run(["nft", "-f", "-"], input=loss_ruleset(table, per_mille))
