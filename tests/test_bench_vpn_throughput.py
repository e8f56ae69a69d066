"""bench/vpn_throughput.py: its checks of what it writes into tinc files, the parsers of
labkit.traffic, and one short run of the whole bench for real (real tincd, real hub, real
bootstrap.py, real iperf3 in network namespaces) whose figures must make sense."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import netlab, traffic

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "vpn_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("vpn_throughput_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


# ------------------------------------------------------------ what reaches a tinc file

def test_candidate_options_become_tinc_lines():
    c = bench.parse_candidate("Cipher=aes-256-cbc, UDPRcvBuf=1048576,InterfaceMTU=1400")
    assert c.tinc_lines() == ["Cipher = aes-256-cbc", "UDPRcvBuf = 1048576"]
    assert c.interface_mtu() == 1400
    assert not c.tcp_only() and bench.parse_candidate("TCPOnly=yes").tcp_only()


@pytest.mark.parametrize("text", [
    "Cipher=aes-256-cbc\nConnectTo = evil",  # a second line smuggled into the conf file
    "ConnectTo=evil",  # not an option the bench tunes
    "Cipher=aes 256",
    "ClampMSS=maybe",
    "Compression=12",
    "InterfaceMTU=100",
    "InterfaceMTU=99999",
    "UDPRcvBuf=1,UDPRcvBuf=2",
    "Cipher",
])
def test_candidate_refuses_what_tinc_should_not_read(text):
    with pytest.raises(ValueError):
        bench.parse_candidate(text)


def test_counter_ruleset_refuses_a_bad_table_name():
    with pytest.raises(ValueError):
        traffic.tinc_counters_ruleset("x; flush ruleset")
    with pytest.raises(ValueError):
        traffic.tinc_counters_ruleset("benchtinc", 0)
    with pytest.raises(ValueError):
        traffic.loss_ruleset("x; flush ruleset", 10)
    for per_mille in (0, 501):
        with pytest.raises(ValueError):
            traffic.loss_ruleset("benchloss", per_mille)
    assert "numgen random mod 1000 < 10 drop" in traffic.loss_ruleset("benchloss", 10)


# ------------------------------------------------------------ parsers

def test_iperf3_json_errors_are_errors():
    with pytest.raises(ValueError, match="unable to connect"):
        traffic.parse_iperf3_json(json.dumps({"start": {}, "end": {},
                                              "error": "unable to connect to server"}))
    with pytest.raises(ValueError):
        traffic.parse_iperf3_json("iperf3: error - unable to connect")
    with pytest.raises(ValueError):
        traffic.parse_iperf3_json(json.dumps({"end": {"sum_received": {}}}))


def test_ping_times_reads_reply_lines_only():
    out = ("PING 10.71.0.3 (10.71.0.3) 56(84) bytes of data.\n"
           "64 bytes from 10.71.0.3: icmp_seq=1 ttl=64 time=0.512 ms\n"
           "From 10.71.0.1 icmp_seq=2 Destination Net Unreachable\n"
           "64 bytes from 10.71.0.3: icmp_seq=3 ttl=64 time=1.20 ms\n"
           "rtt min/avg/max/mdev = 0.512/0.856/1.200/0.344 ms\n")
    assert traffic.ping_times(out) == [0.512, 1.2]


def test_udp_snmp_of_this_machine():
    with open("/proc/net/snmp") as f:
        udp = traffic.parse_udp_snmp(f.read())
    assert {"InDatagrams", "RcvbufErrors", "SndbufErrors"} <= set(udp)
    with pytest.raises(ValueError):
        traffic.parse_udp_snmp("Udp: InDatagrams\n")


def test_cpu_seconds_of_a_busy_process_grow():
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        first = traffic.process_cpu_seconds(proc.pid)
        assert netlab.wait_until(lambda: traffic.process_cpu_seconds(proc.pid) >= first + 0.2,
                                 10, 0.05)
    finally:
        proc.kill()
        proc.wait()
    machine = traffic.machine_cpu()
    assert 0 < machine["busy"] <= machine["total"]


def test_echo_probe_output_is_checked():
    ok = traffic.parse_echo_probe(json.dumps({"peer": "203.0.113.10", "rtt_ms": [0.5, 0.25],
                                              "error": None}))
    assert ok.peer == "203.0.113.10" and ok.rtt_ms == [0.5, 0.25]
    for bad in ({"peer": "", "rtt_ms": [], "error": "Connection refused"},  # no echo at all
                {"peer": "203.0.113.10", "rtt_ms": ["0.5"]},
                {"peer": "203.0.113.10", "rtt_ms": [-1.0]},
                {"peer": "203.0.113.10", "rtt_ms": [True]},
                {"peer": 3405803786, "rtt_ms": [0.5]},  # an int is not an address here
                {"peer": "203.0.113.10\nX", "rtt_ms": [0.5]},
                ["203.0.113.10", [0.5]]):
        with pytest.raises(ValueError):
            traffic.parse_echo_probe(json.dumps(bad))
    with pytest.raises(ValueError, match="Connection refused"):
        traffic.parse_echo_probe(json.dumps({"peer": "", "rtt_ms": [],
                                             "error": "Connection refused"}))


def test_plain_dnat_ruleset_takes_only_an_address():
    text = bench.plain_dnat_ruleset("198.51.100.3")
    assert "tcp dport 15200 dnat to 198.51.100.3:5201" in text
    with pytest.raises(ValueError):
        bench.plain_dnat_ruleset("198.51.100.3:1; flush ruleset")


def test_medians_and_ratios_refuse_missing_figures():
    assert bench.median_of_values([3.0, 1.0, 2.0]) == 2.0
    assert bench.median_of_values([1.0, None]) is None
    assert bench.ratio(50.0, 200.0) == 0.25
    assert bench.ratio(1.0, 0.0) is None and bench.ratio(None, 1.0) is None


# ------------------------------------------------------------ the bench, for real

@pytest.mark.netlab
def test_bench_measures_the_vpn_against_plain_ip(tmp_path):
    """One round, 1 s per iperf3 test, as generated and with TCPOnly (which must move tinc's
    bytes off UDP at the hub: proof the candidate reached every tincd), over an underlay that
    loses 0.5% (the plain path through the router retransmits; the LAN one does not). The
    published service (tinc-hub expose, without and with --snat) is measured against plain
    DNAT: the service sees the client's own address, or with --snat the hub's VPN address."""
    out = tmp_path / "figures.json"
    started = time.monotonic()
    cp = subprocess.run([sys.executable, str(BENCH), "--runs", "1", "--seconds", "1",
                         "--omit", "0", "--pings", "10", "--candidate", "TCPOnly=yes",
                         "--loss", "0.5",
                         "--json", str(out)], capture_output=True, text=True, timeout=170)
    took = time.monotonic() - started
    assert cp.returncode == 0, cp.stdout + cp.stderr
    figures = json.loads(out.read_text())
    generated, tcp_only = figures["results"]
    assert generated["candidate"] == "as generated" and tcp_only["candidate"] == "TCPOnly=yes"
    for result in (generated, tcp_only):
        paths = result["paths"]
        for key in ("lan", "public"):
            assert paths[key]["mbit_s"] > 100, (key, paths[key])  # veths: Gbit/s
        assert paths["plain-dnat"]["mbit_s"] > 100, paths["plain-dnat"]
        assert paths["plain-dnat"]["service_saw"] == [bench.CLIENT_ADDRESS]
        assert paths["published"]["service_saw"] == [bench.CLIENT_ADDRESS]
        assert paths["published-snat"]["service_saw"] == [figures["vpn_addresses"]["hub"]]
        for key, base in (("vpn-nodes", "lan"), ("vpn-hub", "public"),
                          ("published", "plain-dnat"), ("published-snat", "plain-dnat")):
            row = paths[key]
            assert row["baseline"] == base
            assert 0 < row["mbit_s"] < paths[base]["mbit_s"] * 1.2, (key, row, paths[base])
            assert row["throughput_ratio"] == pytest.approx(
                row["mbit_s"] / paths[base]["mbit_s"])
            assert row["rtt_ms"] > 0 and row["rtt_ratio"] > 0
            assert row["hub_tincd_cpu"] > 0, row  # the hub's tincd carried it
    assert generated["paths"]["public"]["retransmits"] > 0, generated["paths"]["public"]
    assert generated["settled"], "PMTU discovery did not settle: large packets over TCP"
    for key in ("vpn-nodes", "published", "published-snat"):
        assert generated["paths"][key]["udp_share"] > 0.9, (key, generated["paths"][key])
        assert tcp_only["paths"][key]["udp_share"] < 0.05, (key, tcp_only["paths"][key])
    assert set(figures["versus"]["TCPOnly=yes"]) == {"vpn-nodes", "vpn-hub", "published",
                                                     "published-snat"}
    assert "x base" in cp.stdout and "candidate / as generated" in cp.stdout, cp.stdout
    print(cp.stdout)
    print("whole test: %.0f s" % took)
