"""Several hubs on one PostgreSQL registry (issue 11), for real: hubs erebor and rivendell
(later lothlorien) in network namespaces on a public bridge, nodes behind a NAT router, real
tincd, real `tinc-hub serve`, real bootstrap.py, a throwaway PostgreSQL cluster from Debian's
binaries reached over its private unix socket (labkit.multihub).

In file order on one lab: every node reaches every node and every hub; erebor (the hub that
carries node<->node traffic: the lowest-named one) killed, then cut off silently, each time
with the outage measured, a node joining through rivendell with a token made before, and
erebor's return; PostgreSQL stopped under a running VPN; revocation through every hub; a third
hub joining, then retired (`tinc-hub hub remove`), nodes following both changes by themselves.
First and apart (no namespaces): 500 enrolments over two loopback hubs at once.

Each test records what it measured (`netlab timings` at the end of the run).
"""

import asyncio
import ipaddress
import json
import secrets
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from hub_fixtures import rsa_public_pem
from labkit import multihub, netlab, postgres
from labkit.loopback_hub import (Enrolment, HubProcess, create_token, free_port, post_enroll,
                                 public_keys, raise_fd_limit)
from tinc_hub.hostfiles import render_node_host_file
from tinc_hub.state import StateDir

PG_MISSING = postgres.unavailable_reason()
pytestmark = pytest.mark.skipif(PG_MISSING is not None, reason=str(PG_MISSING))
netlab_only = pytest.mark.netlab

NET = "middle-earth"
VPN_SUBNET = "10.61.0.0/24"
EREBOR, RIVENDELL, LOTHLORIEN = "erebor", "rivendell", "lothlorien"
# hobbiton and dale join through erebor, bree through rivendell; esgaroth and fangorn join
# while erebor is dead (killed, then cut off), gondor while PostgreSQL is down; dale is revoked.
HOBBITON, BREE, DALE, ESGAROTH, FANGORN, GONDOR = (
    "hobbiton", "bree", "dale", "esgaroth", "fangorn", "gondor")
NODES = [HOBBITON, BREE, DALE, ESGAROTH, FANGORN, GONDOR]

IN_STEP_S = 5.0  # DESIGN: a change on one hub reaches every hub's hosts/ and tincd within 5 s
REJOIN_S = 45.0  # nodes rejoin a returned hub within MaxTimeout 14 + PingTimeout 3 (+ slack)
NODE_SYNC_S = 120.0  # issue 11: nodes follow a hub change within 2 minutes
LOOPBACK_NET, LOOPBACK_SUBNET = "lnet", "10.62.0.0/22"  # 500 nodes need more than a /24


def timing(label: str, seconds: float) -> float:
    netlab.record_timing("several hubs: " + label, seconds)
    return seconds


@pytest.fixture(scope="module")
def lab(pg) -> Iterator[multihub.MultiHubLab]:
    """erebor (makes the net) and rivendell (joins through the registry) serving; hobbiton
    and dale enrolled through erebor, bree through rivendell. lothlorien's host is wired
    but empty until the last test."""
    with multihub.MultiHubLab([EREBOR, RIVENDELL, LOTHLORIEN], NODES, NET, VPN_SUBNET,
                              pg=pg) as made:
        started = time.monotonic()
        made.add_hub(EREBOR)
        made.add_hub(RIVENDELL)
        timing("two hubs initialised and serving", time.monotonic() - started)
        for node, via in ((HOBBITON, EREBOR), (BREE, RIVENDELL), (DALE, EREBOR)):
            made.enrol(node, made.hub(via).token_create()["token"])
        yield made


def hub_vpn(lab: multihub.MultiHubLab, hub: str) -> str:
    return lab.hub(hub).vpn_address()


def joined(lab: multihub.MultiHubLab, *left_out: str) -> List[str]:
    """The nodes enrolled so far (earlier tests add some), but `left_out`."""
    return [n for n in NODES if n in lab.addresses and n not in left_out]


def wait_all_connected(lab: multihub.MultiHubLab, nodes: List[str], hubs: List[str],
                       timeout: float, what: str) -> float:
    """Wait until every node has a meta connection to every hub; seconds taken."""
    def missing():
        return [(n, h) for n in nodes for h in hubs if not lab.node_connected(n, h)]
    started = time.monotonic()
    left = netlab.wait_until(lambda: not missing(), timeout, 0.5)
    if not left:
        raise AssertionError("%s: not connected after %.0f s: %s" % (what, timeout, missing()))
    return time.monotonic() - started


