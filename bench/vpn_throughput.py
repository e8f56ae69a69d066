#!/usr/bin/env python3
"""VPN throughput: what the hub costs node<->node and hub<->node traffic (issue 12), each
figure against a plain-IP baseline measured in the same run, on the same namespaces and veths.

One lab (labkit.netlab NAT topology, real tincd, real `tinc-hub init --init none` + serve, two
nodes joined with the real bootstrap.py). Paths, measured in turn in every round:

- lan:    node1 -> node2 over plain IP on their LAN (no tinc): baseline of vpn-nodes
- public: node1 -> hub's public address, plain IP through the NAT router (no tinc): the
          underlay of one tinc hop, baseline of vpn-hub
- vpn-nodes: node1 -> node2 over the VPN: node1's tincd -> hub's tincd (decrypts, routes,
          re-encrypts) -> node2's tincd, over the router twice
- vpn-hub:   node1 -> the hub's VPN address (one tinc hop)
- plain-dnat: a client on the public side (its own link to the hub, as in
          tests/test_expose.py) -> a port of the hub, DNATed by a plain nftables rule to
          node2's LAN address, forwarded by the hub and the router (no tinc): the same hops as
          the published paths, baseline of both
- published: the same client -> `tinc-hub expose node2:5201 --listen 15201`: DNAT to node2's
          VPN address, the hub's tincd encrypts, over the router to node2's tincd; node2's
          replies come back through the VPN (its policy routing; node2 sees the client's
          address)
- published-snat: the same with --snat (node2 sees the hub's VPN address)

The published paths' round trips are those of a TCP echo service on node2 (7007, published
and DNATed alike): a ping to the hub's public address would stop at the hub. The hub routes
already when the bench publishes (ip_forward=1 before the first exposure, as on a hub that is
also a router): otherwise the product's table drops every other forwarded packet, the plain
baseline included. Both services listen on 0.0.0.0 on node2: TCP answers from the address a
connection was made to (the VPN address after DNAT); the README's advice to bind the VPN
address is for UDP services (an unconnected socket answers from the route's address).

Per path: TCP throughput (iperf3 -J; median of --runs), retransmits, the client's TCP MSS
(ClampMSS at work), ping (or TCP echo) round trip (median), the address the service saw,
the %CPU of the hub's and the nodes' tincd and of the machine while it ran, and the share of
tinc's bytes at the hub that went over UDP (the rest went over the TCP meta connections:
before PMTU discovery settles, above the discovered PMTU, or with TCPOnly). Ratios: VPN / its
baseline.

--candidate "Key=Value,Key=Value" (repeatable) measures the same paths again with those tinc
1.0 options in every daemon's conf.d (tincd restarted), and prints candidate / as-generated.
InterfaceMTU=N (not a tinc option) sets the VPN interface's MTU in the three hosts.

    .venv/bin/python bench/vpn_throughput.py [--runs 3] [--seconds 4] \
        [--candidate "ProcessPriority=high"] [--json out.json]
"""

import argparse
import ipaddress
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from labkit import netlab, traffic

NET = "tputnet"
HUB = "tputhub"
VPN_SUBNET = "10.71.0.0/24"
NODES = ("node1", "node2")
BENCH_CONF = "conf.d/zz-vpn-throughput-bench.conf"  # read after tinc.conf and conf.d/hubs.conf
SETTLE_BOUND_S = 45.0  # tinc 1.0 fixes the PMTU after at most 30 probes, 1 s apart
SETTLE_PING_SIZE = 1400  # 1428-byte IP packets: as large as a clamped TCP segment here
JOIN_BOUND_S = 180.0

