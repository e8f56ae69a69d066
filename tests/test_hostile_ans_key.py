"""A hostile enrolled node against the hub: a forged ANS_KEY ("here is bravo's packet key, and
bravo's UDP address is mine") must not make the hub hand bravo's traffic to it.

KNOWN HOLE, not fixed: tinc 1.0.36's protocol_key.c:ans_key_h takes an ANS_KEY for any node
from any meta connection, and no tinc.conf setting stops it (docs/research/tinc-several-hubs/
REPORT.md section 4). The test states the property we want and is marked xfail(strict): it
fails the suite the day the attack stops working (a fixed tincd), so that the mark goes."""

import json
import sys

import pytest

from labkit import netlab
from support import bootstrap

NET = "middle-earth"
HUB = "erebor"
ALPHA, BRAVO, CHARLIE = "alpha", "bravo", "charlie"  # charlie is the hostile one


class TrafficDiverted(AssertionError):
    """The attack worked (the one failure the xfail mark expects; any other fails the test)."""


@pytest.mark.netlab
@pytest.mark.xfail(strict=True, raises=TrafficDiverted, reason="tinc 1.0 ans_key_h accepts a forged ANS_KEY for any "
                                       "node (REPORT.md section 4): a hostile node reads "
                                       "another node's traffic through the hub")
def test_forged_ans_key_does_not_divert_another_nodes_traffic():
    topo = netlab.build_nat_topology(node_names=[ALPHA, BRAVO, CHARLIE], hub_name=HUB)
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=2048, init="none")
        hub.serve()
        nodes = {node.name: node for node in topo.nodes}
        address = {}
        for name, node in nodes.items():
            token = hub.token_create("--name", name)["token"]
            proc = node.run(netlab.bootstrap_argv(name=name),
                            env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=120)
            address[name] = netlab.printed_address(proc.stdout)
        alpha, charlie = nodes[ALPHA], nodes[CHARLIE]
        assert alpha.wait_ping(address[BRAVO], timeout=30), "alpha cannot reach bravo at all"
        # charlie's own tincd steps aside; charlie logs in to the hub with its enrolled key
        netlab.stop_tincd(charlie, NET)
        hub_host_file = charlie.read_file("/etc/tinc/%s/hosts/%s" % (NET, HUB))
        charlie.write_file("/etc/tinc/hub.pub", bootstrap.public_key_block(hub_host_file))
        pinger = alpha.popen(["ping", "-n", "-i", "0.1", "-w", "12", address[BRAVO]])
        out = charlie.run([sys.executable, "-m", "labkit.hostile_tinc", CHARLIE,
                           "/etc/tinc/%s/rsa_key.priv" % NET, "/etc/tinc/hub.pub", HUB, BRAVO,
                           netlab.HUB_PUBLIC, netlab.ROUTER_PUBLIC, "8"], timeout=60).stdout
        pinger.wait(timeout=30)
        seen = json.loads(out.strip().splitlines()[-1])
        for_bravo = [p for p in seen["decrypted"]
                     if p[:2] == [address[ALPHA], address[BRAVO]]]
        if for_bravo:
            raise TrafficDiverted("charlie read %d of alpha's packets to bravo (%d datagrams for "
                                  "bravo reached charlie)" % (len(for_bravo), seen["datagrams"]))
    finally:
        topo.close()