def assert_pings(src: netlab.Host, dst: str, timeout: float = 20) -> None:
    assert src.wait_ping(dst, timeout), "%s cannot ping %s within %s s" % (src.name, dst, timeout)


def hub_has_nodes(lab: multihub.MultiHubLab, hub: str, nodes: List[str]) -> bool:
    files = lab.hub(hub).host_files()
    return all(n in files for n in nodes)


def assert_erebor_relays(lab: multihub.MultiHubLab) -> None:
    """hobbiton -> bree runs through erebor (nodes prefer the lowest-named reachable hub),
    so that erebor's death is the failure that matters."""
    # about 2 * 60 packets on the relaying hub; the other sees only background (keepalives,
    # PostgreSQL, nodes' sync polls: up to 20 in one CI run), well below the relay signal
    counts = lab.relayed_packets(HOBBITON, lab.addresses[BREE], count=60)
    assert counts[EREBOR] >= 110 and counts[RIVENDELL] < 60, counts


def measure_outage(lab: multihub.MultiHubLab, event_action, bound: float, span: float = 3.0):
    """Ping hobbiton -> bree every 0.1 s, run event_action(), wait until replies flow again
    steadily for `span` s (at most `bound` s); the outage in seconds (None: no recovery)."""
    pinger = multihub.Pinger(lab.host(HOBBITON), lab.addresses[BREE], max_seconds=int(bound) + 30)
    try:
        assert netlab.wait_until(lambda: len(pinger.replies()) >= 10, 10, 0.1), \
            "hobbiton -> bree does not flow before the event:\n" + pinger.proc.output()
        event = time.time()
        event_action()
        netlab.wait_until(lambda: pinger.flowing(event, span), bound, 0.2)
        until = time.time()
    finally:
        replies = pinger.stop()
    return multihub.outage(replies, event, until)


# ------------------------------------------------------------------ 500 enrolments
# (first in the file: it runs before the namespace lab exists, so the two do not load the
# 2 cores together)

@pytest.fixture
def loopback_pair(pg, tmp_path: Path) -> Iterator[List[HubProcess]]:
    """erebor (makes the net) and rivendell (joins) on 127.0.0.1, each with its own state and
    hosts/, on one new registry database; serving with the rate limit off (one source)."""
    database = "reg_" + secrets.token_hex(6)
    pg.create_database(database, user=multihub.REGISTRY_USER)
    url = pg.socket_url(database, multihub.REGISTRY_USER)
    servers = []
    try:
        for i, name in enumerate((EREBOR, RIVENDELL)):
            port, root = free_port(), tmp_path / name
            making = {"net": LOOPBACK_NET, "vpn_subnet": LOOPBACK_SUBNET} if i == 0 else {}
            state = multihub.init_loopback_hub(root, url, name, port, free_port(), **making)
            server = HubProcess(state, port, StateDir(state).cert_file,
                                tmp_path / (name + ".serve.log"), extra=["--rate-limit", "off"])
            servers.append(server.start())
        yield servers
    finally:
        for server in servers:
            server.stop()
        pg.drop_database(database)


async def _enrol_split(servers: List[HubProcess], items: List[Enrolment]) -> list:
    """Enrolment i goes to servers[i % 2], all at once."""
    return list(await asyncio.gather(*(
        post_enroll(servers[i % 2].port, servers[i % 2].ssl_context(), item, 120)
        for i, item in enumerate(items))))


