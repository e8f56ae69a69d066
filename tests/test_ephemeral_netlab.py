"""Ephemeral nodes for real (issue 13): a real hub (`tinc-hub init` + `serve --sync-interval
10`, its own tincd) in a network namespace, 25 nodes that are real tincd processes with
DeviceType = dummy (enrolled through the real API with an `--ephemeral 15s` token), and one
node joined by bootstrap.py (its sync loop, its refusal line, its re-join).

One story, in order: 26 nodes online; 20 go away (tincd and sync loop killed), 6 kept; every
killed one removed within DURATION + 30 s (measured), the 6 untouched, host files gone, the freed
addresses handed out again; the returning bootstrap.py node told why (410) and joining again
with the one-liner; the reaper removing nothing while the hub's tincd is down."""

import ipaddress
import json
import os
import re
import signal
import sys
import time

import pytest
from cryptography.hazmat.primitives import serialization

from hub_fixtures import _rsa_private, rsa_public_pem
from labkit import netlab

pytestmark = pytest.mark.netlab

NET, HUB = "ephnet", "erebor"
DURATION = 15
REAL = "shire"  # the bootstrap.py node
DUMMIES = ["eph%02d" % i for i in range(25)]
NETDIR = "/etc/tinc/" + NET
HOSTS = NETDIR + "/hosts/"

# Run inside the hub's namespace by the test's own python: POST /v1/enroll for each
# {name, key} of stdin (a test client: TLS without the pin, to the hub it just made).
ENROL = r"""
import http.client, json, ssl, sys
request = json.load(sys.stdin)
context = ssl._create_unverified_context()
out = {}
for name, key in request["nodes"]:
    conn = http.client.HTTPSConnection(request["host"], request["port"], context=context, timeout=30)
    conn.request("POST", "/v1/enroll", json.dumps({"name": name, "public_key": key}),
                 {"Authorization": "Bearer " + request["token"], "Content-Type": "application/json"})
    answer = conn.getresponse()
    out[name] = [answer.status, json.loads(answer.read())]
    conn.close()
print(json.dumps(out))
"""


