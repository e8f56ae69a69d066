"""labkit.multihub: several hubs on one PostgreSQL registry, in network namespaces (the
test bed of issue 11; used by tests/test_several_hubs.py). No pytest in here.

Topology (``labkit.netlab.build_nat_topology(hub_names=...)``)::

    erebor 192.0.2.1   rivendell 192.0.2.2   lothlorien 192.0.2.3 ...
       |                  |                     |         (ports pubh1, pubh2, ... of the
    ------------- bridge pub0 in the router -------------   router's bridge: set_link())
    router (NAT, as in netlab) -- LAN 198.51.100.0/24 -- node1, node2, ...

The registry is a ``labkit.postgres.ThrowawayPostgres`` cluster in the root namespaces (Debian's
binaries, run as ``postgres``): it listens on 127.0.0.1 of the root namespace (unreachable from
the topology) and on a unix socket in its private temp dir, which the hubs use
(``postgresql://USER@:PORT/DB?host=/tmp/tinc-pg-.../sock``). Why the socket and not TCP over a
veth: nothing of the topology gets wired to the root namespace (netlab's rule), no password is
needed (local trust, the socket dir is 0700 postgres and the hubs run as root), and stopping the
server (``stop_registry``) is the same event for every hub. The catch: a hub whose link is cut
still reaches the registry; ``set_link(hub, False)`` is therefore followed by ``kill_hard``
when a silent death is wanted (the issue's "processes killed and link cut").

Every name is unique per run (netlab's prefix, a random database name); ``close()`` removes
the namespaces (and every process in them), then the cluster. All waits are bounded.
"""

import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from . import netlab, postgres
from .loopback_hub import HOST as LOOPBACK, hub_cli

REGISTRY_USER = "tinchub"
PING_INTERVAL_S = 0.1


# ------------------------------------------------------------------------- ping outages