def test_500_enrolments_over_two_hubs_at_once(loopback_pair):
    count = 500
    keys = public_keys(count)  # made before the clock starts
    token = create_token(loopback_pair[0].state_dir, uses=count)  # erebor's token, used on both
    items = [Enrolment(token, "n%03d" % i, keys[i]) for i in range(count)]
    raise_fd_limit(count + 256)
    started = time.monotonic()
    replies = asyncio.run(_enrol_split(loopback_pair, items))
    timing("500 enrolments over two hubs at once", time.monotonic() - started)
    statuses: Dict[int, int] = {}
    for r in replies:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    assert statuses == {200: count}, [r for r in replies if r.status != 200][:3]
    addresses = [r.body["address"] for r in replies]
    assert multihub.vpn_addresses_unique(addresses, LOOPBACK_SUBNET)
    for i, r in enumerate(replies):  # each answer lists both hubs, the answering one first
        assert [h["name"] for h in r.body["hubs"]] == [(EREBOR, RIVENDELL)[i % 2],
                                                       (RIVENDELL, EREBOR)[i % 2]], r.body
    expected = {"n%03d" % i: render_node_host_file(addresses[i], keys[i]) for i in range(count)}

    def hosts_equal_registry(server: HubProcess) -> bool:
        hosts = server.state_dir.parent / "tinc" / LOOPBACK_NET / "hosts"
        try:  # the hub may be renaming a file into place right now: then look again
            files = {p.name: p.read_text() for p in hosts.iterdir()
                     if p.name not in (EREBOR, RIVENDELL) and not p.name.startswith(".")}
        except FileNotFoundError:
            return False
        return files == expected
    took = multihub.wait_for(lambda: all(hosts_equal_registry(s) for s in loopback_pair),
                             IN_STEP_S, "both hubs' hosts/ to equal the registry")
    timing("500 enrolments -> both hubs' hosts/ equal the registry", took)
    listed = json.loads(multihub.hub_cli(loopback_pair[1].state_dir, "nodes", "--json"))
    listed = listed["nodes"] if isinstance(listed, dict) and "nodes" in listed else listed
    assert sorted(n["name"] for n in listed) == sorted(expected)


# ------------------------------------------------------------------------ two hubs

@netlab_only
def test_two_hubs_every_node_reaches_every_node_and_every_hub(lab):
    listed = {h["name"] for h in lab.hub(EREBOR).hubs()}
    assert listed == {EREBOR, RIVENDELL}, listed
    assert {h["name"] for h in lab.hub(RIVENDELL).hubs()} == listed
    vpn = {h: hub_vpn(lab, h) for h in (EREBOR, RIVENDELL)}
    assert vpn[EREBOR] != vpn[RIVENDELL]
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network(VPN_SUBNET) for a in vpn.values())
    # both hubs hold every node and each other, and connect to each other
    took = multihub.wait_for(lambda: all(hub_has_nodes(lab, h, [HOBBITON, BREE, DALE, EREBOR,
                                                               RIVENDELL]) for h in vpn),
                             IN_STEP_S, "every hub's hosts/ to hold every node")
    timing("last enrolment -> every hub's hosts/ (<= 5 s)", took)
    assert lab.hub(EREBOR).connect_to() == [RIVENDELL]
    assert lab.hub(RIVENDELL).connect_to() == [EREBOR]
    # every node knows both hubs and connects to both, wherever it enrolled
    for node in (HOBBITON, BREE, DALE):
        assert sorted(lab.node_connect_to(node)) == [EREBOR, RIVENDELL], node
        assert {EREBOR, RIVENDELL} <= set(lab.node_host_files(node)), node
    timing("nodes connected to both hubs", wait_all_connected(
        lab, [HOBBITON, BREE, DALE], [EREBOR, RIVENDELL], REJOIN_S, "two hubs"))
    started = time.monotonic()
    for src in (HOBBITON, BREE, DALE):
        for dst in (HOBBITON, BREE, DALE):
            if src != dst:
                assert_pings(lab.host(src), lab.addresses[dst])
        for hub in (EREBOR, RIVENDELL):
            assert_pings(lab.host(src), vpn[hub])
    for hub in (EREBOR, RIVENDELL):  # and the hubs reach every node (and each other)
        for dst in (HOBBITON, BREE, DALE):
            assert_pings(lab.host(hub), lab.addresses[dst])
    assert_pings(lab.host(EREBOR), vpn[RIVENDELL])
    timing("ping matrix of 3 nodes and 2 hubs", time.monotonic() - started)
    assert_erebor_relays(lab)


# ------------------------------------------------------------------ erebor dies, twice

