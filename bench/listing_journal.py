#!/usr/bin/env python3
"""The liveness journal against the records-only code before it: ``tinc-hub nodes --json`` with --nodes
nodes (default 50,000) and a liveness record per node, "cold" = --changes records (default 100)
just replaced by the real host-up/host-down scripts since the last snapshot.

Two copies of the same state dir: one driven by the records-only code and scripts ("main" below:
--main-ref, default the last commit before the journal; records only: a cold
listing reads every record), one by this branch's (records + journal: the snapshot serve left,
plus the journal's lines since). Each round: serve's refresh of the journal state (timed, in
this process), the changes through the scripts on both states, then the two cold listings in
alternating order, then a warm journal listing (no unread line). The old code is run from
``git archive MAIN_REF`` via PYTHONPATH, with this venv's interpreter. Finally one
compaction (the journal set aside, every record read once) is timed.

With --main-journal, the main side runs the journal too (its own scripts with the journal, its
own serve refresh in a fresh process after each cold listing, then a warm listing of its own):
this branch's listing against main's, the same state on both sides.

    .venv/bin/python bench/listing_journal.py [--nodes 50000] [--changes 100] [--runs 7]
    .venv/bin/python bench/listing_journal.py --main-ref main --main-journal
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from labkit.loopback_hub import free_port, init_hub_state, user_like_env
from labkit.registry_fill import fill_registry, write_liveness_records
from tinc_hub import liveness
from tinc_hub.registry import Registry

VPN = "10.96.0.0/16"
ARGV = ["nodes", "--json"]
REPO = Path(__file__).resolve().parent.parent
RECORDS_ONLY_REF = "bfcd132"  # main just before the journal was merged


def write_scripts(directory: Path, state_root: Path, journal: bool) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    scripts = {}
    for event in ("up", "down"):
        path = directory / f"host-{event}"
        path.write_text(liveness.render_host_script(state_root, event, journal))
        path.chmod(0o755)
        scripts[event] = path
    return scripts


def cli_wall_seconds(state_dir: Path, argv: list, env: dict, timeout: float = 300.0) -> float:
    """Wall time of one fresh ``tinc-hub --state-dir STATE ARGV...``, waited on with a blocking
    waitpid (subprocess's wait with a timeout polls in steps of up to 50 ms: the figures
    would be quantized); killed after ``timeout``."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tinc_hub.cli", "--state-dir", str(state_dir), *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        returncode = proc.wait()
    finally:
        killer.cancel()
    elapsed = time.monotonic() - started
    if returncode != 0:
        raise RuntimeError(f"tinc-hub {' '.join(argv)} exited {returncode}")
    return elapsed


