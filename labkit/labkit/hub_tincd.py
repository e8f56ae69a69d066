"""labkit.hub_tincd: the hub's real tincd at fleet size (bench/sighup_scale.py and the SIGHUP
storm test): a hub host in a netlab namespace with the config ``tinc-hub init`` writes, its
tincd logging to a file (``Got HUP signal`` lines are counted), host files written en masse,
a probe node with a real tun device that pings the hub, and /proc probes of tincd.

Network safety: everything runs in namespaces netlab makes (and removes); every wait is bounded.
"""

import asyncio
import ipaddress
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import List, NamedTuple, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from labkit import netlab
from tinc_hub.hostfiles import render_node_host_file

HUP_LINE = "Got HUP signal"  # tinc 1.0's sighup_handler logs it for every SIGHUP, at any -d


# ------------------------------------------------------------------------------- /proc probes

class ProcSample(NamedTuple):
    state: str  # R running (or runnable), S sleeping (tincd waits in pselect), D disk ...
    cpu: float  # utime + stime, seconds


def proc_sample(pid: int) -> ProcSample:
    """State and CPU time of ``pid`` from /proc/PID/stat (the comm field may hold spaces)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return ProcSample(fields[0], (int(fields[11]) + int(fields[12])) / ticks)


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS for pid %d" % pid)


def wait_idle(pid: int, timeout: float, poll: float = 0.002) -> float:
    """Seconds until ``pid`` is seen sleeping (tincd back in pselect after a reload)."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        if proc_sample(pid).state not in ("R", "D") or elapsed > timeout:
            return elapsed
        time.sleep(poll)


# --------------------------------------------------------------------------------- host files

def derived_public_keys(count: int) -> List[str]:
    """``count`` distinct RSA-2048 public keys (PKCS#1 PEM) in milliseconds: one real modulus
    plus 2i. They parse as RSA keys (the hub and tincd only read them); nobody holds their
    private halves, so no node can connect with them."""
    base = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    return [rsa.RSAPublicNumbers(65537, base.n + 2 * i).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode() for i in range(count)]


def write_host_files(hosts_dir: Path, addresses: Sequence[str], public_pem: str,
                     prefix: str = "n") -> List[str]:
    """hosts/<prefix><i> for each address, rendered as the hub renders a node's (one key for
    all: tincd reads it at connection time only). Returns the names."""
    names = []
    for i, address in enumerate(addresses):
        name = "%s%d" % (prefix, i)
        (hosts_dir / name).write_text(render_node_host_file(address, public_pem))
        names.append(name)
    return names


def hup_count(log_text: str) -> int:
    return log_text.count(HUP_LINE)


# ----------------------------------------------------------------------------------- the lab