@netlab_only
def test_hub_killed_traffic_continues_and_a_node_joins_through_the_other_hub(lab):
    erebor = lab.hub(EREBOR)
    token = erebor.token_create()["token"]  # made before the failure: erebor first
    fields = netlab.decode_token(token)
    assert fields["a"] == erebor.address
    assert [x[0] for x in fields.get("x", [])] == [lab.hub(RIVENDELL).address], fields
    assert_erebor_relays(lab)
    gap = measure_outage(lab, erebor.kill_hard, bound=30)
    assert gap is not None, "hobbiton -> bree never recovered after erebor was killed"
    timing("node<->node outage, erebor's processes killed (research ~0 s)", gap)
    assert gap < 1.5, "outage %.1f s when erebor's processes were killed (research: 0 s)" % gap
    started = time.monotonic()
    lab.enrol(ESGAROTH, token)
    timing("join with an erebor-first token while erebor is down", time.monotonic() - started)
    assert_pings(lab.host(ESGAROTH), lab.addresses[HOBBITON])
    assert hub_has_nodes(lab, RIVENDELL, [ESGAROTH])
    # erebor returns: it catches up from the registry, and nodes reconnect by themselves
    started = time.monotonic()
    erebor.start()
    took = multihub.wait_for(lambda: hub_has_nodes(lab, EREBOR, [ESGAROTH]), IN_STEP_S,
                             "the returned erebor to write hosts/%s" % ESGAROTH)
    timing("erebor back: serving -> caught up (hosts/ of the node it missed)", took)
    timing("erebor back: start -> every node reconnected", time.monotonic() - started
           + wait_all_connected(lab, [HOBBITON, BREE, DALE, ESGAROTH], [EREBOR], REJOIN_S,
                                "after erebor returned"))
    assert_pings(lab.host(EREBOR), lab.addresses[ESGAROTH])


@netlab_only
def test_hub_cut_off_silently_traffic_recovers_and_a_node_joins_through_the_other_hub(lab):
    erebor = lab.hub(EREBOR)
    nodes = joined(lab)
    wait_all_connected(lab, nodes, [EREBOR, RIVENDELL], REJOIN_S, "before the cut")
    token = erebor.token_create()["token"]
    assert_erebor_relays(lab)  # traffic went back to the returned erebor

    def silent_death():
        lab.set_link(EREBOR, False)  # no FIN, no RST reaches anyone
        erebor.kill_hard()  # and it is dead for real (its registry socket stays reachable)
    gap = measure_outage(lab, silent_death, bound=40)
    assert gap is not None, "hobbiton -> bree never recovered after erebor was cut off"
    timing("node<->node outage, erebor cut off (research <= ~11 s at 5/3)", gap)
    assert gap <= 12.0, ("outage %.1f s when erebor was cut off (research: <= PingInterval 5 + "
                         "2 * PingTimeout 3 = 11 s; issue: <= 15 s)" % gap)
    started = time.monotonic()
    lab.enrol(FANGORN, token)
    timing("join with an erebor-first token while erebor is silent", time.monotonic() - started)
    assert_pings(lab.host(FANGORN), lab.addresses[BREE])
    lab.set_link(EREBOR, True)
    started = time.monotonic()
    erebor.start()
    multihub.wait_for(lambda: hub_has_nodes(lab, EREBOR, [FANGORN]), IN_STEP_S,
                      "the returned erebor to write hosts/%s" % FANGORN)
    timing("erebor back after the cut: start -> every node reconnected",
           time.monotonic() - started + wait_all_connected(
               lab, nodes + [FANGORN], [EREBOR], REJOIN_S, "after erebor's link came back"))


# ------------------------------------------------------------------ PostgreSQL down

def curl_enroll(node: netlab.Host, hub: multihub.HubInNamespace, token: str, name: str,
                public_key: str) -> Dict[str, object]:
    """POST /v1/enroll with curl from `node` (pinned TLS; the token goes in on stdin, never
    in argv); {status, headers, body}."""
    pin = netlab.decode_token(token)["k"]
    body = json.dumps({"name": name, "public_key": public_key})
    node.write_file("/run/enroll-body.json", body, 0o600)
    config = 'header = "Authorization: Bearer %s"\n' % token
    cp = node.run(["curl", "-sS", "-i", "--max-time", "10", "-k", "--pinnedpubkey", pin,
                   "-H", "Content-Type: application/json", "--data-binary",
                   "@/run/enroll-body.json", "-K", "-", hub.url + "/v1/enroll"],
                  input=config, timeout=30)
    head, _, payload = cp.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return {"status": int(lines[0].split()[1]), "headers": headers, "body": json.loads(payload)}


