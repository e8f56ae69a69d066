"""The pure parts of tinc-hub expose: argument parsing, the hub's own ports, the nftables
ruleset renderer, and the node's reply routing in tinc-up/tinc-down (the real-nft, real-tincd
side is tests/test_expose.py)."""

import pytest

from bootstrap import bootstrap
from tinc_hub import exposure
from tinc_hub.registry import ExposureRow


def row(id=1, node="web", port=80, listen=None, lport=8080, proto="tcp", snat=False,
        address="10.0.0.2", revoked=False):
    return ExposureRow(id, node, port, listen, lport, proto, snat, 0, address, revoked)


def test_targets_and_listen_values_are_parsed_strictly():
    assert exposure.parse_target("web1:80") == ("web1", 80)
    assert exposure.parse_listen("8080") == (None, 8080)
    assert exposure.parse_listen("192.0.2.1:53") == ("192.0.2.1", 53)
    assert exposure.parse_listen("0.0.0.0:53") == (None, 53)
    for bad in ("web", "web:", ":80", "we-b:80", "web:080", "web:0", "web:65536", "web:80 ",
                "web:8\n0", "../x:80"):
        with pytest.raises(ValueError):
            exposure.parse_target(bad)
    for bad in ("127.0.0.1:80", "224.0.0.1:80", "192.0.2.01:80", "host:80", "1.2.3.4:x", ""):
        with pytest.raises(ValueError):
            exposure.parse_listen(bad)


def test_the_hubs_own_ports_are_refused():
    def problem(proto, port, listening=frozenset()):
        return exposure.own_port_problem(proto, port, 655, 8655, set(listening))
    assert "tinc port" in problem("tcp", 655) and "tinc port" in problem("udp", 655)
    assert "API port" in problem("tcp", 8655) and problem("udp", 8655) is None
    assert "ssh" in problem("tcp", 22)
    assert "already listens" in problem("udp", 53, {53})
    assert problem("tcp", 8080) is None


def test_table_name_is_ours_and_checked():
    assert exposure.table_name("office") == "tinc_hub_office"
    for bad in ("", "a b", "x;flush ruleset", "a" * 65):
        with pytest.raises(ValueError):
            exposure.table_name(bad)


def test_ruleset_replaces_only_our_table_in_one_transaction():
    text = exposure.render_ruleset("office", "office", "10.0.0.1", [row()]).text
    lines = text.splitlines()
    assert lines[:3] == ["add table ip tinc_hub_office", "delete table ip tinc_hub_office",
                         "table ip tinc_hub_office {"]
    assert "fib daddr type local tcp dport 8080 dnat to 10.0.0.2:80" in text
    assert "snat" not in text
    assert 'iifname "office" drop' in text and 'oifname "office" drop' in text
    assert "\n    drop\n" not in text  # forwarding was on already: other routing untouched
    assert sum(1 for line in lines if line.startswith("table ")) == 1


def test_ruleset_snat_listen_address_revoked_and_guard():
    text = exposure.render_ruleset("n", "n", "10.0.0.1", [
        row(listen="192.0.2.1", proto="udp", snat=True), row(id=2, lport=9000, revoked=True)],
        drop_other_forwarding=True).text
    assert "ip daddr 192.0.2.1 udp dport 8080 dnat to 10.0.0.2:80" in text
    assert "snat to 10.0.0.1" in text and "9000" not in text  # a revoked node's row is left out
    assert "\n    drop\n" in text
    forced = exposure.render_ruleset("n", "n", "10.0.0.1", [row()], force_snat=True).text
    assert "snat to 10.0.0.1" in forced
    # nothing published: the table is deleted, or keeps only the drops while forwarding is on
    assert exposure.render_ruleset("n", "n", "10.0.0.1", [row(revoked=True)]).text == \
        "add table ip tinc_hub_n\ndelete table ip tinc_hub_n\n"
    guard = exposure.render_ruleset("n", "n", "10.0.0.1", [], guard=True)
    assert 'iifname "n" drop' in guard.text and "dnat" not in guard.text and not guard.forwarding


@pytest.mark.parametrize("bad", [dict(address="10.0.0.2 accept"), dict(listen="1.2.3.4;"),
                                 dict(proto="icmp"), dict(port=0), dict(lport=70000),
                                 dict(port=True)])