# tinc 1.0.36 options the bench may set (each value checked: it is written into a tinc file)
TINC_OPTIONS = {
    "Cipher": r"[a-z0-9-]{1,40}",
    "Digest": r"[a-z0-9-]{1,40}",
    "MACLength": r"[0-9]{1,2}",
    "Compression": r"[0-9]|1[01]",
    "PMTU": r"[0-9]{3,4}",
    "PMTUDiscovery": r"yes|no",
    "ClampMSS": r"yes|no",
    "TCPOnly": r"yes|no",
    "ProcessPriority": r"normal|low|high",
    "UDPRcvBuf": r"[0-9]{1,9}",
    "UDPSndBuf": r"[0-9]{1,9}",
    "ReplayWindow": r"[0-9]{1,5}",
}
INTERFACE_MTU = "InterfaceMTU"  # the bench's own knob: `ip link set mtu` on the VPN interface


class Candidate(NamedTuple):
    label: str
    options: Tuple[Tuple[str, str], ...]  # (tinc option, value), checked

    def tinc_lines(self) -> List[str]:
        return ["%s = %s" % (k, v) for k, v in self.options if k != INTERFACE_MTU]

    def interface_mtu(self) -> Optional[int]:
        return next((int(v) for k, v in self.options if k == INTERFACE_MTU), None)

    def tcp_only(self) -> bool:
        """With TCPOnly tinc sends every packet over its meta connections: no UDP to wait for."""
        return ("TCPOnly", "yes") in self.options


AS_GENERATED = Candidate("as generated", ())


def parse_candidate(text: str) -> Candidate:
    """"Key=Value,Key=Value" -> Candidate; ValueError on an unknown option or a value that
    does not match that option's pattern (nothing unchecked reaches a tinc file)."""
    options = []
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError("%r is not Key=Value" % item)
        if key == INTERFACE_MTU:
            if not re.fullmatch(r"[0-9]{3,4}", value) or not 576 <= int(value) <= 9000:
                raise ValueError("InterfaceMTU must be 576..9000")
        elif key not in TINC_OPTIONS:
            raise ValueError("unknown option %r (known: %s, %s)"
                             % (key, ", ".join(sorted(TINC_OPTIONS)), INTERFACE_MTU))
        elif not re.fullmatch(TINC_OPTIONS[key], value):
            raise ValueError("bad value %r for %s" % (value, key))
        options.append((key, value))
    if len({k for k, _ in options}) != len(options):
        raise ValueError("an option is given twice in %r" % text)
    return Candidate(",".join("%s=%s" % kv for kv in options), tuple(options))


# ------------------------------------------------------------------------- the lab

class Path(NamedTuple):
    key: str
    label: str
    client: str  # host names in the lab
    server: str
    address: Callable[["Lab"], str]
    baseline: Optional[str]  # key of the path this one is compared with; None: a baseline
    vpn: bool
    port: int = traffic.IPERF_PORT  # where the client's iperf3 connects
    echo_port: Optional[int] = None  # round trips by TCP echo to address:echo_port; None: ping