@netlab_only
def test_registry_down_vpn_carries_on_and_enrolment_resumes(lab):
    erebor, rivendell = lab.hub(EREBOR), lab.hub(RIVENDELL)
    token = rivendell.token_create("--uses", "2")["token"]
    probe = erebor.token_create()["token"]
    before = {n["name"] for n in erebor.nodes()}
    pinger = multihub.Pinger(lab.host(HOBBITON), lab.addresses[BREE], max_seconds=120)
    bootstrap = None
    try:
        assert netlab.wait_until(lambda: len(pinger.replies()) >= 10, 10, 0.1)
        down_at = time.time()
        lab.stop_registry()
        answer = curl_enroll(lab.host(GONDOR), erebor, probe, "probe", rsa_public_pem(0))
        assert answer["status"] == 503, answer
        assert answer["headers"].get("retry-after", "").isdigit(), answer
        assert "\n" not in str(answer["body"].get("error", "")) and answer["body"].get("error")
        bootstrap = netlab.start_bootstrap(lab.host(GONDOR), token, name=GONDOR, timeout=120)
        # it is told 503 + Retry-After and waits: two rounds (>= 5 s) with PostgreSQL down
        netlab.wait_until(lambda: bootstrap.output().count("retrying in") >= 2
                          or bootstrap.poll() is not None, 30, 0.2)
        assert bootstrap.poll() is None and bootstrap.output().count("retrying in") >= 2, \
            "bootstrap.py did not keep retrying while PostgreSQL was down:\n" + bootstrap.output()
        # the VPN carried traffic all along
        replies = [t for t in pinger.replies() if t >= down_at]
        assert replies and time.time() - replies[-1] < 1.0
        gap = multihub.largest_gap(replies)
        timing("PostgreSQL down: window with pings", replies[-1] - down_at)
        timing("PostgreSQL down: largest ping gap in it", gap)
        assert gap < 1.0, "node<->node traffic stalled %.1f s with PostgreSQL down" % gap
        up_at = time.monotonic()
        lab.start_registry()
        assert bootstrap.wait(150) == 0, bootstrap.output()
        timing("PostgreSQL back -> waiting bootstrap.py joined", time.monotonic() - up_at)
    finally:
        pinger.stop()
        if lab.pg.root and not lab.pg.started:
            lab.start_registry()
        if bootstrap is not None:
            bootstrap.stop()
    lab.addresses[GONDOR] = netlab.printed_address(bootstrap.output())
    assert lab.addresses[GONDOR]
    assert_pings(lab.host(GONDOR), lab.addresses[HOBBITON])
    # nothing lost, and both hubs follow the registry again
    assert {n["name"] for n in erebor.nodes()} == before | {GONDOR}
    took = multihub.wait_for(lambda: hub_has_nodes(lab, EREBOR, [GONDOR])
                             and hub_has_nodes(lab, RIVENDELL, [GONDOR]), IN_STEP_S,
                             "hosts/%s on both hubs after PostgreSQL came back" % GONDOR)
    timing("enrolment after PostgreSQL's return -> every hub's hosts/", took)


# ------------------------------------------------------------------ revocation

@netlab_only
def test_revocation_on_one_hub_cuts_the_node_off_on_every_hub(lab):
    vpn = {h: hub_vpn(lab, h) for h in (EREBOR, RIVENDELL)}
    dale = lab.host(DALE)
    wait_all_connected(lab, [DALE], [EREBOR, RIVENDELL], REJOIN_S, "dale before revocation")
    for hub in vpn.values():
        assert_pings(dale, hub)
    assert_pings(dale, lab.addresses[HOBBITON])
    started = time.monotonic()
    lab.hub(RIVENDELL).cli("revoke", DALE)
    took = multihub.wait_for(lambda: not any(DALE in lab.hub(h).host_files() for h in vpn),
                             IN_STEP_S, "hosts/dale to go from every hub")
    timing("revoke on rivendell -> hosts/dale gone from every hub (<= 5 s)", took)
    # cut off through every hub: nothing answers dale any more (each figure: when the first
    # of the failing pings was sent, counted from the revoke)
    cut = []
    for dst in list(vpn.values()) + [lab.addresses[HOBBITON]]:
        probe = time.monotonic()
        first_fail = 0.0 if not dale.ping(dst, 1, 1) else dale.wait_no_ping(dst, timeout=10)
        assert first_fail is not None, "dale still reaches %s after revocation" % dst
        cut.append(probe - started + first_fail)
    timing("revoke on rivendell -> dale cut off from both hubs and hobbiton (<= 5 s)", max(cut))
    assert max(cut) <= 5.0, cut
    assert not lab.host(HOBBITON).ping(lab.addresses[DALE], 2, 1)


