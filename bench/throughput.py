#!/usr/bin/env python3
"""Hub throughput: N concurrent enrolments (default 1000) against the real ``tinc-hub serve``
on 127.0.0.1, keys made before the clock starts. Prints enrolments/s, p50/p99 latency and
the hub's RSS idle and at its peak under load. Baseline measured in the same run: the same
number of plain ``GET /healthz`` requests (TLS connection + HTTP, no enrolment work).

    .venv/bin/python bench/throughput.py [--count 1000] [--runs 3] [--workdir DIR]
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from labkit.loopback_hub import (HOST, Enrolment, HubProcess, create_token, enrol_concurrently,
                                 file_creation_us, free_port, init_hub_state, percentile,
                                 public_keys, raise_fd_limit)


SLOW_CREATE_US = 200  # creating one file costs more: the workdir, not the hub, is measured


def children_switches() -> int:
    """Context switches of this process's children that ended (each hub, once stopped: all of
    its threads, those that ended too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_nvcsw + usage.ru_nivcsw


class PeakRss(threading.Thread):
    """Samples the hub's RSS every 20 ms until stopped; keeps the maximum."""

    def __init__(self, hub: HubProcess) -> None:
        super().__init__(daemon=True)
        self.hub, self.peak, self.done = hub, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.hub.rss_mb())
            except (OSError, KeyError):
                pass
            self.done.wait(0.02)


def one_run(count: int, keys, workdir: Path) -> dict:
    port = free_port()
    state = init_hub_state(workdir, vpn_subnet="10.96.0.0/16", api_port=port)
    switches = children_switches()
    hub = HubProcess(state.root, port, state.cert_file, workdir / "serve.log",
                     extra=["--rate-limit", "off"]).start()
    try:
        time.sleep(1.0)
        idle = hub.rss_mb()
        token = create_token(state.root, uses=count)
        items = [Enrolment(token, f"bench{i}", keys[i]) for i in range(count)]
        sampler = PeakRss(hub)
        sampler.start()
        cpu = hub.cpu_seconds()
        started = time.monotonic()
        replies = enrol_concurrently(hub, items, timeout=120)
        wall = time.monotonic() - started
        cpu = hub.cpu_seconds() - cpu
        sampler.done.set()
        sampler.join()
        bad = [r for r in replies if r.status != 200]
        if bad:
            raise SystemExit(f"{len(bad)} enrolments failed, e.g. {bad[0]}")
        lat = [r.seconds for r in replies]
        result = {"wall": wall, "rate": count / wall, "p50": percentile(lat, 0.5),
                  "p99": percentile(lat, 0.99), "idle_mb": idle, "peak_mb": sampler.peak,
                  "threads": hub.threads(), "cpu_ms": 1000 * cpu / count}
    finally:
        hub.stop()
    result["switches"] = (children_switches() - switches) / count  # its whole life: start and idle too
    return result