class Lab:
    """Hub + router + two nodes joined by the product; the iperf3 servers and the byte
    counters of tinc's port at the hub."""

    def __init__(self, key_size: int, loss_per_mille: int = 0) -> None:
        self.key_size = key_size
        self.loss_per_mille = loss_per_mille
        self.topo: Optional[netlab.NatTopology] = None
        self.hub: Optional[netlab.HubDriver] = None
        self.addresses: Dict[str, str] = {}

    def __enter__(self) -> "Lab":
        self.topo = netlab.build_nat_topology(node_names=list(NODES), hub_name="hub")
        try:
            self.start()
        except BaseException:
            self.topo.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.topo is not None
        self.topo.close()

    def host(self, name: str) -> netlab.Host:
        assert self.topo is not None
        return self.topo[name]

    def start(self) -> None:
        self.hub = netlab.HubDriver(self.host("hub"), NET, HUB, vpn_subnet=VPN_SUBNET)
        self.hub.init(key_size=self.key_size)
        self.hub.serve()
        self.addresses["hub"] = self.hub.vpn_address()
        token = self.hub.token_create("--uses", str(len(NODES)))["token"]
        procs = [(n, netlab.start_bootstrap(self.host(n), token, name=n, key_size=self.key_size,
                                            timeout=120)) for n in NODES]
        for name, proc in procs:
            if proc.wait(timeout=JOIN_BOUND_S) != 0:
                raise SystemExit("bootstrap.py on %s failed:\n%s" % (name, proc.output()))
            address = netlab.printed_address(proc.output())
            if not address:
                raise SystemExit("bootstrap.py on %s printed no address" % name)
            self.addresses[name] = address
        for name in ("hub",) + NODES:
            traffic.start_iperf_server(self.host(name))
        traffic.install_tinc_counters(self.host("hub"))
        if self.loss_per_mille:  # after the joins: enrolment is not what is measured
            traffic.add_forwarding_loss(self.host("router"), self.loss_per_mille)

    def tincd_pids(self) -> Dict[str, int]:
        pids = {}
        for name in ("hub",) + NODES:
            pid = netlab.tincd_pid(self.host(name), NET)
            if not pid:
                raise SystemExit("no tincd running in %s" % name)
            pids["tincd " + name] = pid
        return pids

    def apply(self, candidate: Candidate) -> None:
        """The candidate's options in every daemon's conf.d (none: the file removed), tincd
        restarted: nodes stopped, hub restarted, nodes started (no reconnection backoff)."""
        for name in NODES:
            netlab.stop_tincd(self.host(name), NET)
        hub_host = self.host("hub")
        netlab.stop_tincd(hub_host, NET)
        for name in ("hub",) + NODES:
            path = "/etc/tinc/%s/%s" % (NET, BENCH_CONF)
            lines = candidate.tinc_lines()
            if lines:
                self.host(name).write_file(path, "# vpn_throughput bench candidate\n"
                                           + "\n".join(lines) + "\n")
            else:
                self.host(name).run(["rm", "-f", path])
        netlab.start_tincd(hub_host, NET)
        for name in NODES:
            netlab.start_tincd(self.host(name), NET)
        mtu = candidate.interface_mtu()
        if mtu:
            for name in ("hub",) + NODES:
                self.host(name).run(["ip", "link", "set", "dev", NET, "mtu", str(mtu)])

    def node_connected(self, node: str) -> bool:
        cp = self.host(node).run(["ss", "-Htn", "state", "established", "dst",
                                  netlab.HUB_PUBLIC, "dport", "=", ":655"], check=False)
        return cp.returncode == 0 and bool(cp.stdout.strip())

    def settle(self, udp: bool = True) -> Tuple[bool, float]:
        """Wait until both nodes hold their meta connection, node1 reaches node2 over the VPN,
        and (with `udp`) large packets node1 <-> node2 cross the hub over UDP (PMTU discovery
        settled on both legs), at most SETTLE_BOUND_S. (settled, seconds waited)."""
        started = time.monotonic()
        hub = self.host("hub")
        node1 = self.host("node1")
        if not netlab.wait_until(lambda: all(self.node_connected(n) for n in NODES), 30, 0.1):
            raise SystemExit("the nodes did not reconnect to the hub within 30 s")
        node1.wait_ping(self.addresses["node2"], timeout=30)
        if not udp:
            return True, time.monotonic() - started

        def big_pings_over_udp() -> bool:
            before = traffic.read_tinc_counters(hub)
            for target in (self.addresses["node2"], self.addresses["hub"]):
                node1.run(["ping", "-n", "-q", "-c", "5", "-i", "0.05", "-W", "1", "-s",
                           str(SETTLE_PING_SIZE), target], check=False, timeout=10)
            moved = traffic.counter_delta(traffic.read_tinc_counters(hub), before)
            # 5 x 2 x 1442 bytes each way and leg: all of it over UDP, the meta
            # connections quiet but for a PING/PONG
            return moved["tcp_in"] + moved["tcp_out"] < 1000 and \
                moved["udp_in"] > 10 * SETTLE_PING_SIZE
        settled = netlab.wait_until(big_pings_over_udp, SETTLE_BOUND_S, 0.5)
        return settled, time.monotonic() - started


