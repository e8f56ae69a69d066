#!/usr/bin/env python3
"""Convergence: N real nodes (default 20) in network namespaces behind a NAT, all running
``bootstrap.py`` at once against one hub -> seconds until every node pings the hub and a
sample of node pairs ping each other (through the hub). Then the hub's tincd is restarted:
seconds until every node pings the hub again. Baseline in the same run: one node alone,
bootstrap start -> ping. Needs root.

    .venv/bin/python bench/convergence.py [--nodes 20] [--pairs 10] [--key-size 2048]
"""

import argparse
import random
import sys
import threading
import time
from typing import Dict

from labkit import netlab

NET = "convnet"
HUB = "convhub"


def ping_all(pairs, deadline: float) -> Dict[tuple, float]:
    """(src host, dst address) -> seconds since start when it first answered (threads)."""
    done: Dict[tuple, float] = {}
    start = time.monotonic()

    def one(src, dst) -> None:
        while time.monotonic() < deadline:
            if src.ping(dst, 1, 1):
                done[(src.name, dst)] = time.monotonic() - start
                return
            time.sleep(0.05)

    threads = [threading.Thread(target=one, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--key-size", type=int, default=2048)
    args = parser.parse_args()
    names = [f"n{i:02d}" for i in range(args.nodes)] + ["solo"]
    t = time.monotonic()
    topo = netlab.build_nat_topology(node_names=names, hub_name="hub")
    print(f"topology: hub, NAT router, {len(names)} nodes in {time.monotonic() - t:.1f} s (not timed)")
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=args.key_size)
        hub.serve()
        hub_vpn = hub.vpn_address()
        nodes = [n for n in topo.nodes if n.name != "solo"]
        solo = next(n for n in topo.nodes if n.name == "solo")

        token = hub.token_create()["token"]
        t = time.monotonic()
        cp = solo.run(netlab.bootstrap_argv(name="solo", key_size=args.key_size, timeout=60),
                      env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=120)
        baseline = time.monotonic() - t

        token = hub.token_create("--uses", str(args.nodes))["token"]
        started = time.monotonic()
        procs = [netlab.start_bootstrap(n, token, name=n.name, key_size=args.key_size, timeout=120)
                 for n in nodes]
        addresses: Dict[str, str] = {}
        for node, proc in zip(nodes, procs):
            if proc.wait(timeout=300) != 0:
                raise SystemExit(f"bootstrap on {node.name} failed:\n{proc.output()}")
            addresses[node.name] = netlab.printed_address(proc.output())
        all_joined = time.monotonic() - started  # each exits only after pinging the hub
        rng = random.Random(5)
        pairs = [(node, hub_vpn) for node in nodes]
        pairs += [(a, addresses[b.name]) for a, b in (rng.sample(nodes, 2) for _ in range(args.pairs))]
        answered = ping_all(pairs, time.monotonic() + 120)
        converged = time.monotonic() - started
        if len(answered) != len(pairs):
            raise SystemExit(f"only {len(answered)}/{len(pairs)} pings answered")
        print(f"baseline: one node alone, bootstrap start -> ping: {baseline:.2f} s")
        print(f"{args.nodes} nodes at once: all joined (each pinged the hub) after {all_joined:.2f} s;"
              f" every node -> hub and {args.pairs} node pairs ping after {converged:.2f} s"
              f" ({converged / baseline:.1f}x the single-node baseline;"
              f" target <= 15 s: {'met' if converged <= 15 else 'MISSED'})")

        old = netlab.stop_tincd(topo.hub, NET)
        restarted = time.monotonic()
        netlab.start_tincd(topo.hub, NET)
        back = ping_all([(node, hub_vpn) for node in nodes], time.monotonic() + 120)
        took = time.monotonic() - restarted
        if len(back) != len(nodes):
            raise SystemExit(f"only {len(back)}/{len(nodes)} nodes came back after the hub's tincd restart")
        print(f"hub tincd restarted (pid {old}): all {args.nodes} nodes ping the hub again after"
              f" {took:.2f} s (first {min(back.values()):.2f} s; each: "
              + " ".join(f"{v:.1f}" for v in sorted(back.values())) + ")")
    finally:
        topo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
