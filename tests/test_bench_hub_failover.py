"""bench/hub_failover.py's own pieces: the arithmetic of its table (min/median, ratios) and
its pinger, which must outlive the ICMP errors a node's tincd sends while its only hub is away
(iputils ping given ``-w`` exits at the first one: the baseline's outage was lost that way).
The pinger test runs for real in two namespaces: real ping, real ICMP errors from nftables."""

import importlib.util
import time
from pathlib import Path

import pytest

from labkit import multihub, netlab

BENCH = Path(__file__).resolve().parent.parent / "bench" / "hub_failover.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("hub_failover_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_min_median_over_runs():
    assert bench.min_median([5.31, 4.9, 6.2]) == (4.9, 5.31)
    assert bench.min_median([3.0, 1.0]) == (1.0, 2.0)
    assert bench.min_median([2.5]) == (2.5, 2.5)


def test_min_median_refuses_a_partial_series():
    # a run that measured nothing must not vanish into a better-looking median
    assert bench.min_median([1.0, None]) == (None, None)
    assert bench.min_median([]) == (None, None)


def test_ratio_is_b_over_a_and_none_when_undefined():
    assert bench.ratio(3.86, 5.31) == pytest.approx(0.7269, abs=1e-4)
    assert bench.ratio(10.0, 5.0) == 2.0
    assert bench.ratio(1.0, 0.0) is None
    assert bench.ratio(None, 5.0) is None
    assert bench.ratio(1.0, None) is None


def test_table_shows_medians_and_their_ratio(capsys):
    one = {k: [] for k, _, _ in bench.FIGURES}
    two = {k: [] for k, _, _ in bench.FIGURES}
    one["outage_restart"] = [5.0, 6.0, 7.0]
    one["back_restart"] = [5.0, 5.0, 5.0]
    two["outage_lost"] = [3.0, 9.0, 6.0]
    two["outage_restart"] = [0.1, 0.1, 0.2]
    two["back_restart"] = [10.0, 12.0, 11.0]
    two["back_return"] = [20.0, 30.0, 25.0]
    two["outage_return"] = [0.1, 0.1, 0.1]
    bench.print_table(one, two, nodes=6, runs=3)
    rows = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    lost = next(v for k, v in rows.items() if k.startswith("node<->node outage, hub lost"))
    assert lost.split()[-7:] == ["5.00", "/", "6.00", "3.00", "/", "6.00", "1.00x"], lost
    back = next(v for k, v in rows.items() if k.startswith("all N nodes connected again"))
    assert back.split()[-7:] == ["5.00", "/", "5.00", "10.00", "/", "11.00", "2.20x"], back
    ret = next(v for k, v in rows.items() if k.startswith("all N nodes connected to the killed"))
    assert ret.split()[-3:] == ["20.00", "/", "25.00"], ret


def test_each_lists_per_node_seconds_sorted():
    assert bench.each({"node2": 4.25, "node1": 4.13, "node3": 10.0}) == "4.1 4.2 10.0"


# ------------------------------------------------------------ the pinger, for real

REJECT_ECHO = """table ip benchreject {
    chain input {
        type filter hook input priority 0; policy accept;
        icmp type echo-request reject with icmp type net-unreachable
    }
}
"""


@pytest.mark.netlab
def test_pinger_measures_an_outage_made_of_icmp_errors():
    """src pings gw every 0.1 s; gw answers "net unreachable" for a while (as a node's tincd
    does with no hub), then echoes again. multihub.Pinger keeps going and its replies give
    the outage; ping bounded with -w (its former bound) exits at the first error."""
    with netlab.Topology() as topo:
        src, gw = topo.add_host("src"), topo.add_host("gw")
        netlab.run_root(["ip", "-n", src.netns, "link", "add", "eth0", "type", "veth", "peer",
                         "name", "eth0", "netns", gw.netns])
        for host, address in ((src, "10.77.0.1/24"), (gw, "10.77.0.2/24")):
            netlab.run_root(["ip", "-n", host.netns, "addr", "add", address, "dev", "eth0"])
            netlab.run_root(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
        pinger = multihub.Pinger(src, "10.77.0.2", max_seconds=30)
        deadline_ping = src.popen(["ping", "-n", "-i", "0.1", "-W", "1", "-w", "30",
                                   "10.77.0.2"], log="src.ping-w.log")
        try:
            assert netlab.wait_until(lambda: len(pinger.replies()) >= 10, 10, 0.05), \
                pinger.proc.output()
            event = time.time()
            gw.run(["nft", "-f", "-"], input=REJECT_ECHO)
            assert netlab.wait_until(lambda: pinger.proc.output().count("Unreachable") >= 8,
                                     10, 0.05), pinger.proc.output()
            gw.run(["nft", "delete", "table", "ip", "benchreject"])
            cleared = time.time()
            assert netlab.wait_until(lambda: pinger.flowing(event, 2.0), 10, 0.05), \
                pinger.proc.output()
            until = time.time()
            assert pinger.proc.poll() is None, "the pinger ended on ICMP errors"
            # the premise of the workaround: ping bounded by -w stops at the first error
            assert netlab.wait_until(lambda: deadline_ping.poll() is not None, 5, 0.05), \
                "ping -w kept going through ICMP errors: Pinger's packet-count bound is no longer needed"
        finally:
            replies = pinger.stop()
            deadline_ping.stop()
    gap = bench.multihub.outage(replies, event, until)
    before = max(t for t in replies if t <= event)
    after = min(t for t in replies if t > event)
    assert gap == pytest.approx(after - before, abs=1e-6)
    # 8 errors at 0.1 s make >= 0.8 s without replies; it ends soon after the rule went
    assert 0.8 <= gap <= cleared - before + 1.0, (gap, cleared - before)
    assert multihub.largest_gap([t for t in replies if t >= after]) < 1.0