def standard_paths() -> List[Path]:
    public = netlab.HUB_PUBLIC
    return [
        Path("lan", "node1 -> node2, plain IP on the LAN", "node1", "node2",
             lambda lab: lab.host("node2").addresses["lan"], None, False),
        Path("public", "node1 -> hub public address, plain IP via NAT router", "node1", "hub",
             lambda lab: public, None, False),
        Path("vpn-nodes", "node1 -> node2 over the VPN (via hub tincd)", "node1", "node2",
             lambda lab: lab.addresses["node2"], "lan", True),
        Path("vpn-hub", "node1 -> hub over the VPN (one tinc hop)", "node1", "hub",
             lambda lab: lab.addresses["hub"], "public", True),
    ]


# the published service: a client with its own link to the hub (as in tests/test_expose.py)
CLIENT = "client"
CLIENT_LINK_HUB, CLIENT_ADDRESS = "203.0.113.1", "203.0.113.10"
CLIENT_NET = "203.0.113.0/24"
SERVICE_NODE = "node2"
ECHO_PORT = 7007  # node2's TCP echo service (round trips through a DNATed port)
# the hub's ports for node2's iperf3 (5201) and echo service, per path
PLAIN_DNAT_PORTS = (15200, 17000)
PUBLISHED_PORTS = (15201, 17001)
PUBLISHED_SNAT_PORTS = (15202, 17002)
PLAIN_DNAT_TABLE = "vpnbench_plain_dnat"


def plain_dnat_ruleset(node_lan: str) -> str:
    """The baseline's DNAT on the hub (the hub's public ports -> node2's LAN address)."""
    node = str(ipaddress.IPv4Address(node_lan))
    rules = "".join("    fib daddr type local tcp dport %d dnat to %s:%d\n" % (listen, node, port)
                    for listen, port in zip(PLAIN_DNAT_PORTS, (traffic.IPERF_PORT, ECHO_PORT)))
    return ("table ip %s {\n  chain prerouting {\n"
            "    type nat hook prerouting priority dstnat; policy accept;\n%s  }\n}\n"
            % (PLAIN_DNAT_TABLE, rules))


def add_public_client(lab: Lab) -> netlab.Host:
    """The client namespace: its own veth to the hub (203.0.113.10 <-> 203.0.113.1), default
    route via the hub."""
    assert lab.topo is not None
    client = lab.topo.add_host(CLIENT)
    hub_ns = lab.host("hub").netns

    def ipn(netns: str, *args: str) -> None:
        netlab.run_root(["ip", "-n", netns] + list(args))

    ipn(hub_ns, "link", "add", "pub1", "type", "veth", "peer", "name", "eth0", "netns",
        client.netns)
    ipn(hub_ns, "addr", "add", CLIENT_LINK_HUB + "/24", "dev", "pub1")
    ipn(hub_ns, "link", "set", "pub1", "up")
    ipn(client.netns, "addr", "add", CLIENT_ADDRESS + "/24", "dev", "eth0")
    ipn(client.netns, "link", "set", "eth0", "up")
    ipn(client.netns, "route", "add", "default", "via", CLIENT_LINK_HUB)
    return client


def publish_service(lab: Lab) -> None:
    """The client, node2's echo service, the plain DNAT baseline (hub and router) and the two
    exposures (without and with --snat) of node2's iperf3 and echo service."""
    assert lab.hub is not None
    add_public_client(lab)
    node = lab.host(SERVICE_NODE)
    node_lan = node.addresses["lan"]
    traffic.start_tcp_echo_server(node, ECHO_PORT)
    hub, router = lab.host("hub"), lab.host("router")
    # the hub routes before anything is published (see the module doc)
    hub.sysctl("net.ipv4.ip_forward", 1)
    hub.run(["ip", "route", "add", node_lan + "/32", "via", netlab.ROUTER_PUBLIC])
    hub.run(["nft", "-f", "-"], input=plain_dnat_ruleset(node_lan))
    # the router: the client's net is behind the hub; the plain DNATed flows may enter the LAN
    router.run(["ip", "route", "add", CLIENT_NET, "via", netlab.HUB_PUBLIC])
    router.run(["nft", "add", "rule", "ip", "netlab", "forward", "iifname", "pub0",
                "oifname", "br-lan", "ip", "daddr", node_lan, "tcp", "dport",
                "{ %d, %d }" % (traffic.IPERF_PORT, ECHO_PORT), "accept"])
    for ports, extra in ((PUBLISHED_PORTS, []), (PUBLISHED_SNAT_PORTS, ["--snat"])):
        for listen, port in zip(ports, (traffic.IPERF_PORT, ECHO_PORT)):
            lab.hub.cli("expose", "%s:%d" % (SERVICE_NODE, port), "--listen", str(listen),
                        *extra)