def run_changes(scripts: dict, names: list, round_index: int) -> None:
    """One host-up/host-down per name through the real script, as tincd runs it."""
    for index, name in enumerate(names):
        event = "up" if (index + round_index) % 2 else "down"
        env = {"PATH": "/usr/bin:/bin", "NODE": name, "REMOTEADDRESS": f"192.0.2.{index % 250 + 1}"}
        subprocess.run([str(scripts[event])], env=env, check=True, timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50_000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--main-ref", default=RECORDS_ONLY_REF,
                        help="the records-only code to compare with (default: the last commit before the journal)")
    parser.add_argument("--main-journal", action="store_true",
                        help="main's side with the journal too (scripts, serve refresh, warm listing)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="listing-journal-") as tmp:
        workdir = Path(tmp)
        main_code = workdir / "main-code"
        main_code.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.main_ref, "hub/tinc_hub", "bootstrap"],
                                 check=True, stdout=subprocess.PIPE).stdout
        subprocess.run(["tar", "-x", "-C", str(main_code)], input=archive, check=True)
        print(f"filling a registry of {args.nodes} nodes ...", flush=True)
        state = init_hub_state(workdir / "journal", vpn_subnet=VPN, api_port=free_port())
        registry = Registry.for_state(state)
        rows = fill_registry(registry, VPN, args.nodes, reserved=[state.load_config().hub_address])
        registry.dispose()
        write_liveness_records(state.root, rows, int(time.time()))
        roots = {"journal": state.root, "main": workdir / "main" / "state"}
        shutil.copytree(workdir / "journal", workdir / "main", symlinks=True)
        scripts = {kind: write_scripts(workdir / f"scripts-{kind}", root, kind == "journal" or args.main_journal)
                   for kind, root in roots.items()}
        envs = {"journal": user_like_env(workdir / "bytecode-journal"),
                "main": dict(user_like_env(workdir / "bytecode-main"),
                             PYTHONPATH=f"{main_code / 'hub'}{os.pathsep}{main_code}")}
        if not args.main_journal:
            check = "import sys, tinc_hub.liveness as l; sys.exit(hasattr(l, 'JOURNAL_NAME'))"
            subprocess.run([sys.executable, "-c", check], env=envs["main"], check=True)  # main's code runs

        def main_refresh() -> None:  # serve's refresh with main's code (a first one: a full read)
            code = f"from tinc_hub import liveness; liveness.refresh_snapshot({str(roots['main'])!r})"
            subprocess.run([sys.executable, "-c", code], env=envs["main"], check=True)
        names = [row.name for row in rows[:: max(1, len(rows) // args.changes)]][: args.changes]
        for kind in roots if args.main_journal else ["journal"]:
            run_changes(scripts[kind], names[:1], 0)  # the first line: the journal exists
        for kind in roots:  # untimed: bytecode, page cache, and each side's first snapshot
            cli_wall_seconds(roots[kind], ARGV, envs[kind])
        liveness.refresh_snapshot(roots["journal"])  # serve's first refresh: a full read
        times = {"main cold": [], "journal cold": [], "journal warm": [], "serve refresh": []}
        if args.main_journal:
            main_refresh()
            times["main warm"] = []
        for run in range(args.runs):
            for kind in roots:
                run_changes(scripts[kind], names, run)
            snapshot = roots["journal"] / liveness.SNAPSHOT_NAME
            before = snapshot.stat().st_mtime_ns
            order = ["main cold", "journal cold"] if run % 2 == 0 else ["journal cold", "main cold"]
            for label in order:
                kind = label.split()[0]
                times[label].append(cli_wall_seconds(roots[kind], ARGV, envs[kind]))
            # a cold listing that fell back to the records would have rewritten the snapshot
            assert snapshot.stat().st_mtime_ns == before, "the journal listing read the records"
            started = time.monotonic()
            assert liveness.refresh_snapshot(roots["journal"]) is False  # serve, every 5 s: lines only
            times["serve refresh"].append(time.monotonic() - started)
            if args.main_journal:
                main_refresh()
                warm = ["main", "journal"] if run % 2 == 0 else ["journal", "main"]
            else:
                warm = ["journal"]
            for kind in warm:
                times[f"{kind} warm"].append(cli_wall_seconds(roots[kind], ARGV, envs[kind]))
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
                  + f" (load {os.getloadavg()[0]:.2f})", flush=True)
        journal_size = (roots["journal"] / liveness.JOURNAL_NAME).stat().st_size
        started = time.monotonic()
        liveness.refresh_snapshot(roots["journal"], compact_bytes=0)
        compaction = time.monotonic() - started
        assert (roots["journal"] / liveness.JOURNAL_ASIDE_NAME).exists()
    print()
    main_cold = statistics.median(times["main cold"])
    for label, values in times.items():
        median = statistics.median(values)
        paired = [v / m for v, m in zip(values, times["main cold"])]
        print(f"{label:14} median {median:.3f} s, ratio to main cold {median / main_cold:.2f}"
              f" (per round {min(paired):.2f}-{max(paired):.2f})")
    print(f"compaction of a {journal_size} B journal (every record read once): {compaction:.3f} s")
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