class HubTincdLab:
    """netlab NAT topology with the hub (``tinc-hub init --init none``: its config, its key) and
    one probe node; the hub's tincd restarted with ``--logfile``. Use as a context manager."""

    def __init__(self, net: str, vpn_subnet: str = "10.60.0.0/16", hub_name: str = "hub1",
                 probe: str = "probe") -> None:
        self.net, self.vpn_subnet, self.probe_name = net, ipaddress.ip_network(vpn_subnet), probe
        self.topo = netlab.build_nat_topology(node_names=[probe], hub_name="hub")
        try:
            self.hub = netlab.HubDriver(self.topo.hub, net, hub_name, vpn_subnet=vpn_subnet)
            self.hub.init(key_size=2048, init="none")
            netlab.stop_tincd(self.topo.hub, net)
            self.start_tincd()
        except BaseException:
            self.topo.close()
            raise

    def __enter__(self) -> "HubTincdLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.topo.close()

    def netlab_diagnostics(self) -> str:
        return self.topo.diagnostics() + "\n--- hub tincd log (tail)\n" + self.log_text()[-3000:]

    # -- paths seen from here (the host's private mounts, through its anchor's root) ----------
    def hub_path(self, path: str) -> Path:
        return Path("/proc/%d/root" % self.topo.hub.anchor_pid) / path.lstrip("/")

    @property
    def net_dir(self) -> Path:
        return self.hub_path("/etc/tinc/%s" % self.net)

    @property
    def hosts_dir(self) -> Path:
        return self.net_dir / "hosts"

    @property
    def log_path(self) -> Path:
        return self.hub_path("/var/log/tinc.%s.log" % self.net)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- the hub's tincd -------------------------------------------------------------------------
    def start_tincd(self) -> int:
        self.pid = netlab.start_tincd(self.topo.hub, self.net,
                                      extra=["-d1", "--logfile=/var/log/tinc.%s.log" % self.net])
        return self.pid

    def restart_tincd(self) -> int:
        netlab.stop_tincd(self.topo.hub, self.net)
        return self.start_tincd()

    def hub_vpn_address(self) -> str:
        return str(self.vpn_subnet.network_address + 1)

    def free_addresses(self, count: int, skip: int = 0) -> List[str]:
        """Addresses after the hub's (.1) and the probe's (.2)."""
        first = int(self.vpn_subnet.network_address) + 3 + skip
        return [str(ipaddress.IPv4Address(first + i)) for i in range(count)]

    # -- the probe node: a real tincd with a tun device ------------------------------------------
    def enrol_and_start_probe(self, token: str, private_key: rsa.RSAPrivateKey) -> float:
        """Enrol the probe node through the API with ``private_key``'s public key, start its
        tincd at the address answered; returns the seconds the enrolment took."""
        pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.PKCS1).decode()
        asked = time.monotonic()
        answer = enrol_burst_in(self.topo.hub, token, [self.probe_name], [pem])[0]
        answered = time.monotonic() - asked
        if answer["status"] != 200:
            raise RuntimeError("the probe's enrolment failed: %r" % (answer,))
        self.start_probe(answer["body"]["address"], private_key, write_hub_side=False)
        return answered

    def start_probe(self, address: str, private_key: rsa.RSAPrivateKey,
                    write_hub_side: bool = True) -> "netlab.Proc":
        """The probe's tincd (ConnectTo the hub, real tun) in the foreground; with
        ``write_hub_side`` its host file is written into the hub's hosts/ too."""
        node, base = self.topo[self.probe_name], "/etc/tinc/%s" % self.net
        public = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
        host_file = render_node_host_file(address, public)
        if write_hub_side:
            (self.hosts_dir / self.probe_name).write_text(host_file)
        node.write_file(base + "/tinc.conf", "Name = %s\nAddressFamily = ipv4\nInterface = %s\n"
                        "ConnectTo = %s\n" % (self.probe_name, self.net[:15], self.hub.name))
        node.write_file(base + "/rsa_key.priv", private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode(), mode=0o600)
        node.write_file(base + "/hosts/" + self.probe_name, host_file)
        node.write_file(base + "/hosts/" + self.hub.name,
                        (self.hosts_dir / self.hub.name).read_text())
        node.write_file(base + "/tinc-up", "#!/bin/sh\nip addr add %s/%d dev $INTERFACE\n"
                        "ip link set $INTERFACE up\n" % (address, self.vpn_subnet.prefixlen), 0o755)
        return node.popen(["tincd", "-n", self.net, "-D", "-d1"], log="probe.tincd.log")

    def probe_pings_hub(self, timeout: float = 1.0) -> bool:
        return self.topo[self.probe_name].ping(self.hub_vpn_address(), 1, timeout)


def new_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ------------------------------------------- an enrolment burst, run inside the hub's namespace

def enrol_burst_in(host: "netlab.Host", token: str, names: Sequence[str], keys: Sequence[str],
                   port: int = netlab.API_PORT, timeout: float = 300.0) -> List[dict]:
    """POST /v1/enroll for every (name, key) at once from inside ``host`` (to 127.0.0.1:port,
    where ``tinc-hub serve`` listens): [{"status", "seconds", "body"}] in order."""
    request = {"port": port, "token": token, "nodes": [list(p) for p in zip(names, keys)],
               "timeout": timeout}
    done = host.run([sys.executable, "-m", "labkit.hub_tincd"], input=json.dumps(request),
                    timeout=timeout + 60)
    return json.loads(done.stdout)


def _burst_main() -> None:
    from labkit.loopback_hub import Enrolment, post_enroll, raise_fd_limit

    request = json.load(sys.stdin)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the hub this test made
    items = [Enrolment(request["token"], name, key) for name, key in request["nodes"]]
    raise_fd_limit(len(items) + 256)

    async def run() -> list:
        return await asyncio.gather(*(post_enroll(request["port"], context, item, request["timeout"])
                                      for item in items))

    replies = asyncio.run(run())
    json.dump([{"status": r.status, "seconds": r.seconds, "body": r.body, "error": r.error}
               for r in replies], sys.stdout)


if __name__ == "__main__":
    _burst_main()