def published_service_paths(lab: Lab) -> List[Path]:
    """A service node2 publishes through the hub (`tinc-hub expose`), without and with source
    NAT, and its plain-IP baseline of the same hops (module doc); set up here."""
    publish_service(lab)
    hub_public = CLIENT_LINK_HUB  # the hub's address on the client's link

    def address(lab: Lab) -> str:
        return hub_public
    return [
        Path("plain-dnat", "client -> hub port -> node2 LAN, plain DNAT (no tinc)", CLIENT,
             SERVICE_NODE, address, None, False, *PLAIN_DNAT_PORTS),
        Path("published", "client -> hub port -> node2, tinc-hub expose", CLIENT,
             SERVICE_NODE, address, "plain-dnat", True, *PUBLISHED_PORTS),
        Path("published-snat", "client -> hub port -> node2, tinc-hub expose --snat", CLIENT,
             SERVICE_NODE, address, "plain-dnat", True, *PUBLISHED_SNAT_PORTS),
    ]


# ------------------------------------------------------------------------- measuring

class Sample(NamedTuple):
    mbit_s: float
    retransmits: int
    mss: int
    rtt_ms: Optional[float]  # idle
    loaded_rtt_ms: Optional[float]  # while iperf3 ran, same path and direction
    seen_as: Optional[str]  # the client's address as the echo service saw it (echo paths)
    cpu: Dict[str, float]  # "tincd hub" ... -> % of one core; "machine" -> % of all cores
    udp_share: Optional[float]  # of tinc's bytes at the hub during the test (VPN paths)
    udp_drops: int  # UDP datagrams dropped for a full receive buffer, all three hosts
    udp_send_drops: int  # ... for a full send buffer


def measure(lab: Lab, path: Path, seconds: int, omit: int, pings: int) -> Sample:
    client = lab.host(path.client)  # the server's iperf3 runs since Lab.start
    address = path.address(lab)
    seen_as = None
    if path.echo_port is None:
        rtt = traffic.median_rtt_ms(client, address, pings)
    else:
        echo = traffic.tcp_echo(client, address, path.echo_port, pings)
        rtt, seen_as = statistics.median(echo.rtt_ms), echo.peer
    hub = lab.host("hub")
    before = traffic.read_tinc_counters(hub)
    hosts = [lab.host(name) for name in ("hub",) + NODES]
    drops_before = [traffic.udp_drops(h) for h in hosts]
    window = traffic.CpuWindow(lab.tincd_pids()).start()
    pinger: Union[traffic.LoadedPinger, traffic.LoadedTcpEcho]
    if path.echo_port is None:
        pinger = traffic.LoadedPinger(client, address, seconds + omit)
    else:
        pinger = traffic.LoadedTcpEcho(client, address, path.echo_port, seconds + omit)
    result = traffic.tcp_throughput(client, address, seconds, omit, port=path.port)
    cpu = window.stop()
    loaded_rtt = pinger.rtt_ms()
    drops_after = [traffic.udp_drops(h) for h in hosts]
    drops = {kind: sum(a[kind] - b[kind] for a, b in zip(drops_after, drops_before))
             for kind in ("rcvbuf", "sndbuf")}
    moved = traffic.counter_delta(traffic.read_tinc_counters(hub), before)
    total = sum(moved.values())
    udp_share = (moved["udp_in"] + moved["udp_out"]) / total if path.vpn and total else None
    return Sample(result.bits_per_second / 1e6, result.retransmits, result.mss, rtt,
                  loaded_rtt, seen_as, cpu, udp_share, drops["rcvbuf"], drops["sndbuf"])


