"""tinc-hub expose with two hubs on one PostgreSQL registry (labkit.multihub): an exposure
added through hub A is applied by hub B's registry follower within a few seconds (serve runs
as root without systemd: --init none); A, the reply hub (first in joining order), publishes
without source NAT and the node sees the client's own address, B source-NATs and the node sees
B's VPN address; removing it through A closes B's port. Real tincd, real nftables, real
PostgreSQL, in namespaces."""

import time

import pytest

from labkit import multihub, netlab, postgres

PG_MISSING = postgres.unavailable_reason()
pytestmark = [pytest.mark.skipif(PG_MISSING is not None, reason=str(PG_MISSING)), pytest.mark.netlab]

NET = "exphubs"
VPN_SUBNET = "10.63.0.0/24"
A, B = "hubA", "hubB"
NODE = "web"
HTTP_PORT, HTTP_LISTEN = 8000, 8080
IN_STEP_S = 5.0  # DESIGN: a change on one hub reaches every hub within 5 s


def _table(lab, hub):
    return lab.host(hub).run(["nft", "list", "table", "ip", "tinc_hub_" + NET], check=False,
                             timeout=10)


def _curl(lab, via_host, hub):
    address = lab.host(hub).addresses["public"]
    return lab.host(via_host).run(["curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w",
                                   "%{http_code}", "http://%s:%d/" % (address, HTTP_LISTEN)],
                                  check=False, timeout=10).stdout.strip()


def test_an_exposure_made_on_one_hub_is_applied_by_the_other(pg):
    with multihub.MultiHubLab([A, B], [NODE], NET, VPN_SUBNET, pg=pg) as lab:
        lab.add_hub(A)
        lab.add_hub(B)
        address = lab.enrol(NODE, lab.hub(A).token_create()["token"])
        node = lab.host(NODE)
        http = node.popen(["python3", "-m", "http.server", str(HTTP_PORT)], log="web.http.log")
        node.wait_listening(HTTP_PORT, timeout=10)
        assert _table(lab, B).returncode != 0

        lab.hub(A).cli("expose", "%s:%d" % (NODE, HTTP_PORT), "--listen", str(HTTP_LISTEN))
        started = time.monotonic()
        took = multihub.wait_for(lambda: "dnat to %s:%d" % (address, HTTP_PORT) in _table(lab, B).stdout,
                                 IN_STEP_S, "hub B's follower to apply A's exposure")
        netlab.record_timing("expose on hub A -> rules on hub B", took)
        assert time.monotonic() - started <= IN_STEP_S
        table_b = _table(lab, B).stdout
        assert "snat to %s" % lab.hub(B).vpn_address() in table_b  # not the reply hub
        table_a = _table(lab, A).stdout
        assert "dnat to %s:%d" % (address, HTTP_PORT) in table_a and "snat" not in table_a
        # only the reply hub claims 0.0.0.0/0 (the nodes' replies without SNAT go to it)
        claims = {hub: "Subnet = 0.0.0.0/0" in lab.host(hub).read_file(
            "/etc/tinc/%s/hosts/%s" % (NET, hub)).splitlines() for hub in (A, B)}
        assert claims == {A: True, B: False}, claims
        # a client on the public side (the other hub's host) through each hub: through A the
        # node sees the client's own address, through B hub B's VPN address
        for via, client, seen in ((A, B, lab.host(B).addresses["public"]),
                                  (B, A, lab.hub(B).vpn_address())):
            multihub.wait_for(lambda: _curl(lab, client, via) == "200", 30,
                              "the node's service through hub %s" % via)
            assert "%s - - [" % seen in http.output(), (via, http.output()[-2000:])

        lab.hub(A).cli("unexpose", "%s:%d" % (NODE, HTTP_PORT))
        multihub.wait_for(lambda: "dnat" not in _table(lab, B).stdout, IN_STEP_S,
                          "hub B's follower to close the port")
        assert _curl(lab, A, B) == "000"
