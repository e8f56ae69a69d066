#!/usr/bin/env python3
"""Enrolment cost against registry size: a batch of N concurrent enrolments (default 1000)
into an empty registry and into one already holding --nodes nodes (default 50,000, a /16),
runs alternating empty/full; then ``tinc-hub nodes --json`` with those registries (a fresh
process with compiled bytecode, as a user runs it; bench/listing_scale.py measures listings
alone). Every figure is printed with its baseline (the empty registry, same run) and the ratio.

The full registry is filled through the registry API in one transaction, host files included
(labkit.registry_fill); the enrolments go through the real ``tinc-hub serve`` on 127.0.0.1
(labkit.loopback_hub), keys made before any clock starts.

    .venv/bin/python bench/enrol_scale.py [--nodes 50000] [--count 1000] [--runs 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from labkit.loopback_hub import (Enrolment, HubProcess, cli_wall_seconds, create_token, enrol_concurrently,
                                 free_port, init_hub_state, percentile, public_keys, user_like_env)
from labkit.registry_fill import fill_registry
from tinc_hub.registry import Registry

VPN = "10.96.0.0/16"
LISTING_TARGET_SECONDS = 1.0  # issue 14: nodes --json with 50,000 nodes


def prepare(workdir: Path, nodes: int):
    """A hub state with ``nodes`` filler nodes (and their host files)."""
    state = init_hub_state(workdir, vpn_subnet=VPN, api_port=free_port())
    if nodes:
        config = state.load_config()
        fill_registry(Registry.for_state(state), VPN, nodes, hosts_dir=config.hosts_dir,
                      reserved=[config.hub_address])
    return state


def nodes_json_seconds(state_root: Path, repeat: int = 3) -> float:
    """Median wall time of the whole ``tinc-hub nodes --json`` command (after an untimed run
    that compiles the bytecode)."""
    env = user_like_env(state_root.parent / "bytecode")
    cli_wall_seconds(state_root, ["nodes", "--json"], env)
    return statistics.median(cli_wall_seconds(state_root, ["nodes", "--json"], env) for _ in range(repeat))


def one_run(workdir: Path, nodes: int, keys, run: int) -> dict:
    state = prepare(workdir, nodes)
    listing = nodes_json_seconds(state.root)
    port = state.load_config().api_port
    hub = HubProcess(state.root, port, state.cert_file, workdir / "serve.log",
                     extra=["--rate-limit", "off"]).start(timeout=300)
    try:
        time.sleep(2.0)  # the follower's first pass over hosts/ is done
        token = create_token(state.root, uses=len(keys))
        items = [Enrolment(token, f"scale{run}n{i}", key) for i, key in enumerate(keys)]
        started = time.monotonic()
        replies = enrol_concurrently(hub, items, timeout=300)
        wall = time.monotonic() - started
    finally:
        hub.stop()
    bad = [r for r in replies if r.status != 200]
    if bad:
        raise SystemExit(f"{len(bad)} enrolments failed, e.g. {bad[0]}")
    return {"wall": wall, "p99": percentile([r.seconds for r in replies], 0.99), "listing": listing}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50_000, help="nodes in the full registry (default 50000)")
    parser.add_argument("--count", type=int, default=1000, help="concurrent enrolments per batch (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="empty/full pairs, alternating (default 3)")
    args = parser.parse_args()
    if not 0 < args.nodes + args.count + 2 < 65534:
        parser.error(f"--nodes + --count must fit the VPN {VPN}")
    keys = public_keys(args.count)
    results = {"empty": [], "full": []}
    for run in range(args.runs):
        for kind, nodes in (("empty", 0), ("full", args.nodes)):
            with tempfile.TemporaryDirectory(prefix=f"enrol-scale-{kind}-") as tmp:
                result = one_run(Path(tmp), nodes, keys, run)
            results[kind].append(result)
            print(f"run {run + 1} {kind:5} ({nodes} nodes): {args.count} enrolments in "
                  f"{result['wall']:.2f} s, p99 {result['p99']:.2f} s; nodes --json "
                  f"{result['listing']:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    print()
    for figure, label in (("wall", "batch wall"), ("p99", "batch p99"), ("listing", "nodes --json")):
        empty = statistics.median(r[figure] for r in results["empty"])
        full = statistics.median(r[figure] for r in results["full"])
        ratios = [f[figure] / e[figure] for e, f in zip(results["empty"], results["full"])]
        target = ""
        if figure == "listing":
            target = f"; target {LISTING_TARGET_SECONDS:.0f} s " + ("met" if full < LISTING_TARGET_SECONDS else "NOT met")
        print(f"{label:13} {args.nodes} nodes {full:.2f} s vs empty {empty:.2f} s: ratio "
              f"{full / empty:.2f} (per pair: {', '.join(f'{r:.2f}' for r in ratios)}){target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
