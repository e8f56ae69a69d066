#!/usr/bin/env python3
"""Two-hub tinc 1.0 measurement bed (research for issue 11). Raw ip netns + veth + bridge.

Underlay 192.0.2.0/24 on a bridge in namespace <P>sw: h1=.1 h2=.2 a=.11 b=.12.
VPN 10.0.0.0/24: h1=.1 h2=.2 a=.11 b=.12. Nothing touches the root namespace's routing;
every namespace is deleted on exit (pass or fail).
"""
import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE = Path("/tmp/multihub")
KEYS = BASE / "keys"
UNDER = {"h1": "192.0.2.1", "h2": "192.0.2.2", "a": "192.0.2.11", "b": "192.0.2.12"}
VPN = {"h1": "10.0.0.1", "h2": "10.0.0.2", "a": "10.0.0.11", "b": "10.0.0.12"}
HUBS = ("h1", "h2")
NODES = ("a", "b")


def sh(cmd, check=True, timeout=30):
    cp = subprocess.run(cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and cp.returncode:
        raise RuntimeError("%s: %s %s" % (cmd, cp.returncode, cp.stderr.strip()))
    return cp


def ensure_key(name):
    d = KEYS / name
    if (d / "rsa_key.priv").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts").mkdir(exist_ok=True)
    (d / "tinc.conf").write_text("Name = %s\n" % name)
    sh(["tincd", "-c", str(d), "-K2048"], timeout=60)
    return d


def pubkey(name):
    text = (KEYS / name / "hosts" / name).read_text()
    m = re.search(r"-----BEGIN RSA PUBLIC KEY-----.*?-----END RSA PUBLIC KEY-----", text, re.S)
    return m.group(0) + "\n"


class Lab:
    def __init__(self, tag):
        self.p = "mh%s" % secrets.token_hex(2)
        self.tag = tag
        self.dir = BASE / "run" / ("%s-%s" % (self.p, tag))
        self.procs = {}
        self.ns = {n: self.p + n for n in ("sw",) + HUBS + NODES}
        atexit.register(self.close)

    # --- topology -------------------------------------------------------------------
    def build(self):
        for ns in self.ns.values():
            sh(["ip", "netns", "add", ns])
        sw = self.ns["sw"]
        sh(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", sw, "link", "set", "br0", "up"])
        for h in HUBS + NODES:
            ns = self.ns[h]
            port = "%s-%s" % (self.p, h)  # in sw
            sh(["ip", "link", "add", port, "netns", sw, "type", "veth", "peer", "name", "eth0",
                "netns", ns])
            sh(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            sh(["ip", "-n", ns, "addr", "add", UNDER[h] + "/24", "dev", "eth0"])
            sh(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def close(self):
        for name in list(self.procs):
            self.kill(name)
        for ns in self.ns.values():
            if os.path.exists("/run/netns/" + ns):
                for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                sh(["ip", "netns", "del", ns], check=False)

    # --- tinc -----------------------------------------------------------------------
    def host_file(self, name, subnets):
        lines = []
        if name in HUBS:
            lines.append("Address = %s" % UNDER[name])
        lines += ["Subnet = %s" % s for s in subnets]
        return "\n".join(lines) + "\n\n" + pubkey(name)

    def configure(self, name, conf, hosts):
        """conf: dict/list of tinc.conf lines; hosts: {peer: [subnets]} as seen by `name`."""
        d = self.dir / name
        (d / "hosts").mkdir(parents=True, exist_ok=True)
        (d / "tinc.conf").write_text("Name = %s\nInterface = vpn0\nAddressFamily = ipv4\n"
                                     % name + "".join(l + "\n" for l in conf))
        shutil.copy(KEYS / name / "rsa_key.priv", d / "rsa_key.priv")
        os.chmod(d / "rsa_key.priv", 0o600)
        for peer, subnets in hosts.items():
            (d / "hosts" / peer).write_text(self.host_file(peer, subnets))
        up = d / "tinc-up"
        up.write_text("#!/bin/sh\nip addr add %s/24 dev $INTERFACE\nip link set $INTERFACE up\n"
                      % VPN[name])
        up.chmod(0o755)

    def start(self, name):
        d = self.dir / name
        log = open(d / "stdout.log", "a")
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[name], "tincd", "-c", str(d), "-D", "-d3",
             "--pidfile=%s" % (d / "pid"), "--logfile=%s" % (d / "tinc.log")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            p.send_signal(sig)  # ip netns exec execs tincd: same pid
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    # --- link control ---------------------------------------------------------------
    def link(self, name, up):
        sh(["ip", "-n", self.ns["sw"], "link", "set", "%s-%s" % (self.p, name),
            "up" if up else "down"])

    def block(self, name, peer):
        """Drop all underlay traffic between name and peer (in name's namespace)."""
        ns = self.ns[name]
        rules = ("table inet mhblock { chain out { type filter hook output priority 0; "
                 "ip daddr %s drop; }; chain in { type filter hook input priority 0; "
                 "ip saddr %s drop; }; }" % (UNDER[peer], UNDER[peer]))
        sh(["ip", "netns", "exec", ns, "nft", rules])

    # --- probes ---------------------------------------------------------------------
    def ping_once(self, src, dst, wait=1):
        return sh(["ip", "netns", "exec", self.ns[src], "ping", "-c1", "-W%d" % wait, VPN[dst]],
                  check=False).returncode == 0

    def wait_ping(self, src, dst, timeout):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.ping_once(src, dst):
                return time.monotonic() - t0
            time.sleep(0.2)
        return None

    def counters(self, name):
        j = json.loads(sh(["ip", "-n", self.ns[name], "-s", "-j", "link", "show", "eth0"]).stdout)
        st = j[0]["stats64"]
        return st["rx"]["packets"], st["tx"]["packets"]

    def relay_hub(self, src, dst, count=50):
        before = {h: self.counters(h) for h in HUBS}
        cp = sh(["ip", "netns", "exec", self.ns[src], "ping", "-q", "-c%d" % count, "-i0.02",
                 "-W1", VPN[dst]], check=False)
        after = {h: self.counters(h) for h in HUBS}
        loss = re.search(r"(\d+)% packet loss", cp.stdout)
        return {h: {"rx": after[h][0] - before[h][0], "tx": after[h][1] - before[h][1]}
                for h in HUBS}, (loss.group(1) + "%") if loss else "?"

    def peers_of(self, hub):
        out = sh(["ip", "netns", "exec", self.ns[hub], "ss", "-tnH", "state", "established",
                  "( sport = :655 or dport = :655 )"]).stdout
        found = set()
        for n, ip in UNDER.items():
            if re.search(r"\s%s:\d+\s*$" % re.escape(ip), out, re.M):
                found.add(n)
        return found


class Pinger:
    """Continuous ping (every 0.1 s) with timestamps, to measure an outage."""

    def __init__(self, lab, src, dst):
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.ns[src], "ping", "-D", "-n",
                                   "-i0.1", "-W1", VPN[dst]], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)

    def stop(self):
        self.p.send_signal(signal.SIGINT)
        out, _ = self.p.communicate(timeout=10)
        return [float(m.group(1)) for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from", out, re.M)]


def outage(replies, t_event, until):
    """(gap seconds, recovery seconds after the event) of the largest reply gap after t_event."""
    rs = [r for r in replies if r >= t_event - 2]
    best = (0.0, None, None)
    prev = None
    for r in rs:
        if prev is not None and r - prev > best[0] and r > t_event:
            best = (r - prev, prev, r)
        prev = r
    if prev is None or prev < t_event:
        return None, None  # never recovered
    if best[0] < 0.5:
        return 0.0, 0.0
    return round(best[0], 1), round(best[2] - t_event, 1)


def wait_for(pred, timeout, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return time.monotonic() - t0
        time.sleep(step)
    return None