def median_of(samples: Sequence[Sample], pick: Callable[[Sample], Optional[float]]
              ) -> Optional[float]:
    return median_of_values([pick(s) for s in samples])


def ratio(b: Optional[float], a: Optional[float]) -> Optional[float]:
    """b / a; None when either is missing or a is not positive."""
    if a is None or b is None or a <= 0:
        return None
    return b / a


def fmt(value: Optional[float], pattern: str) -> str:
    return "-" if value is None else pattern % value


def summary(paths: Sequence[Path], samples: Dict[str, List[Sample]]) -> Dict[str, dict]:
    """key -> medians and ratios against the path's baseline (same run, same candidate)."""
    out: Dict[str, dict] = {}
    for path in paths:
        got = samples[path.key]
        row = {
            "label": path.label,
            "mbit_s": median_of(got, lambda s: s.mbit_s),
            "retransmits": median_of(got, lambda s: s.retransmits),
            "mss": median_of(got, lambda s: s.mss),
            "rtt_ms": median_of(got, lambda s: s.rtt_ms),
            "loaded_rtt_ms": median_of(got, lambda s: s.loaded_rtt_ms),
            "hub_tincd_cpu": median_of(got, lambda s: s.cpu.get("tincd hub")),
            "node1_tincd_cpu": median_of(got, lambda s: s.cpu.get("tincd node1")),
            "node2_tincd_cpu": median_of(got, lambda s: s.cpu.get("tincd node2")),
            "machine_cpu": median_of(got, lambda s: s.cpu.get("machine")),
            "udp_share": median_of(got, lambda s: s.udp_share) if path.vpn else None,
            "udp_drops": median_of(got, lambda s: s.udp_drops),
            "udp_send_drops": median_of(got, lambda s: s.udp_send_drops),
            "runs": [s.mbit_s for s in got],
            "baseline": path.baseline,
            "rtt_probe": "icmp" if path.echo_port is None else "tcp-echo",
            "service_saw": sorted({s.seen_as for s in got if s.seen_as}),
        }
        out[path.key] = row
    for row in out.values():
        base = out.get(row["baseline"]) if row["baseline"] else None
        row["throughput_ratio"] = ratio(row["mbit_s"], base["mbit_s"]) if base else None
        row["rtt_ratio"] = ratio(row["rtt_ms"], base["rtt_ms"]) if base else None
        # what the hub's tincd spends per 100 Mbit/s through it: less sensitive to the
        # machine's other load than Mbit/s alone
        row["hub_cpu_per_100mbit"] = (ratio(row["hub_tincd_cpu"], row["mbit_s"] / 100)
                                      if row["baseline"] and row["mbit_s"] else None)
    return out


