"""labkit.fleet: a fleet of real tincd nodes (hundreds to a thousand) on one or two real hubs,
every node enrolled through the real `tinc-hub serve` API (used by bench/fleet.py and
tests/test_fleet.py). No pytest in here.

Topology (``netlab.build_nat_topology(hub_names=...)``)::

    hub1 192.0.2.1   [hub2 192.0.2.2]   fleet 192.0.2.200 (one namespace, N tincd)
       |                |                  |
    ---------- bridge pub0 in the router ----------
    router (NAT) -- LAN -- tun1, tun2, ... (real tun nodes, joined with bootstrap.py)

The fleet's nodes are plain tincd processes in ONE namespace, each with its own conf dir under
the topology's run-unique work dir, ``DeviceType = dummy`` and its own ``Port``. Their files
are what bootstrap.py writes from the hub's answer (its own rendering and checking functions),
but the keepalive lines can be replaced (``keepalive``) to compare node configurations in one
run. Their RSA keys come from a cache (``fleet_keys``): 1000 keys of 2048 bits take about a
minute on 2 cores. The tun nodes run the real bootstrap.py and ping each other through a hub.

"Connected" is the hub tincd's own view: its ``host-up``/``host-down`` scripts (tinc-hub's
liveness records, one file per node, read through the hub's mount namespace) say which nodes
became reachable since a given second.

Every name is unique per run (netlab's prefix); ``close()`` kills every process and removes
the namespaces (and the PostgreSQL cluster of a two-hub fleet). All waits are bounded.
"""

import argparse
import concurrent.futures
import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

from bootstrap import bootstrap
from tinc_hub.liveness import read_liveness

from . import netlab

KEY_CACHE = Path("/var/cache/tinc-bootstrap-tests")
FLEET_ADDRESS = "192.0.2.200"
FIRST_PORT = 20000  # node i listens on FIRST_PORT + i in the fleet namespace
HUB_STATE = "/var/lib/tinc-hub"  # the hub's state dir inside its mount namespace
KEEPALIVE_KEYS = ("PingInterval", "PingTimeout", "MinTimeout", "MaxTimeout")
ACCEPT_RATE = 10  # tinc 1.0 accepts at most 10 meta connections per second (max_accept_burst)
ENROL_THREADS = 16


# ------------------------------------------------------------------------------- keys

def _private_pems(count: int, bits: int) -> List[bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return [rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()) for _ in range(count)]