def healthz_baseline(count: int, workdir: Path) -> dict:
    """``count`` concurrent TLS GET /healthz against a fresh hub: wall seconds, p50, p99 (each
    request timed from connect to the end of its answer, as enrolments are)."""
    import asyncio

    port = free_port()
    state = init_hub_state(workdir, api_port=port)
    switches = children_switches()
    hub = HubProcess(state.root, port, state.cert_file, workdir / "serve.log",
                     extra=["--rate-limit", "off"]).start()
    context = hub.ssl_context()

    async def get() -> "tuple[bool, float]":
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, port, ssl=context, server_hostname=HOST)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        data = await reader.read()
        writer.close()
        return data.startswith(b"HTTP/1.1 200"), time.monotonic() - started

    async def all_of_them() -> list:
        return list(await asyncio.gather(*(get() for _ in range(count))))

    try:
        raise_fd_limit(count + 256)
        cpu = hub.cpu_seconds()
        started = time.monotonic()
        replies = asyncio.run(all_of_them())
        wall = time.monotonic() - started
        cpu = hub.cpu_seconds() - cpu
        assert all(ok for ok, _ in replies)
        lat = [seconds for _, seconds in replies]
        result = {"wall": wall, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99),
                  "cpu_ms": 1000 * cpu / count}
    finally:
        hub.stop()
    result["switches"] = (children_switches() - switches) / count
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=None,
                        help="where the hubs' state and hosts/ go (default: the system temp dir; a"
                             " directory churned by other jobs makes each new file's inode slow to"
                             " find: the cost of creating a file there is printed with each run)")
    args = parser.parse_args()
    t = time.monotonic()
    keys = public_keys(args.count)
    print(f"keys: {args.count} RSA-2048 public keys made in {time.monotonic() - t:.1f} s (not timed)")
    results, baselines = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-tp-", dir=args.workdir) as tmp:
            create_us = file_creation_us(Path(tmp) / "probe")
            baselines.append(healthz_baseline(args.count, Path(tmp) / "base"))
            r = one_run(args.count, keys, Path(tmp) / "hub")
        results.append(r)
        print(f"run {run + 1}: {args.count} enrolments in {r['wall']:.2f} s = {r['rate']:.0f}/s;"
              f" p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s; hub RSS idle {r['idle_mb']:.1f} MB,"
              f" peak {r['peak_mb']:.1f} MB, threads {r['threads']};"
              f" baseline {args.count} x GET /healthz {baselines[-1]['wall']:.2f} s"
              f" (p50 {baselines[-1]['p50']:.2f} s, p99 {baselines[-1]['p99']:.2f} s);"
              f" ratios wall {r['wall'] / baselines[-1]['wall']:.2f}x,"
              f" p99 {r['p99'] / baselines[-1]['p99']:.2f}x; hub CPU per request {r['cpu_ms']:.2f} ms"
              f" (baseline {baselines[-1]['cpu_ms']:.2f} ms, {r['cpu_ms'] / baselines[-1]['cpu_ms']:.2f}x);"
              f" context switches per request {r['switches']:.1f} (baseline {baselines[-1]['switches']:.1f});"
              f" new file in the workdir {create_us:.0f} us; load average {os.getloadavg()[0]:.1f}")
        if create_us > SLOW_CREATE_US:
            print(f"  warning: creating a file in {args.workdir or tempfile.gettempdir()} takes"
                  f" {create_us:.0f} us (the filesystem's inode groups are crowded); every enrolment"
                  f" creates one: pass a --workdir where it is cheap")
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    base = {k: statistics.median(b[k] for b in baselines) for k in baselines[0]}
    ratio = {k: statistics.median(r[k] / b[k] for r, b in zip(results, baselines))
             for k in ("wall", "p50", "p99", "cpu_ms")}
    print(f"median of {args.runs}: {args.count} enrolments in {med['wall']:.2f} s"
          f" ({med['rate']:.0f}/s), p50 {med['p50']:.2f} s, p99 {med['p99']:.2f} s;"
          f" RSS idle {med['idle_mb']:.1f} MB, loaded peak {med['peak_mb']:.1f} MB")
    print(f"baseline (same run): {args.count} concurrent GET /healthz in {base['wall']:.2f} s,"
          f" p50 {base['p50']:.2f} s, p99 {base['p99']:.2f} s")
    print(f"ratios enrolment/baseline (median of the runs' paired ratios): wall {ratio['wall']:.2f}x,"
          f" p50 {ratio['p50']:.2f}x, p99 {ratio['p99']:.2f}x against the baseline's own p99;"
          f" p99 {med['p99'] / base['wall']:.2f}x the baseline's wall")
    print(f"hub CPU per request: enrolment {med['cpu_ms']:.2f} ms, GET /healthz {base['cpu_ms']:.2f} ms"
          f" ({ratio['cpu_ms']:.2f}x): the hub is one process under the GIL, its CPU bounds both;"
          f" its threads' context switches per request (each a hand-over of the GIL, mostly):"
          f" enrolment {med['switches']:.1f}, GET /healthz {base['switches']:.1f}")
    print(f"issue 14 target: wall and p99 <= 2x the baseline ->"
          f" {'met' if ratio['wall'] <= 2 and ratio['p99'] <= 2 else 'MISSED'}")
    print(f"targets: <= 5 s -> {'met' if med['wall'] <= 5 else 'MISSED'};"
          f" p99 <= 2 s -> {'met' if med['p99'] <= 2 else 'MISSED'};"
          f" RSS idle <= 80 MB -> {'met' if med['idle_mb'] <= 80 else 'MISSED'};"
          f" loaded <= 200 MB -> {'met' if med['peak_mb'] <= 200 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