def print_table(title: str, rows: Dict[str, dict]) -> None:
    print("\n%s" % title)
    width = max(len(r["label"]) for r in rows.values())
    print("%-*s  %9s %7s %5s %8s %6s %8s %9s %9s %9s %9s %5s %5s"
          % (width, "path", "Mbit/s", "x base", "MSS", "RTT ms", "x base", "loaded",
             "hub tincd",
             "/100Mbit", "nodes", "machine", "UDP", "drops"))
    for row in rows.values():
        nodes_cpu = None
        if row["node1_tincd_cpu"] is not None and row["node2_tincd_cpu"] is not None:
            nodes_cpu = row["node1_tincd_cpu"] + row["node2_tincd_cpu"]
        print("%-*s  %9s %7s %5s %8s %6s %8s %9s %9s %9s %9s %5s %5s" % (
            width, row["label"], fmt(row["mbit_s"], "%.0f"),
            fmt(row["throughput_ratio"], "%.3f"), fmt(row["mss"], "%.0f"),
            fmt(row["rtt_ms"], "%.3f"), fmt(row["rtt_ratio"], "%.1f"),
            fmt(row["loaded_rtt_ms"], "%.2f"),
            fmt(row["hub_tincd_cpu"], "%.0f%%"), fmt(row["hub_cpu_per_100mbit"], "%.1f%%"),
            fmt(nodes_cpu, "%.0f%%"),
            fmt(row["machine_cpu"], "%.0f%%"),
            fmt(None if row["udp_share"] is None else 100 * row["udp_share"], "%.0f%%"),
            fmt(row["udp_drops"], "%.0f")))
    echoed = ["%s: %s" % (key, ", ".join(row["service_saw"])) for key, row in rows.items()
              if row["rtt_probe"] == "tcp-echo"]
    if echoed:
        print("(RTT of %s by TCP echo, not ping; the service saw the client as %s)"
              % (", ".join(k for k, r in rows.items() if r["rtt_probe"] == "tcp-echo"),
                 "; ".join(echoed)))


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def idle_machine_busy(seconds: float = 2.0) -> float:
    """The machine's busy % over `seconds` before the bench (what else loads it)."""
    before = traffic.machine_cpu()
    time.sleep(seconds)
    after = traffic.machine_cpu()
    total = after["total"] - before["total"]
    return 100.0 * (after["busy"] - before["busy"]) / total if total > 0 else 0.0


class Round(NamedTuple):
    settled: bool
    settle_s: float
    tun_mtu: int
    samples: Dict[str, Sample]


def run_round(lab: Lab, candidate: Candidate, paths: Sequence[Path], run: int, seconds: int,
              omit: int, pings: int) -> Round:
    """The candidate applied (tincd restarted, PMTU settled), then every path once."""
    lab.apply(candidate)
    settled, waited = lab.settle(udp=not candidate.tcp_only())
    tun_mtu = traffic.link_mtu(lab.host("node1"), NET)
    print("run %d [%s] tincd restarted; PMTU %s after %.1f s; VPN interface MTU %d"
          % (run, candidate.label, "not waited for (TCPOnly)" if candidate.tcp_only()
             else "settled (large packets over UDP)" if settled
             else "NOT settled within %.0f s (large packets over TCP)" % SETTLE_BOUND_S,
             waited, tun_mtu), flush=True)
    samples = {}
    for path in paths:
        s = samples[path.key] = measure(lab, path, seconds, omit, pings)
        print("  %-14s %8.0f Mbit/s  retr %-5d MSS %-5d RTT %s ms, loaded %s  tincd hub %s node1 %s"
              " node2 %s  machine %.0f%%  UDP drops rcv %d snd %d%s%s" % (
                  path.key, s.mbit_s, s.retransmits, s.mss, fmt(s.rtt_ms, "%.3f"),
                  fmt(s.loaded_rtt_ms, "%.2f"),
                  fmt(s.cpu.get("tincd hub"), "%.0f%%"), fmt(s.cpu.get("tincd node1"), "%.0f%%"),
                  fmt(s.cpu.get("tincd node2"), "%.0f%%"), s.cpu["machine"], s.udp_drops,
                  s.udp_send_drops,
                  "" if s.udp_share is None else "  over UDP %.0f%%" % (100 * s.udp_share),
                  "" if s.seen_as is None else "  (TCP echo; service saw %s)" % s.seen_as),
              flush=True)
    return Round(settled, waited, tun_mtu, samples)


def candidate_result(candidate: Candidate, paths: Sequence[Path], rounds: Sequence[Round]
                     ) -> Dict[str, object]:
    samples = {p.key: [r.samples[p.key] for r in rounds] for p in paths}
    return {"candidate": candidate.label, "options": dict(candidate.options),
            "settled": all(r.settled for r in rounds),
            "settle_s": [r.settle_s for r in rounds], "tun_mtu": rounds[-1].tun_mtu,
            "paths": summary(paths, samples)}