class Pinger:
    """``ping -D -i 0.1`` from `src` to `dst` in the background (bounded by `max_seconds`'
    worth of packets: with ``-w`` iputils ping exits at the first ICMP error, and a node's
    tincd answers "Destination Net Unknown" while its only hub is away; found by
    bench/hub_failover.py); the reply timestamps give the outage around an event."""

    def __init__(self, src: netlab.Host, dst: str, max_seconds: int = 120) -> None:
        self.src = src
        self.dst = dst
        count = int(max_seconds / PING_INTERVAL_S)
        self.proc = src.popen(["ping", "-D", "-n", "-i", str(PING_INTERVAL_S), "-W", "1",
                               "-c", str(count), dst],
                              log="%s.ping-%s.%s.log" % (src.name, dst, secrets.token_hex(2)))

    def replies(self) -> List[float]:
        """Epoch seconds of every reply so far (ping flushes each line)."""
        return [float(m.group(1)) for m in
                re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", self.proc.output(), re.M)]

    def flowing(self, event: float, span: float) -> bool:
        """True when at least `span` s have passed since `event` (epoch) and the last `span`
        s are covered with replies, none missing for 1 s (traffic flows again, steadily)."""
        now = time.time()
        got = [t for t in self.replies() if t >= now - span - 0.3]
        return (now - event >= span and bool(got) and got[0] <= now - span + 0.5
                and now - got[-1] < 0.5 and largest_gap(got) < 1.0)

    def stop(self) -> List[float]:
        if self.proc.poll() is None:
            self.proc.popen.send_signal(signal.SIGINT)  # ping prints its summary and exits
            try:
                self.proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.stop()
        return self.replies()


def largest_gap(replies: Sequence[float]) -> float:
    """The largest interval between consecutive replies (0.1 s: nothing lost)."""
    return max((b - a for a, b in zip(replies, replies[1:])), default=0.0)


def outage(replies: Sequence[float], event: float, until: float) -> Optional[float]:
    """Seconds without a reply around `event` (epoch): the largest gap between replies from
    1 s before the event to `until`, counting the gap to `until` if replies stopped.
    None when no reply came after the event at all."""
    window = [t for t in replies if event - 1.0 <= t <= until]
    after = [t for t in window if t > event]
    if not after:
        return None
    gap = largest_gap(window)
    return max(gap, until - window[-1])


# ------------------------------------------------------------------------------ hubs

class HubInNamespace(netlab.HubDriver):
    """The real `tinc-hub` of one hub host, on the shared PostgreSQL registry."""

    def __init__(self, host: netlab.Host, net: str, name: str, registry_url: str,
                 vpn_subnet: str) -> None:
        super().__init__(host, net, name, address=host.addresses["public"],
                         vpn_subnet=vpn_subnet)
        self.registry_url = registry_url

    def init_first(self, key_size: int = 2048) -> None:
        """`tinc-hub init --net --name --address --vpn-subnet --registry` (a new net)."""
        self.cli("init", "--net", self.net, "--name", self.name, "--address", self.address,
                 "--vpn-subnet", self.vpn_subnet, "--registry", self.registry_url,
                 "--init", "none", "--key-size", key_size, timeout=120)

    def init_joining(self, key_size: int = 2048) -> None:
        """`tinc-hub init --registry URL --name --address` (net and subnet from the registry)."""
        self.cli("init", "--registry", self.registry_url, "--name", self.name, "--address",
                 self.address, "--init", "none", "--key-size", key_size, timeout=120)

    def vpn_address(self) -> str:
        """The hub's own VPN address: the /32 Subnet of its own host file (DESIGN: a hub's
        own file claims its /32 and the VPN prefix)."""
        text = self.host.read_file("%s/hosts/%s" % (self.net_dir, self.name))
        found = re.findall(r"^\s*Subnet\s*=\s*([0-9.]+)/32\s*$", text, re.M)
        if len(found) != 1:
            raise AssertionError("hosts/%s of %s: expected one /32 Subnet, got %r:\n%s"
                                 % (self.name, self.name, found, text))
        return found[0]

    @property
    def net_dir(self) -> str:
        return "/etc/tinc/%s" % self.net

    def hubs(self) -> List[dict]:
        """`tinc-hub hubs --json`, as a list of objects."""
        data = json.loads(self.cli("hubs", "--json").stdout)
        if isinstance(data, dict) and "hubs" in data:
            data = data["hubs"]
        return data

    def host_files(self) -> Dict[str, str]:
        """name -> content of every file in this hub's hosts/ (one command)."""
        code = ("import json,os,sys\nd=sys.argv[1]\n"
                "print(json.dumps({n: open(os.path.join(d,n)).read() for n in os.listdir(d)"
                " if os.path.isfile(os.path.join(d,n))}))")
        cp = self.host.run(["python3", "-c", code, self.net_dir + "/hosts"])
        return json.loads(cp.stdout)

    def connect_to(self) -> List[str]:
        """The hub's ConnectTo lines: conf.d/hubs.conf, which the API keeps (tinc.conf has none)."""
        path = self.net_dir + "/conf.d/hubs.conf"
        return connect_to_lines(self.host.read_file(path)) if self.host.exists(path) else []

    def kill_hard(self) -> List[int]:
        """SIGKILL every process of this hub (tincd, tinc-hub serve, ...), as a crash: the
        kernel of the (live) host then closes the sockets. Returns the pids killed."""
        pids = [p for p in self.host.pids() if p != self.host.anchor_pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.host._reap_children()
        netlab.wait_until(lambda: not [p for p in pids if netlab.pid_alive(p)], 10, 0.02,
                          what="the processes of %s to die" % self.name)
        self.host._reap_children()
        self.serve_proc = None
        return pids

    def start(self) -> None:
        """Start tincd and `tinc-hub serve` again (after kill_hard)."""
        netlab.start_tincd(self.host, self.net)
        self.serve()


def connect_to_lines(tinc_conf: str) -> List[str]:
    """The ConnectTo values of a tinc.conf, in order."""
    return [m.group(1) for m in re.finditer(r"^\s*ConnectTo\s*=\s*(\S+)\s*$", tinc_conf, re.M)]


class MultiHubLab:
    """N hub hosts, a NAT router and nodes, one PostgreSQL registry; hubs are set up with
    `add_hub` (the first makes the net), nodes join with `enrol`."""

    def __init__(self, hub_names: Sequence[str], node_names: Sequence[str], net: str,
                 vpn_subnet: str, key_size: int = 2048,
                 pg: Optional[postgres.ThrowawayPostgres] = None) -> None:
        """`pg`: a running cluster to share (this lab then only makes and drops its own
        database in it); by default the lab starts and removes its own."""
        self.net = net
        self.vpn_subnet = vpn_subnet
        self.key_size = key_size
        self.own_pg = pg is None
        self.pg = pg or postgres.ThrowawayPostgres()
        self.topo: Optional[netlab.NatTopology] = None
        self.hubs: Dict[str, HubInNamespace] = {}
        self.addresses: Dict[str, str] = {}  # node name -> VPN address
        self.hub_names = list(hub_names)
        self.node_names = list(node_names)
        self.database = "reg_" + secrets.token_hex(6)
        self.registry_url = ""

    def start(self) -> "MultiHubLab":
        try:
            if self.own_pg:
                self.pg.start()
            self.pg.create_database(self.database, user=REGISTRY_USER)
            self.registry_url = self.pg.socket_url(self.database, REGISTRY_USER)
            self.topo = netlab.build_nat_topology(node_names=self.node_names,
                                                  hub_names=self.hub_names)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Namespaces first (their hubs hold registry connections), then the cluster."""
        try:
            if self.topo is not None:
                self.topo.close()
        finally:
            if self.own_pg:
                self.pg.stop()
            elif self.registry_url and self.pg.started:
                self.pg.drop_database(self.database)

    def __enter__(self) -> "MultiHubLab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- hosts -----------------------------------------------------------------------------
    def host(self, name: str) -> netlab.Host:
        assert self.topo is not None
        return self.topo[name]

    def hub(self, name: str) -> HubInNamespace:
        return self.hubs[name]

    def add_hub(self, name: str, serve: bool = True) -> HubInNamespace:
        """`tinc-hub init` on hub host `name` (the first one makes the net, later ones join
        through the registry), then `tinc-hub serve`."""
        hub = HubInNamespace(self.host(name), self.net, name, self.registry_url, self.vpn_subnet)
        if self.hubs:
            hub.init_joining(self.key_size)
        else:
            hub.init_first(self.key_size)
        self.hubs[name] = hub
        if serve:
            hub.serve()
        return hub

    # -- nodes -----------------------------------------------------------------------------
    def enrol(self, node: str, token: str, timeout: int = 60, name: Optional[str] = None,
              extra: Sequence[str] = ()) -> str:
        """bootstrap.py on `node` with `token` (in the environment); its VPN address."""
        cp = self.host(node).run(
            netlab.bootstrap_argv(name=name or node, key_size=self.key_size, timeout=timeout,
                                  extra=extra),
            env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=timeout + 120, check=False)
        address = netlab.printed_address(cp.stdout) if cp.returncode == 0 else None
        if not address:
            raise AssertionError("bootstrap.py on %s: exit %s\n--- stderr ---\n%s\n--- stdout "
                                 "---\n%s" % (node, cp.returncode, cp.stderr, cp.stdout))
        self.addresses[name or node] = address
        return address

    def node_connect_to(self, node: str) -> List[str]:
        return connect_to_lines(self.host(node).read_file("/etc/tinc/%s/tinc.conf" % self.net))

    def node_host_files(self, node: str) -> List[str]:
        cp = self.host(node).run(["ls", "-1", "/etc/tinc/%s/hosts" % self.net])
        return sorted(cp.stdout.split())

    def node_connected(self, node: str, hub: str) -> bool:
        """True when `node` has an established TCP meta connection to `hub`'s tinc port (seen
        from the node: behind the NAT the hub only sees the router's address)."""
        address = self.hubs[hub].address
        cp = self.host(node).run(["ss", "-Htn", "state", "established", "dst", address,
                                  "dport", "=", ":655"], check=False)
        return cp.returncode == 0 and bool(cp.stdout.strip())

    def relayed_packets(self, src: str, dst_address: str, count: int = 30) -> Dict[str, int]:
        """hub name -> packets its public interface received while node `src` pinged
        `dst_address` `count` times: the hub relaying node<->node traffic shows about
        2 * count (request in from src, reply in from dst), a standby hub only keepalives."""
        hubs = [h for h in self.hubs.values() if h.serve_proc is not None]
        before = {h.name: h.host.rx_packets("eth0") for h in hubs}
        replied = self.host(src).ping(dst_address, count=count, timeout=1, interval=0.02)
        if not replied:
            raise AssertionError("%s -> %s: no reply" % (src, dst_address))
        return {h.name: h.host.rx_packets("eth0") - before[h.name] for h in hubs}

    # -- failures --------------------------------------------------------------------------
    def set_link(self, hub: str, up: bool) -> None:
        """Set the router's bridge port of `hub` down (its link cut: nothing reaches it and
        nothing comes from it, no FIN, no RST) or up again."""
        assert self.topo is not None
        port = self.topo.public_ports[hub]
        netlab.run_root(["ip", "-n", self.topo.router.netns, "link", "set", port,
                         "up" if up else "down"])

    def stop_registry(self) -> None:
        self.pg.stop_server()

    def start_registry(self) -> None:
        self.pg.start_server()

    # -- diagnostics -------------------------------------------------------------------------
    def netlab_diagnostics(self) -> str:
        out = self.topo.diagnostics() if self.topo is not None else ""
        try:
            log = self.pg.log_file.read_text(errors="replace") if self.pg.root else ""
        except OSError:
            log = ""
        return out + "\n===== PostgreSQL log =====\n" + netlab._tail(log, 30)


# ----------------------------------------------------------------- hubs on loopback

def init_loopback_hub(root: Path, registry_url: str, name: str, api_port: int, tinc_port: int,
                      net: Optional[str] = None, vpn_subnet: Optional[str] = None) -> Path:
    """`tinc-hub init --no-start` of hub `name` on 127.0.0.1 into root/state and root/tinc on
    the registry: with `net` and `vpn_subnet` it makes the net, without it joins. Returns the
    state dir (for labkit.loopback_hub.HubProcess)."""
    state = root / "state"
    args = ["init", "--registry", registry_url, "--name", name, "--address", LOOPBACK,
            "--api-port", str(api_port), "--tinc-port", str(tinc_port), "--key-size", "2048",
            "--init", "none", "--tinc-dir", str(root / "tinc"), "--no-start"]
    if net:
        args += ["--net", net, "--vpn-subnet", str(vpn_subnet)]
    hub_cli(state, *args)
    return state


def vpn_addresses_unique(addresses: Iterable[str], subnet: str) -> bool:
    """True when every address is distinct and inside subnet."""
    seen = list(addresses)
    network = ipaddress.ip_network(subnet)
    return len(set(seen)) == len(seen) and all(ipaddress.ip_address(a) in network for a in seen)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> float:
    """Wait until predicate() is truthy; the seconds it took (TimeoutError with `what`)."""
    started = time.monotonic()
    netlab.wait_until(predicate, timeout, interval, what=what)
    return time.monotonic() - started
