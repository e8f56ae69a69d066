#!/usr/bin/env python3
"""Hub failover: what a second hub buys (issue 11's benchmark), one hub vs two in one run.

Two labs side by side (labkit.multihub: hubs in network namespaces on one throwaway
PostgreSQL, N nodes behind a NAT router, real tincd, real `tinc-hub serve`, real bootstrap.py):

- A, the baseline: one hub. Its tincd is restarted (SIGTERM, then started again, as a reboot of
  the hub's tincd would): node1<->node2 outage (ping every 0.1 s, from the reply timestamps)
  and the time until all N nodes hold a meta connection to the hub again.
- B: two hubs. The hub relaying node1<->node2 is killed hard (its link cut, then every process
  of it SIGKILLed: nodes see nothing, as the issue's failure test): outage. It comes back:
  time until all N nodes are connected to it again, and the outage its return causes. Then its
  tincd is restarted as in A (same event, same figures).

Figures per run, then min/median over --runs and the ratios B/A. Needs root and Debian's
PostgreSQL binaries (the tests' set-up installs them).

    .venv/bin/python bench/hub_failover.py [--nodes 6] [--runs 3] [--key-size 2048]
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from labkit import multihub, netlab, postgres

NET = "failnet"
VPN_SUBNET = "10.63.0.0/24"
ONLY_HUB = "moria"
HUBS = ("erebor", "rivendell")
FLOWING_SPAN_S = 3.0  # traffic counts as back after this long with no reply missing for 1 s
OUTAGE_BOUND_S = 45.0  # PingInterval 5 + 2 * PingTimeout 3 = 11 s expected for a silent hub
RECONNECT_BOUND_S = 90.0  # MaxTimeout 5..14 + PingTimeout 3 expected, with slack
JOIN_BOUND_S = 180.0
# tinc resets a connection's retry backoff only at its first PONG (pong_h), sent PingInterval
# 5 s after it connects and checked every PingTimeout 3 s: an event sooner than that after a
# reconnection measures tinc's doubled backoff (10 s, seen here), not a hub restart.
SETTLE_S = 5 + 3 + 1


# ------------------------------------------------------------------------- arithmetic

def min_median(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """(min, median) of the measured values; (None, None) when a run measured nothing."""
    got = [v for v in values if v is not None]
    if not got or len(got) != len(values):
        return None, None
    return min(got), statistics.median(got)


def ratio(b: Optional[float], a: Optional[float]) -> Optional[float]:
    """b / a; None when either is missing or a is not positive."""
    if a is None or b is None or a <= 0:
        return None
    return b / a


def each(seen: Dict[str, float]) -> str:
    """The per-node seconds, sorted: "4.1 4.1 4.4"."""
    return " ".join("%.1f" % v for v in sorted(seen.values()))


def fmt(value: Optional[float], unit: str = " s") -> str:
    return "-" if value is None else "%.2f%s" % (value, unit)


# ------------------------------------------------------------------------- the labs

def enrol_all(lab: multihub.MultiHubLab, hub: str, nodes: Sequence[str], key_size: int) -> None:
    """bootstrap.py on every node at once with one token of `hub` (not timed)."""
    token = lab.hub(hub).token_create("--uses", str(len(nodes)))["token"]
    procs = [(n, netlab.start_bootstrap(lab.host(n), token, name=n, key_size=key_size,
                                        timeout=120)) for n in nodes]
    for name, proc in procs:
        if proc.wait(timeout=JOIN_BOUND_S) != 0:
            raise SystemExit("bootstrap.py on %s failed:\n%s" % (name, proc.output()))
        address = netlab.printed_address(proc.output())
        if not address:
            raise SystemExit("bootstrap.py on %s printed no address:\n%s" % (name, proc.output()))
        lab.addresses[name] = address


def connected_times(lab: multihub.MultiHubLab, nodes: Sequence[str], hub: str, since: float,
                    bound: float) -> Dict[str, float]:
    """node -> seconds from `since` (monotonic) to when it was first seen connected to `hub`;
    polls every node until all are, at most `bound` s after `since` (SystemExit if not)."""
    seen: Dict[str, float] = {}

    def all_seen() -> bool:
        for node in nodes:
            if node not in seen and lab.node_connected(node, hub):
                seen[node] = time.monotonic() - since
        return len(seen) == len(nodes)
    if not netlab.wait_until(all_seen, bound - (time.monotonic() - since), 0.1):
        raise SystemExit("after %.0f s, not connected to %s: %s"
                         % (bound, hub, sorted(set(nodes) - set(seen))))
    return seen


def wait_connected(lab: multihub.MultiHubLab, nodes: Sequence[str], hubs: Sequence[str]) -> None:
    for hub in hubs:
        connected_times(lab, nodes, hub, time.monotonic(), RECONNECT_BOUND_S)


def settle(lab: multihub.MultiHubLab, nodes: Sequence[str], hubs: Sequence[str]) -> None:
    """Every node connected to every hub, and long enough for tinc to reset its backoff
    (SETTLE_S: nothing to observe from outside, hence a fixed wait): the steady state."""
    wait_connected(lab, nodes, hubs)
    time.sleep(SETTLE_S)


def relaying_hub(lab: multihub.MultiHubLab, src: str, dst: str) -> str:
    """The hub whose public interface carries src -> dst pings (about 2 packets per ping)."""
    counts = lab.relayed_packets(src, lab.addresses[dst], count=30)
    busiest = max(counts, key=lambda h: counts[h])
    if counts[busiest] < 55:
        raise SystemExit("no hub relays %s -> %s: %s" % (src, dst, counts))
    return busiest


def ping_through(lab: multihub.MultiHubLab, src: str, dst: str,
                 event_action: Callable[[], None],
                 then: Optional[Callable[[float], object]] = None) -> Tuple[float, object]:
    """Ping src -> dst every 0.1 s; run event_action(); run then(monotonic event time) if
    given; wait until replies flow steadily again. (outage s, what then() returned)."""
    pinger = multihub.Pinger(lab.host(src), lab.addresses[dst],
                             max_seconds=int(OUTAGE_BOUND_S + RECONNECT_BOUND_S + 30))
    result = None
    try:
        if not netlab.wait_until(lambda: len(pinger.replies()) >= 10, 10, 0.1):
            raise SystemExit("%s -> %s does not flow before the event:\n%s"
                             % (src, dst, pinger.proc.output()))
        event, event_mono = time.time(), time.monotonic()
        event_action()
        if then is not None:
            result = then(event_mono)
        if not netlab.wait_until(lambda: pinger.flowing(event, FLOWING_SPAN_S), OUTAGE_BOUND_S,
                                 0.1):
            raise SystemExit("%s -> %s did not recover within %.0f s"
                             % (src, dst, OUTAGE_BOUND_S))
        until = time.time()
    finally:
        replies = pinger.stop()
    gap = multihub.outage(replies, event, until)
    if gap is None:
        raise SystemExit("%s -> %s: no reply after the event" % (src, dst))
    return gap, result


def restart_tincd(lab: multihub.MultiHubLab, hub: str, nodes: Sequence[str],
                  pair: Tuple[str, str]) -> Tuple[float, Dict[str, float]]:
    """Restart `hub`'s tincd (SIGTERM, start again) under a ping of `pair`:
    (node<->node outage s, node -> s until it is connected to `hub` again)."""
    host = lab.hub(hub).host

    def restart() -> None:
        netlab.stop_tincd(host, NET)
        netlab.start_tincd(host, NET)
    gap, seen = ping_through(lab, pair[0], pair[1], restart,
                             then=lambda t0: connected_times(lab, nodes, hub, t0,
                                                             RECONNECT_BOUND_S))
    return gap, seen


def kill_and_return(lab: multihub.MultiHubLab, hub: str, nodes: Sequence[str],
                    pair: Tuple[str, str]) -> Tuple[float, Dict[str, float], float]:
    """`hub` cut off and killed, then back: (outage on the kill, node -> s from its start
    until that node is connected to it again, outage on its return)."""
    victim = lab.hub(hub)

    def silent_death() -> None:
        lab.set_link(hub, False)  # no FIN, no RST reaches anyone
        victim.kill_hard()
    killed_gap, _ = ping_through(lab, pair[0], pair[1], silent_death)
    # every node has noticed (its ping timeout) before the hub comes back
    if not netlab.wait_until(lambda: not any(lab.node_connected(n, hub) for n in nodes),
                             OUTAGE_BOUND_S, 0.2):
        raise SystemExit("nodes still hold connections to the dead %s" % hub)

    def come_back() -> None:
        lab.set_link(hub, True)
        victim.start()  # tincd, then `tinc-hub serve` (catches up from the registry)
    return_gap, seen = ping_through(lab, pair[0], pair[1], come_back,
                                    then=lambda t0: connected_times(lab, nodes, hub, t0,
                                                                    RECONNECT_BOUND_S))
    return killed_gap, seen, return_gap


# ------------------------------------------------------------------------- main

FIGURES = (  # key, label, A key or None
    ("outage_lost", "node<->node outage, hub lost (A: only hub's tincd restarted; "
                    "B: relaying hub killed + link cut)", "outage_restart"),
    ("outage_restart", "node<->node outage, hub tincd restarted", "outage_restart"),
    ("back_restart", "all N nodes connected again after the tincd restart", "back_restart"),
    ("back_return", "all N nodes connected to the killed hub after its return", None),
    ("outage_return", "node<->node outage on the killed hub's return", None),
)


def print_table(one: Dict[str, List[float]], two: Dict[str, List[float]], nodes: int,
                runs: int) -> None:
    print("\n%d nodes, %d run(s); min / median (outage 0.10 s = nothing lost at 0.1 s pings)"
          % (nodes, runs))
    width = max(len(label) for _, label, _ in FIGURES)
    print("%-*s  %-15s %-15s %s" % (width, "figure", "A: one hub", "B: two hubs",
                                     "B/A (median)"))
    for key, label, a_key in FIGURES:
        b_min, b_med = min_median(two[key])
        if a_key is None:
            a_text, r_text = "", ""
        else:
            a_min, a_med = min_median(one[a_key])
            a_text = "%s / %s" % (fmt(a_min, ""), fmt(a_med, ""))
            r_text = fmt(ratio(b_med, a_med), "x")
        print("%-*s  %-15s %-15s %s" % (width, label, a_text,
                                         "%s / %s" % (fmt(b_min, ""), fmt(b_med, "")), r_text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)  # a silent hub's outage depends on the
    # phase of PingInterval (0..11 s): 3 runs give a median, and take ~2.5 min here
    parser.add_argument("--key-size", type=int, default=2048)
    args = parser.parse_args()
    if args.nodes < 2 or args.runs < 1:
        parser.error("--nodes >= 2 and --runs >= 1")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    missing = postgres.unavailable_reason()
    if missing:
        parser.error("PostgreSQL: %s" % missing)
    netlab.install_signal_handlers()
    nodes = ["node%d" % (i + 1) for i in range(args.nodes)]
    pair = (nodes[0], nodes[1])
    one: Dict[str, List[float]] = {k: [] for k, _, _ in FIGURES}
    two: Dict[str, List[float]] = {k: [] for k, _, _ in FIGURES}
    started = time.monotonic()
    with postgres.ThrowawayPostgres() as pg, \
            multihub.MultiHubLab([ONLY_HUB], nodes, NET, VPN_SUBNET, args.key_size, pg) as lab_a, \
            multihub.MultiHubLab(list(HUBS), nodes, NET, VPN_SUBNET, args.key_size, pg) as lab_b:
        lab_a.add_hub(ONLY_HUB)
        enrol_all(lab_a, ONLY_HUB, nodes, args.key_size)
        for hub in HUBS:
            lab_b.add_hub(hub)
        enrol_all(lab_b, HUBS[0], nodes, args.key_size)
        wait_connected(lab_a, nodes, [ONLY_HUB])
        wait_connected(lab_b, nodes, HUBS)
        print("set-up: PostgreSQL, 1 + 2 hubs, 2 x %d nodes joined in %.1f s (not timed)"
              % (args.nodes, time.monotonic() - started), flush=True)
        for run in range(1, args.runs + 1):
            settle(lab_a, nodes, [ONLY_HUB])
            gap, seen = restart_tincd(lab_a, ONLY_HUB, nodes, pair)
            one["outage_restart"].append(gap)
            one["back_restart"].append(max(seen.values()))
            print("run %d A: %s tincd restarted: outage %.2f s; nodes connected again after %s s"
                  % (run, ONLY_HUB, gap, each(seen)), flush=True)

            settle(lab_b, nodes, HUBS)
            victim = relaying_hub(lab_b, *pair)
            lost, seen, return_gap = kill_and_return(lab_b, victim, nodes, pair)
            two["outage_lost"].append(lost)
            two["back_return"].append(max(seen.values()))
            two["outage_return"].append(return_gap)
            print("run %d B: %s (relaying) killed + cut: outage %.2f s; back: nodes connected to"
                  " it after %s s, outage on its return %.2f s"
                  % (run, victim, lost, each(seen), return_gap), flush=True)
            settle(lab_b, nodes, HUBS)
            victim = relaying_hub(lab_b, *pair)
            gap, seen = restart_tincd(lab_b, victim, nodes, pair)
            two["outage_restart"].append(gap)
            two["back_restart"].append(max(seen.values()))
            print("run %d B: %s (relaying) tincd restarted: outage %.2f s; nodes connected again"
                  " after %s s" % (run, victim, gap, each(seen)), flush=True)
    print_table(one, two, args.nodes, args.runs)
    print("whole bench: %.0f s" % (time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