class Lab:
    def __init__(self, topo, hub, token):
        self.topo, self.hub, self.token = topo, hub, token
        self.dummies = {}  # name -> Proc of its tincd
        self.answers = {}  # name -> enrolment answer

    def netlab_diagnostics(self):
        return self.topo.diagnostics()

    def enrol(self, names, first_key=100):
        nodes = [[name, rsa_public_pem(first_key + i)] for i, name in enumerate(names)]
        request = {"host": netlab.HUB_PUBLIC, "port": netlab.API_PORT, "token": self.token, "nodes": nodes}
        done = self.hub.host.run([sys.executable, "-c", ENROL], input=json.dumps(request), timeout=120)
        answers = json.loads(done.stdout)
        for name, (status, body) in answers.items():
            assert status == 200, (name, status, body)
        return {name: body for name, (status, body) in answers.items()}

    def start_dummy(self, index, name, answer):
        """tincd with DeviceType = dummy in the hub's namespace, ConnectTo the hub."""
        host, base = self.hub.host, "%s/dummy/%s" % (self.hub.host.workdir, name)
        key = _rsa_private(100 + index, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode()
        host.write_file(base + "/tinc.conf", "Name = %s\nDeviceType = dummy\nAddressFamily = ipv4\n"
                        "Port = %d\nPingInterval = 5\nPingTimeout = 3\nConnectTo = %s\n"
                        % (name, 20000 + index, HUB))
        host.write_file(base + "/rsa_key.priv", key, mode=0o600)
        host.write_file(base + "/hosts/" + HUB, answer["hub"]["host_file"])
        host.write_file(base + "/hosts/" + name, "Subnet = %s/32\n\n%s" % (answer["address"],
                                                                        rsa_public_pem(100 + index)))
        self.dummies[name] = host.popen(["tincd", "-c", base, "-D", "--pidfile", base + "/pid", "-d0"],
                                        log="%s.tincd.log" % name)

    def nodes(self):
        return {row["name"]: row for row in self.hub.nodes()}


@pytest.fixture(scope="module")
def lab():
    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    topo = netlab.build_nat_topology(node_names=[REAL], hub_name="hub")
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.serve_proc = hub.host.popen(
            [hub.tinc_hub, "serve"], log="hub.tinc-hub-serve.log",
            env={"PYTHONUNBUFFERED": "1", "TINC_HUB_SYNC_INTERVAL": "10"})
        hub.wait_healthy(30)
        token = hub.token_create("--uses", "40", "--ephemeral", "%ds" % DURATION)["token"]
        yield Lab(topo, hub, token)
    finally:
        topo.close()


def join_real(lab):
    argv = netlab.bootstrap_argv(name=REAL, key_size=2048, init="none", timeout=60,
                                 python="/usr/bin/python3")
    return lab.topo[REAL].run(argv, env={"TINC_BOOTSTRAP_TOKEN": lab.token}, timeout=180, check=False)


def kill_real(lab):
    """The machine goes away: its tincd and sync loop die at once (SIGKILL: no tinc-down)."""
    node = lab.topo[REAL]
    for pid in node.pids():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue
        if words[0].endswith(b"tincd") or b"sync" in words:
            os.kill(pid, signal.SIGKILL)


def test_ephemeral_nodes_offline_are_removed_online_ones_kept(lab):
    started = time.monotonic()
    answers = lab.enrol(DUMMIES)
    for index, name in enumerate(DUMMIES):
        lab.start_dummy(index, name, answers[name])
    joined = join_real(lab)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    everyone = DUMMIES + [REAL]
    netlab.wait_until(lambda: all(r["online"] for r in lab.nodes().values()) and len(lab.nodes()) == 26,
                      60, 0.5, what="26 ephemeral nodes online")
    before = lab.nodes()
    assert all(before[n]["ephemeral"] == DURATION and before[n]["expires"] == "online" for n in everyone)
    print("26 nodes enrolled and online in %.1f s" % (time.monotonic() - started))

    killed, kept = DUMMIES[:19] + [REAL], DUMMIES[19:]  # 20 go away, 6 stay
    first_killed = time.monotonic()
    for name in killed[:-1]:
        lab.dummies[name].popen.send_signal(signal.SIGKILL)
    kill_real(lab)
    gone_at = time.monotonic()  # the last one died
    netlab.wait_until(lambda: not set(killed) & set(lab.nodes()), DURATION + 30, 0.5,
                      what="the 20 killed nodes removed")
    removed_at = time.monotonic()
    took = removed_at - gone_at
    print("20 offline ephemeral nodes removed %.1f s after they died (DURATION %d s)" % (took, DURATION))
    # none before DURATION after the first one died, all within DURATION + 30 s of the last
    assert removed_at - first_killed >= DURATION and took <= DURATION + 30
    # one audit line per removal; none was offline less than DURATION (tincd's leave time)
    audit = re.findall(r"ephemeral result=removed name=(\w+) address=\S+ offline=(\d+)s", lab.hub.serve_proc.output())
    assert sorted(name for name, _ in audit) == sorted(killed)
    assert all(DURATION <= int(offline) <= DURATION + 10 for _, offline in audit), audit
    after = lab.nodes()
    assert sorted(after) == sorted(kept)
    assert all(after[n]["address"] == before[n]["address"] and after[n]["online"] for n in kept)
    hosts = set(lab.hub.host.run(["ls", HOSTS]).stdout.split())
    assert not set(killed) & hosts and set(kept) <= hosts

    # the freed addresses are handed out again (lowest free first)
    freed = {before[n]["address"] for n in killed}
    fresh = lab.enrol(["late%d" % i for i in range(3)], first_key=200)
    assert {a["address"] for a in fresh.values()} <= freed

    # the machine that comes back is told why, once; re-running the one-liner joins it again
    node = lab.topo[REAL]
    again = node.run(["/usr/bin/python3", NETDIR + "/bootstrap.py", "sync", "--once"], check=False, timeout=60)
    told = again.stdout + again.stderr
    assert again.returncode != 0 and "was removed" in told and "offline (ephemeral)" in told, told
    rejoined = join_real(lab)
    assert rejoined.returncode == 0, rejoined.stdout + rejoined.stderr
    address = netlab.printed_address(rejoined.stdout)
    assert address and ipaddress.IPv4Address(address) in ipaddress.IPv4Network("10.0.0.0/24")
    assert REAL in lab.nodes()


def test_nothing_is_removed_while_the_hubs_tincd_is_down(lab):
    present = set(lab.nodes())
    assert present, "the first test left nodes"
    netlab.stop_tincd(lab.hub.host, NET)
    stopped = time.monotonic()
    # every node is now off the VPN for longer than its DURATION; the hub cannot tell: it keeps them
    netlab.wait_until(lambda: time.monotonic() - stopped > DURATION + 8, DURATION + 20, 1.0)
    assert set(lab.nodes()) == present
    log = lab.hub.serve_proc.output()
    assert "none removed while the hub's tincd (net %s) is not running" % NET in log