def versus_as_generated(paths: Sequence[Path], rounds: Dict[str, List[Round]]
                        ) -> Dict[str, Dict[str, Optional[float]]]:
    """candidate -> VPN path -> median over the rounds of candidate Mbit/s / as-generated
    Mbit/s of the same round (measured minutes apart, not hours: the load is alike)."""
    first = rounds[AS_GENERATED.label]
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for label, got in rounds.items():
        if label == AS_GENERATED.label:
            continue
        out[label] = {}
        for path in paths:
            if path.vpn:
                ratios = [ratio(c.samples[path.key].mbit_s, a.samples[path.key].mbit_s)
                          for c, a in zip(got, first)]
                out[label][path.key] = median_of_values(ratios)
    return out


def median_of_values(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return statistics.median(values)  # type: ignore[type-var]


def print_versus(versus: Dict[str, Dict[str, Optional[float]]]) -> None:
    if not versus:
        return
    print("\ncandidate / as generated, VPN TCP throughput (median over rounds of the ratio in "
          "each round; > 1 is better)")
    for label, by_path in versus.items():
        print("  %-40s %s" % (label, "  ".join("%s %s" % (k, fmt(v, "%.2fx"))
                                                for k, v in by_path.items())))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4, help="iperf3 -t (after --omit)")
    parser.add_argument("--omit", type=int, default=1, help="iperf3 -O: slow start not counted")
    parser.add_argument("--pings", type=int, default=50)
    parser.add_argument("--key-size", type=int, default=2048)
    parser.add_argument("--loss", type=float, default=0.0,
                        help="%% of the packets the router forwards (LAN <-> public) dropped at "
                             "random: a lossy underlay (the LAN baseline stays lossless)")
    parser.add_argument("--candidate", action="append", default=[],
                        help='tinc options to compare, "Key=Value,Key=Value" (repeatable)')
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds < 1 or args.omit < 0 or args.pings < 1:
        parser.error("--runs, --seconds, --pings >= 1, --omit >= 0")
    try:
        candidates = [AS_GENERATED] + [parse_candidate(c) for c in args.candidate]
    except ValueError as e:
        parser.error("--candidate: %s" % e)
    loss = round(args.loss * 10)  # per mille
    if args.loss and not 1 <= loss <= 500:
        parser.error("--loss between 0.1 and 50 (%)")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    missing = traffic.iperf3_missing()
    if missing:
        print("vpn_throughput: %s" % missing, file=sys.stderr)
        return 2
    netlab.install_signal_handlers()
    busy = idle_machine_busy()
    print("machine before the bench: load average %s, %.0f%% of %d CPUs busy"
          % (loadavg(), busy, os.cpu_count() or 0), flush=True)
    started = time.monotonic()
    rounds: Dict[str, List[Round]] = {c.label: [] for c in candidates}
    if loss:
        print("router drops %.1f%% of the packets it forwards" % (loss / 10), flush=True)
    with Lab(args.key_size, loss) as lab:
        addresses = dict(lab.addresses)  # VPN addresses: hub, node1, node2
        paths = standard_paths() + published_service_paths(lab)
        print("set-up: hub + 2 nodes joined in %.1f s (not timed)" % (time.monotonic() - started),
              flush=True)
        for run in range(1, args.runs + 1):  # candidates interleaved: each round sees one load
            turn = (run - 1) % len(candidates)  # and each goes first in turn (after a restart)
            for candidate in candidates[turn:] + candidates[:turn]:
                rounds[candidate.label].append(run_round(lab, candidate, paths, run,
                                                         args.seconds, args.omit, args.pings))
    results = [candidate_result(c, paths, rounds[c.label]) for c in candidates]
    for result in results:
        print_table("[%s] medians of %d run(s); x base = this path / its plain-IP baseline "
                    "(same round)" % (result["candidate"], args.runs), result["paths"])
    versus = versus_as_generated(paths, rounds)
    print_versus(versus)
    print("whole bench: %.0f s; load average after: %s" % (time.monotonic() - started,
                                                           loadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"idle_busy_percent": busy, "vpn_addresses": addresses,
                       "results": results, "versus": versus}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