def fleet_keys(count: int, bits: int = 2048, cache: Path = KEY_CACHE) -> List[Path]:
    """Paths of `count` distinct RSA private keys (PKCS#1 PEM, as tincd 1.0 reads them), made
    once on every core and kept in ``cache``/fleet-keys-rsaBITS (root 0700) for later runs."""
    directory = cache / ("fleet-keys-rsa%d" % bits)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(str(directory) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once share one cache
        paths = [directory / ("%05d.pem" % i) for i in range(count)]
        missing = [p for p in paths if not p.exists()]
        if missing:
            workers = max(1, os.cpu_count() or 1)
            chunks = [len(missing) // workers + (1 if i < len(missing) % workers else 0)
                      for i in range(workers)]
            made: List[bytes] = []
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for pems in pool.map(_private_pems, [c for c in chunks if c],
                                     [bits] * workers):
                    made.extend(pems)
            for path, pem in zip(missing, made):
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(pem)
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
    return paths


def public_pem_of(private_pem: bytes) -> str:
    """The PKCS#1 public key PEM of a private key PEM (what a node sends to the hub)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.PKCS1).decode()


# ------------------------------------------------------------------- node configuration

def with_keepalive(tinc_conf: str, keepalive: Optional[Sequence[str]]) -> str:
    """`tinc_conf` (bootstrap.py's) with its keepalive lines replaced by `keepalive` (None:
    kept as bootstrap.py wrote them; ["PingInterval = 5"] drops every other keepalive key)."""
    if keepalive is None:
        return tinc_conf
    pattern = re.compile(r"^(%s)\s*=" % "|".join(KEEPALIVE_KEYS))
    lines = [line for line in tinc_conf.splitlines() if not pattern.match(line)]
    at = next((i for i, line in enumerate(lines) if line.startswith("ConnectTo")), len(lines))
    return "\n".join(lines[:at] + list(keepalive) + lines[at:]) + "\n"


def dummy_node_conf(tinc_conf: str, port: int, keepalive: Optional[Sequence[str]]) -> str:
    """A fleet node's tinc.conf: bootstrap.py's, keepalive replaced, no tun (dummy device),
    its own port in the shared namespace."""
    text = with_keepalive(tinc_conf, keepalive)
    return text + "DeviceType = dummy\nPort = %d\n" % port


def write_node_dir(conf_dir: Path, name: str, answer: dict, private_pem: bytes,
                   public_pem: str, port: int, keepalive: Optional[Sequence[str]]) -> str:
    """Check the hub's answer as bootstrap.py does and write the node's conf dir from it with
    bootstrap.py's own rendering. Returns the node's VPN address."""
    address, prefix, _, _ = bootstrap.validate_answer(answer, name)
    hubs = bootstrap.validate_hubs(answer.get("hubs"), name, address, prefix)
    (conf_dir / "hosts").mkdir(parents=True, exist_ok=True)
    for hub in hubs:
        (conf_dir / "hosts" / hub.name).write_text(hub.host_file.rstrip("\n") + "\n")
    (conf_dir / "hosts" / name).write_text(
        bootstrap.render_host_file(["Subnet = {}/32".format(address)], public_pem))
    key = conf_dir / "rsa_key.priv"
    key.write_bytes(private_pem)
    os.chmod(key, 0o600)
    conf = bootstrap.render_node_tinc_conf(name, "fleet", [hub.name for hub in hubs])
    (conf_dir / "tinc.conf").write_text(dummy_node_conf(conf, port, keepalive))
    return address


def rewrite_keepalive(conf_dir: Path, keepalive: Optional[Sequence[str]],
                      name: str, hubs: Sequence[str], port: int) -> None:
    """Rewrite a fleet node's tinc.conf with another keepalive (None: bootstrap.py's)."""
    conf = bootstrap.render_node_tinc_conf(name, "fleet", hubs)
    (conf_dir / "tinc.conf").write_text(dummy_node_conf(conf, port, keepalive))


# ------------------------------------------------------------------------ enrolment worker

def _enrol_one(token_text: str, endpoints: Sequence[bootstrap.HubEndpoint], item: dict,
               keepalive: Optional[Sequence[str]]) -> dict:
    private_pem = Path(item["key"]).read_bytes()
    public_pem = public_pem_of(private_pem)
    _, answer = bootstrap.enroll_any(token_text, endpoints, item["name"], public_pem,
                                     timeout=120)
    address = write_node_dir(Path(item["dir"]), item["name"], answer, private_pem, public_pem,
                             item["port"], keepalive)
    return {"name": item["name"], "address": address,
            "hubs": [hub["name"] for hub in answer["hubs"]]}


def enrol_worker(job: dict) -> List[dict]:
    """Enrol every node of `job` through the pinned HTTPS API (bootstrap.enroll_any, several
    at once) and write its conf dir. Runs inside the fleet namespace (the API is only
    reachable there); the token comes on stdin, never in argv."""
    token_text = job["token"]
    endpoints = bootstrap.decode_token(token_text).endpoints()
    with concurrent.futures.ThreadPoolExecutor(ENROL_THREADS) as pool:
        return list(pool.map(lambda item: _enrol_one(token_text, endpoints, item,
                                                     job.get("keepalive")), job["nodes"]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.fleet",
                                     description="fleet helper run inside the fleet namespace")
    parser.add_argument("command", choices=["enrol"],
                        help="enrol: read a job (JSON, with the token) on stdin, enrol its "
                             "nodes, print their addresses as JSON")
    parser.parse_args(argv)
    print(json.dumps(enrol_worker(json.load(sys.stdin))))
    return 0


# ------------------------------------------------------------------------------ the fleet

class Restart(NamedTuple):
    """A restart of a hub's tincd: the epoch second from which reconnections count, the
    seconds the old tincd took to exit and the new one to listen."""
    since: int
    stop_s: float
    start_s: float


class FleetNode:
    """One dummy tincd of the fleet."""

    def __init__(self, name: str, conf_dir: Path, key: Path, port: int) -> None:
        self.name = name
        self.conf_dir = conf_dir
        self.key = key
        self.port = port
        self.address = ""
        self.hubs: List[str] = []


class Fleet:
    """`nodes` dummy tincd nodes and `tun` tun nodes on `hubs` hubs (1: SQLite registry;
    2 or more: one throwaway PostgreSQL registry, labkit.multihub). Context manager."""

    def __init__(self, nodes: int, tun: int = 2, hubs: int = 1, net: str = "fleet",
                 vpn_subnet: str = "10.64.0.0/21", key_size: int = 2048,
                 keepalive: Optional[Sequence[str]] = None, say=None) -> None:
        if not 1 <= hubs <= 4 or not 0 <= tun <= 50 or not 1 <= nodes <= 5000:
            raise ValueError("1-4 hubs, 0-50 tun nodes, 1-5000 nodes")
        self.n_nodes, self.n_tun, self.n_hubs = nodes, tun, hubs
        self.net, self.vpn_subnet, self.key_size = net, vpn_subnet, key_size
        self.keepalive = keepalive
        self.say = say or (lambda msg: None)
        self.hub_names = ["hub%d" % (i + 1) for i in range(hubs)]
        self.tun_names = ["tun%d" % (i + 1) for i in range(tun)]
        self.lab = None  # multihub.MultiHubLab with several hubs
        self.topo: Optional[netlab.NatTopology] = None
        self.hubs: Dict[str, netlab.HubDriver] = {}
        self.fleet: Optional[netlab.Host] = None
        self.nodes: List[FleetNode] = []
        self.tun_addresses: Dict[str, str] = {}

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "Fleet":
        """Keys, namespaces, hubs serving, tun nodes joined and pinging, fleet nodes enrolled
        (their tincd not started yet: start_nodes)."""
        try:
            started = time.monotonic()
            keys = fleet_keys(self.n_nodes, self.key_size)
            self.say("%d cached RSA-%d keys ready in %.1f s" % (self.n_nodes, self.key_size,
                                                              time.monotonic() - started))
            self._make_hubs()
            self._wire_fleet()
            for name in self.tun_names:
                self._enrol_tun(name)
            self._enrol_fleet(keys)
        except BaseException:
            self.close()
            raise
        return self

    def _make_hubs(self) -> None:
        if self.n_hubs == 1:
            self.topo = netlab.build_nat_topology(node_names=self.tun_names or None,
                                                  n_nodes=len(self.tun_names),
                                                  hub_names=self.hub_names)
            hub = netlab.HubDriver(self.topo.hub, self.net, self.hub_names[0],
                                   vpn_subnet=self.vpn_subnet)
            hub.init(self.key_size)
            hub.serve()
            self.hubs[hub.name] = hub
        else:
            from . import multihub

            self.lab = multihub.MultiHubLab(self.hub_names, self.tun_names, self.net,
                                            self.vpn_subnet, self.key_size).start()
            self.topo = self.lab.topo
            for name in self.hub_names:
                self.hubs[name] = self.lab.add_hub(name)
        self.say("%d hub(s) serving" % len(self.hubs))

    def _wire_fleet(self) -> None:
        """The fleet namespace on the router's public bridge, next to the hubs."""
        assert self.topo is not None
        fleet = self.fleet = self.topo.add_host("fleet")
        router = self.topo.router.netns
        netlab.run_root(["ip", "-n", router, "link", "add", "pubfleet", "type", "veth", "peer",
                         "name", "eth0", "netns", fleet.netns])
        netlab.run_root(["ip", "-n", router, "link", "set", "pubfleet", "master", "pub0"])
        netlab.run_root(["ip", "-n", router, "link", "set", "pubfleet", "up"])
        netlab.run_root(["ip", "-n", fleet.netns, "addr", "add", FLEET_ADDRESS + "/24", "dev",
                         "eth0"])
        netlab.run_root(["ip", "-n", fleet.netns, "link", "set", "eth0", "up"])
        netlab.run_root(["ip", "-n", fleet.netns, "link", "set", "lo", "up"])
        fleet.sysctl("net.ipv4.ip_forward", 0)

    def _enrol_tun(self, name: str) -> None:
        """bootstrap.py on tun node `name` (the real join: tun device, tincd started)."""
        hub = self.hubs[self.hub_names[0]]
        token = hub.token_create()["token"]
        cp = self.topo[name].run(netlab.bootstrap_argv(name=name, key_size=self.key_size,
                                                       timeout=60),
                                 env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=180, check=False)
        address = netlab.printed_address(cp.stdout) if cp.returncode == 0 else None
        if not address:
            raise RuntimeError("bootstrap.py on %s: exit %s\n%s\n%s"
                               % (name, cp.returncode, cp.stderr[-2000:], cp.stdout[-2000:]))
        self.tun_addresses[name] = address

    def _enrol_fleet(self, keys: Sequence[Path]) -> None:
        assert self.fleet is not None and self.topo is not None
        root = self.topo.workdir / "fleet-nodes"
        root.mkdir(mode=0o700)
        self.nodes = [FleetNode("f%05d" % i, root / ("f%05d" % i), keys[i], FIRST_PORT + i)
                      for i in range(self.n_nodes)]
        hub = self.hubs[self.hub_names[0]]
        token = hub.token_create("--uses", str(self.n_nodes))["token"]
        job = {"token": token, "keepalive": self.keepalive,
               "nodes": [{"name": n.name, "dir": str(n.conf_dir), "key": str(n.key),
                          "port": n.port} for n in self.nodes]}
        started = time.monotonic()
        python = str(netlab.VENV / "bin" / "python")
        cp = self.fleet.run([python, "-m", "labkit.fleet", "enrol"], input=json.dumps(job),
                            timeout=600, check=False)
        if cp.returncode != 0:
            raise RuntimeError("fleet enrolment failed (exit %s):\n%s"
                               % (cp.returncode, cp.stderr[-3000:]))
        answers = {a["name"]: a for a in json.loads(cp.stdout.strip().splitlines()[-1])}
        for node in self.nodes:
            node.address = answers[node.name]["address"]
            node.hubs = answers[node.name]["hubs"]
        self.say("%d fleet nodes enrolled through the API in %.1f s"
                 % (self.n_nodes, time.monotonic() - started))

    def close(self) -> None:
        """Every process killed, every namespace removed (and the two-hub registry)."""
        if self.lab is not None:
            self.lab.close()
        elif self.topo is not None:
            self.topo.close()

    def netlab_diagnostics(self) -> str:
        """The topology's state, then how many nodes each hub sees and a few nodes' logs."""
        out = self.topo.diagnostics() if self.topo is not None else ""
        for hub in self.hubs:
            try:
                out += "\n%s sees %d nodes up (since ever)" % (hub, self.connected_since(hub, 0))
            except OSError as exc:
                out += "\n%s: liveness unreadable: %s" % (hub, exc)
        for node in self.nodes[:3]:
            try:
                out += "\n===== %s tinc.log =====\n%s" % (node.name, netlab._tail(
                    (node.conf_dir / "tinc.log").read_text(errors="replace"), 20))
            except OSError:
                pass
        return out

    # -- the fleet's tincd ------------------------------------------------------------------
    def start_nodes(self) -> float:
        """Start every fleet node's tincd (each daemonizes); the seconds it took."""
        assert self.fleet is not None
        started = time.monotonic()
        script = ('for d in "$@"; do tincd -c "$d" --pidfile="$d/tinc.pid" '
                  '--logfile="$d/tinc.log" || echo "tincd -c $d failed" >&2; done')
        for first in range(0, len(self.nodes), 500):  # bounded argv
            dirs = [str(n.conf_dir) for n in self.nodes[first:first + 500]]
            self.fleet.run(["sh", "-c", script, "sh"] + dirs, timeout=300)
        return time.monotonic() - started

    def stop_nodes(self) -> None:
        """Kill every fleet tincd (the namespace's processes but its anchor)."""
        assert self.fleet is not None
        self.fleet.kill_all(grace=5.0)

    def set_keepalive(self, keepalive: Optional[Sequence[str]]) -> None:
        """Rewrite every fleet node's tinc.conf with `keepalive` (nodes stopped first)."""
        self.keepalive = keepalive
        for node in self.nodes:
            rewrite_keepalive(node.conf_dir, keepalive, node.name, node.hubs, node.port)

    # -- what the hubs see ------------------------------------------------------------------
    def hub_host(self, hub: str) -> netlab.Host:
        return self.hubs[hub].host

    def connected_since(self, hub: str, since: int, tun_since: Optional[int] = None) -> int:
        """How many nodes the hub's tincd has seen become reachable at or after epoch second
        `since` (tun nodes: `tun_since`, default the same) and not go down since (its
        liveness records)."""
        host = self.hub_host(hub)
        seen = read_liveness(Path("/proc/%d/root%s" % (host.anchor_pid, HUB_STATE)))
        tun_since = since if tun_since is None else tun_since
        wanted = dict.fromkeys((n.name for n in self.nodes), since)
        wanted.update(dict.fromkeys(self.tun_names, tun_since))
        return sum(1 for name, record in seen.items()
                   if name in wanted and record.up and record.at >= wanted[name])

    @property
    def total(self) -> int:
        return self.n_nodes + self.n_tun

    def wait_connected(self, hub: str, since: int, timeout: float,
                       tun_since: Optional[int] = None, interval: float = 0.5) -> Optional[float]:
        """Seconds until every node is connected to `hub` since `since` (epoch second; tun
        nodes: `tun_since`), counted from now; None when `timeout` passes first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.connected_since(hub, since, tun_since) >= self.total:
                return time.monotonic() - started
            time.sleep(interval)
        return None

    def hub_tincd_pid(self, hub: str) -> Optional[int]:
        return self.hubs[hub].tincd_pid()

    def restart_hub_tincd(self, hub: str, stop_timeout: float = 600) -> "Restart":
        """SIGTERM the hub's tincd, wait for it to exit, start it again (listening). A tincd
        1.0 with N connections takes a while to exit: it runs host-down (and graph()) once
        per connection."""
        driver = self.hubs[hub]
        started = time.monotonic()
        netlab.stop_tincd(driver.host, driver.net, timeout=stop_timeout)
        stopped = time.monotonic()
        since = int(time.time())
        netlab.start_tincd(driver.host, driver.net, timeout=30)
        return Restart(since, stopped - started, time.monotonic() - stopped)

    def set_host_down_script(self, hub: str, enabled: bool) -> None:
        """Move the hub's host-down script aside (or back): for attributing a slow tincd exit
        to it (tincd runs it once per node while it exits). Liveness then records no downs."""
        driver = self.hubs[hub]
        path = "/etc/tinc/%s/host-down" % driver.net
        src, dst = (path + ".off", path) if enabled else (path, path + ".off")
        if driver.host.exists(src):
            driver.host.run(["mv", "-f", "--", src, dst])

    def udp_receive_drops(self, hub: str) -> int:
        """UDP datagrams the kernel dropped in the hub's namespace for a full socket buffer
        (RcvbufErrors of /proc/net/snmp; the hub's tincd owns its only UDP socket)."""
        return udp_rcvbuf_errors(self.hub_host(hub).read_file("/proc/net/snmp"))

    def hub_rss_mb(self, hub: str) -> Dict[str, float]:
        """RSS (MB) of the hub's tincd and of its `tinc-hub serve`."""
        driver = self.hubs[hub]
        out = {"tincd": rss_mb(driver.tincd_pid())}
        if driver.serve_proc is not None:
            out["api"] = rss_mb(driver.serve_proc.popen.pid)
        return out


class PingLoss:
    """``ping -i INTERVAL`` from `src` to `dst` in the background, bounded by `max_seconds`'
    worth of packets; ``lost()`` counts the echo requests without a reply between the first
    and the last reply (icmp_seq gaps), so only what an event in between cost."""

    def __init__(self, src: netlab.Host, dst: str, interval: float = 0.2,
                 max_seconds: int = 600) -> None:
        self.interval = interval
        self.proc = src.popen(["ping", "-n", "-i", str(interval), "-W", "1",
                               "-c", str(int(max_seconds / interval)), dst],
                              log="%s.ping-%s.log" % (src.name, dst))

    def replies(self) -> List[int]:
        return sorted({int(m.group(1)) for m in
                       re.finditer(r"bytes from .*icmp_seq=(\d+)", self.proc.output())})

    def lost(self) -> int:
        got = self.replies()
        return (got[-1] - got[0] + 1 - len(got)) if got else -1

    def gaps(self) -> List[tuple]:
        """(seconds after the first reply, requests lost) of each run of lost requests."""
        got = self.replies()
        return [(round((a - got[0] + 1) * self.interval, 1), b - a - 1)
                for a, b in zip(got, got[1:]) if b - a > 1]

    def stop(self) -> int:
        self.proc.stop()
        return self.lost()


def udp_rcvbuf_errors(snmp: str) -> int:
    """RcvbufErrors of the ``Udp:`` lines (names, then values) of a /proc/net/snmp text."""
    rows = [line.split()[1:] for line in snmp.splitlines() if line.startswith("Udp:")]
    if len(rows) != 2 or "RcvbufErrors" not in rows[0] or len(rows[0]) != len(rows[1]):
        raise ValueError("no Udp: counters in /proc/net/snmp")
    return int(rows[1][rows[0].index("RcvbufErrors")])


def rss_mb(pid: Optional[int]) -> float:
    """VmRSS of process `pid` in MB (nan when it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return float("nan")


def accept_bound_s(nodes: int) -> float:
    """The seconds tinc 1.0's accept throttle alone needs for `nodes` meta connections."""
    return nodes / ACCEPT_RATE


if __name__ == "__main__":
    sys.exit(main())