# ------------------------------------------------------------------ a third hub

@netlab_only
def test_third_hub_joins_and_every_node_follows(lab):
    started = time.monotonic()
    lothlorien = lab.add_hub(LOTHLORIEN)
    timing("lothlorien: init --registry + serve", time.monotonic() - started)
    nodes = joined(lab, DALE)
    added = time.monotonic()
    assert {h["name"] for h in lab.hub(EREBOR).hubs()} == {EREBOR, RIVENDELL, LOTHLORIEN}
    took = multihub.wait_for(
        lambda: all(LOTHLORIEN in lab.hub(h).host_files()
                    and LOTHLORIEN in lab.hub(h).connect_to() for h in (EREBOR, RIVENDELL)),
        IN_STEP_S, "erebor and rivendell to take in lothlorien")
    timing("lothlorien serving -> in the other hubs' hosts/ and ConnectTo", took)
    assert set(lothlorien.connect_to()) == {EREBOR, RIVENDELL}
    assert hub_has_nodes(lab, LOTHLORIEN, nodes) and DALE not in lothlorien.host_files()
    # nodes follow by themselves (bootstrap.py's in-step job), nothing run on them
    took = multihub.wait_for(
        lambda: all(LOTHLORIEN in lab.node_connect_to(n) for n in nodes), NODE_SYNC_S,
        "every node to ConnectTo lothlorien", interval=1.0)
    timing("lothlorien -> ConnectTo on every node (<= 120 s)", took)
    wait_all_connected(lab, nodes, [LOTHLORIEN], NODE_SYNC_S - (time.monotonic() - added),
                       "every node to lothlorien")
    timing("lothlorien -> every node connected to it", time.monotonic() - added)
    for node in nodes:
        assert_pings(lab.host(LOTHLORIEN), lab.addresses[node])


@netlab_only
def test_removed_hub_leaves_every_hub_and_node(lab):
    """`tinc-hub hub remove` on erebor retires lothlorien (stopped first, as its help says):
    the other hubs drop it within 5 s, nodes at their next sync; traffic carries on."""
    if LOTHLORIEN not in lab.hubs:
        pytest.skip("lothlorien did not join (see the test before)")
    nodes = joined(lab, DALE)
    lab.hub(LOTHLORIEN).kill_hard()
    started = time.monotonic()
    lab.hub(EREBOR).cli("hub", "remove", LOTHLORIEN)
    listed = lab.hub(RIVENDELL).hubs()
    current = {h["name"] for h in listed if not h.get("removed") and not h.get("removed_at")}
    assert current == {EREBOR, RIVENDELL}, listed
    took = multihub.wait_for(
        lambda: all(LOTHLORIEN not in lab.hub(h).host_files()
                    and LOTHLORIEN not in lab.hub(h).connect_to() for h in (EREBOR, RIVENDELL)),
        IN_STEP_S, "erebor and rivendell to drop lothlorien")
    timing("hub remove -> gone from the other hubs' hosts/ and ConnectTo", took)
    took = multihub.wait_for(
        lambda: all(LOTHLORIEN not in lab.node_connect_to(n) for n in nodes), NODE_SYNC_S,
        "every node to drop ConnectTo lothlorien", interval=1.0)
    timing("hub remove -> ConnectTo gone on every node (<= 120 s)", took)
    for node in nodes:
        assert LOTHLORIEN not in lab.node_host_files(node), node
        assert sorted(lab.node_connect_to(node)) == [EREBOR, RIVENDELL], node
    assert_pings(lab.host(HOBBITON), lab.addresses[BREE])
    assert time.monotonic() - started < NODE_SYNC_S + 30
