#!/usr/bin/env python3
"""Listings at fleet size: ``tinc-hub nodes --json`` and ``tinc-hub nodes`` with --nodes nodes
(default 50,000, a /16) in the registry, bare and with a liveness record per node (a fleet
whose nodes have all connected), each against the same command on an empty registry in the
same run (runs alternating: empty, full, full with records cold, full with records warm).
Every figure: the median wall time of a fresh process, the ratio to the empty registry's, and
the 1-s target of issue 14.

With records, "cold" is the first listing after the records changed: no usable liveness
snapshot (STATE/liveness.snapshot is removed before each such run), so it reads every record
and writes the snapshot; "warm" is the next one, which reads the snapshot (liveness.py). The
records directory is left to age past liveness.SNAPSHOT_MARGIN_NS first, as a fleet's
directory does between two connects or disconnects.

Timed as a user runs it: a fresh ``tinc-hub`` process with its bytecode compiled (pip does it
at install; here it is cached in a temporary directory, one untimed run first). The registry is
filled through the registry API (labkit.registry_fill), no host files.

    .venv/bin/python bench/listing_scale.py [--nodes 50000] [--runs 7]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from labkit.loopback_hub import cli_wall_seconds, free_port, init_hub_state, user_like_env
from labkit.registry_fill import fill_registry, write_liveness_records
from tinc_hub import liveness
from tinc_hub.registry import Registry

VPN = "10.96.0.0/16"
TARGET_SECONDS = 1.0
COMMANDS = {"nodes --json": ["nodes", "--json"], "nodes": ["nodes"]}


def make_states(workdir: Path, nodes: int) -> dict:
    """Three hub state dirs: no nodes, ``nodes`` nodes, and the same with liveness records."""
    states = {}
    for kind in ("empty", "full", "records"):
        state = init_hub_state(workdir / kind, vpn_subnet=VPN, api_port=free_port())
        if kind != "empty":
            config = state.load_config()
            registry = Registry.for_state(state)
            rows = fill_registry(registry, VPN, nodes, reserved=[config.hub_address])
            registry.dispose()
            if kind == "records":
                write_liveness_records(state.root, rows, int(time.time()))
        states[kind] = state.root
    return states


KINDS = {"empty": "empty", "full": "full", "records cold": "records", "records warm": "records"}


def forget_snapshot(root: Path) -> None:
    """Removes the liveness snapshot: the next listing reads every record (a cold run)."""
    (root / liveness.SNAPSHOT_NAME).unlink(missing_ok=True)


def wait_until_settled(root: Path) -> None:
    """Returns once the records directory was last changed SNAPSHOT_MARGIN_NS ago (a listing
    may then write a snapshot); bounded by the margin itself."""
    directory = liveness.liveness_dir(root).stat()
    settled_at = max(directory.st_mtime_ns, directory.st_ctime_ns) + liveness.SNAPSHOT_MARGIN_NS
    time.sleep(max(0.0, (settled_at - time.time_ns()) / 1e9 + 0.05))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50_000, help="nodes in the full registry (default 50000)")
    parser.add_argument("--runs", type=int, default=7, help="alternating rounds per command (default 7)")
    args = parser.parse_args()
    if not 0 < args.nodes < 65533:
        parser.error(f"--nodes must fit the VPN {VPN}")
    with tempfile.TemporaryDirectory(prefix="listing-scale-") as tmp:
        workdir = Path(tmp)
        print(f"filling registries of {args.nodes} nodes ...", flush=True)
        states = make_states(workdir, args.nodes)
        env = user_like_env(workdir / "bytecode")
        wait_until_settled(states["records"])
        times = {(command, kind): [] for command in COMMANDS for kind in KINDS}
        for argv in COMMANDS.values():  # untimed: compiles the bytecode, warms the page cache
            for root in states.values():
                cli_wall_seconds(root, argv, env)
        for run in range(args.runs):
            for command, argv in COMMANDS.items():
                for kind, state_kind in KINDS.items():
                    if kind == "records cold":
                        forget_snapshot(states[state_kind])
                    times[(command, kind)].append(cli_wall_seconds(states[state_kind], argv, env))
            print(f"run {run + 1}: " + ", ".join(f"{c} {k} {times[(c, k)][-1]:.2f} s" for c, k in times)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    print()
    for command in COMMANDS:
        empty = statistics.median(times[(command, "empty")])
        for kind, label in (("full", f"{args.nodes} nodes"), ("records cold", f"{args.nodes} + records, cold"),
                            ("records warm", f"{args.nodes} + records, warm")):
            full = statistics.median(times[(command, kind)])
            ratios = [f / e for e, f in zip(times[(command, "empty")], times[(command, kind)])]
            verdict = "met" if full < TARGET_SECONDS else "NOT met"
            print(f"{command:13} {label:27} {full:.2f} s vs empty {empty:.2f} s: ratio {full / empty:.2f}"
                  f" (per run {min(ratios):.2f}-{max(ratios):.2f}); target {TARGET_SECONDS:.0f} s {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