def test_ruleset_refuses_values_nft_must_never_see(bad):
    with pytest.raises(ValueError):
        exposure.render_ruleset("n", "n", "10.0.0.1", [row(**bad)])


def test_ruleset_refuses_a_bad_interface_or_hub_address():
    for interface, hub in (('n" drop', "10.0.0.1"), ("a" * 16, "10.0.0.1"), ("n", "10.0.0.1/24")):
        with pytest.raises(ValueError):
            exposure.render_ruleset("n", interface, hub, [row()])


def test_node_tinc_up_routes_replies_from_its_vpn_address_back_into_the_vpn():
    table = bootstrap.reply_table("office")
    assert table == bootstrap.reply_table("office") and 20000 <= table < 30000
    assert bootstrap.reply_table("office") != bootstrap.reply_table("office2")
    up = bootstrap.render_tinc_up("10.0.0.2", 24, reply_table=table)
    rule = "from 10.0.0.2 lookup {0} priority {0}".format(table)
    assert up.splitlines()[-3:] == ["ip rule del %s 2>/dev/null" % rule, "ip rule add %s" % rule,
                                    'ip route replace default dev "$INTERFACE" table %d' % table]
    down = bootstrap.render_tinc_down("10.0.0.2", 24, reply_table=table)
    assert "ip rule del %s 2>/dev/null" % rule in down and "ip route flush table %d" % table in down
    assert "ip rule" not in bootstrap.render_tinc_up("10.0.0.1", 24)  # the hub's: none


def test_claim_only_for_exposures_without_source_nat():
    assert not exposure.claim_wanted([], False)
    assert exposure.claim_wanted([row()], False)
    assert not exposure.claim_wanted([row(snat=True), row(id=2, revoked=True)], False)
    assert not exposure.claim_wanted([row()], True)  # several hubs: every exposure SNATed


def test_tinc_up_guard_is_valid_shell_and_quotes_the_host_file(tmp_path):
    import subprocess

    host_file = str(tmp_path / "it's $(reboot) `x`" / "hub1")
    text = "#!/bin/sh\n" + exposure.render_tinc_up_guard("office", "office", "10.0.0.1", host_file)
    subprocess.run(["sh", "-n", "-c", text], check=True)
    assert "'" + host_file.replace("'", "'\"'\"'") + "'" in text
    assert "grep -qxF 'Subnet = 0.0.0.0/0'" in text
    guard = exposure.guard_script("office", "office", "10.0.0.1")
    assert guard.startswith("table ip tinc_hub_office {") and "delete" not in guard
    assert 'iifname "office" drop' in guard and "dnat" not in guard
    # a missing host file: the guard does nothing (and sh says nothing)
    done = subprocess.run(["sh", "-c", text], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""


def test_apply_with_nothing_published_and_no_nft_does_nothing(tmp_path, monkeypatch):
    """A hub without the nftables package: its boot units' `expose apply` succeed while nothing
    is published (no table of ours can exist without nft); publishing still needs nft."""
    from tinc_hub.errors import HubError
    from tinc_hub.exposure import apply_exposures, run_nft

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no nft
    ruleset = apply_exposures(tmp_path, "exponet", "exponet", "10.0.0.1", [])
    assert ruleset.text == "" and not ruleset.forwarding
    assert list(tmp_path.iterdir()) == []  # nothing recorded
    with pytest.raises(HubError, match="nft not found"):
        run_nft(ruleset.text)


def test_listening_ports_sees_ipv4_and_dual_stack_sockets_of_this_machine():
    """The own-port refusal reads /proc/net: a TCP listener on 127.0.0.1 and one on [::]
    (dual stack: it takes IPv4 too) are both seen, and a UDP socket bound on [::]; a closed
    one is not."""
    import socket

    from tinc_hub.exposure import listening_ports

    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        v6.bind(("::", 0))
        v6.listen()
        u6.bind(("::", 0))
        ports = [s.getsockname()[1] for s in (v4, v6, u6)]
        tcp, udp = listening_ports("tcp"), listening_ports("udp")
        assert ports[0] in tcp and ports[1] in tcp and ports[2] in udp, (ports, tcp, udp)
    finally:
        for s in (v4, v6, u6):
            s.close()
    assert ports[1] not in listening_ports("tcp")
