#!/usr/bin/env python3
"""SIGHUP at scale: the hub's real tincd (the config ``tinc-hub init`` writes: TunnelServer)
in a network namespace, with N node host files in hosts/, and a probe node (real tun) that
pings the hub every 10 ms. Needs root.

``reload`` (default): for each N (baseline 10, then --files, default 1000,10000,50000) the
hub's tincd is restarted with N host files and SIGHUPed --reloads times (default 50): per
SIGHUP its CPU time (/proc/PID/stat), the wall time until it sleeps again, the relay stall (the
longest ping round trip around it) and its RSS after 1, 10 and 50 reloads (tinc 1.0.36 leaks
one subnet_t per existing Subnet per reload). Each figure with the 10-file baseline and the ratio.

``burst``: the real ``tinc-hub serve`` with the hub's tincd (and --prefill host files the
registry does not know, for reload cost); --bursts (default 3) bursts of
--burst (default 1000) concurrent enrolments: per burst the SIGHUPs tincd got (its log), its
RSS, the enrolments' wall time; then a node enrolled after the last burst: seconds from its
answer until it pings the hub.

``fact``: a node whose host file was written after the hub's last SIGHUP: does it connect,
does it ping the hub before a SIGHUP, and after?

    .venv/bin/python bench/sighup_scale.py [reload|burst|fact] [--files 1000,10000,50000]
        [--reloads 50] [--burst 1000] [--bursts 3] [--prefill 50000] [--hub-pythonpath DIRS]
"""

import argparse
import os
import re
import signal
import statistics
import sys
import time
from typing import Dict, List, Tuple


from labkit import netlab
from labkit.hub_tincd import (HubTincdLab, derived_public_keys, enrol_burst_in, hup_count,
                              new_private_key, proc_sample, rss_kib, wait_idle, write_host_files)

NET = "hupnet"
# one client address sends every enrolment: no per-address limits in the way
SERVE_OPTIONS = ["--rate-limit", "off", "--max-connections", "4000", "--max-connections-per-address", "4000"]
PING_RE = re.compile(r"^\[(\d+\.\d+)\].* time=([\d.]+) ms")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


class Pinger:
    """``ping -D -i 0.01`` from the probe to the hub, in the background; its replies parsed."""

    def __init__(self, lab: HubTincdLab) -> None:
        self.proc = lab.topo[lab.probe_name].popen(
            ["ping", "-n", "-D", "-i", "0.01", "-W", "5", lab.hub_vpn_address()],
            log="probe.ping.%d.log" % time.monotonic_ns())

    def replies(self) -> List[Tuple[float, float]]:
        """(unix time of the reply, round trip in s)."""
        out = []
        for line in self.proc.output().splitlines():
            m = PING_RE.match(line)
            if m:
                out.append((float(m.group(1)), float(m.group(2)) / 1000))
        return out

    def stop(self) -> None:
        self.proc.stop()


def stall_after(replies: List[Tuple[float, float]], at: float, window: float) -> float:
    """The longest round trip of the replies received within ``window`` s after ``at``."""
    return max([rtt for t, rtt in replies if at <= t <= at + window] or [float("nan")])


def measure_reloads(lab: HubTincdLab, count: int) -> Dict[str, object]:
    pid = lab.pid
    pinger = Pinger(lab)
    netlab.wait_until(lambda: len(pinger.replies()) >= 20, 20, 0.05, what="probe pings the hub")
    rss = {0: rss_kib(pid)}
    hups = hup_count(lab.log_text())
    cpu, wall, sent_at = [], [], []
    for i in range(1, count + 1):
        before = proc_sample(pid).cpu
        sent_at.append(time.time())
        os.kill(pid, signal.SIGHUP)
        wall.append(wait_idle(pid, 120))
        cpu.append(proc_sample(pid).cpu - before)
        if i in (1, 10, 50) or i == count:
            rss[i] = rss_kib(pid)
        time.sleep(0.15)  # ping replies between reloads
    time.sleep(0.3)
    replies = pinger.replies()
    pinger.stop()
    assert hup_count(lab.log_text()) - hups == count, "tincd did not log every SIGHUP"
    stalls = [stall_after(replies, t, w + 1.0) for t, w in zip(sent_at, wall)]
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall),
            "stall": statistics.median(s for s in stalls if s == s) if any(s == s for s in stalls) else float("nan"),
            "rss": rss}


def reload_mode(args) -> int:
    counts = [10] + [int(x) for x in args.files.split(",")]
    key = derived_public_keys(1)[0]
    probe_key = new_private_key()
    results = {}
    with HubTincdLab(NET, "10.60.0.0/16") as lab:
        for n in counts:
            t = time.monotonic()
            for p in lab.hosts_dir.iterdir():  # exactly n node files (+ the hub's and the probe's)
                if p.name not in (lab.hub.name, lab.probe_name):
                    p.unlink()
            write_host_files(lab.hosts_dir, lab.free_addresses(n), key)
            files = len(os.listdir(lab.hosts_dir))
            if n == counts[0]:
                lab.start_probe(str(lab.vpn_subnet.network_address + 2), probe_key)
            lab.restart_tincd()
            started = rss_kib(lab.pid)
            print("N=%d: %d files in hosts/ (written in %.1f s); tincd RSS after start %.1f MB; %s"
                  % (n, files, time.monotonic() - t, started / 1024, load()), flush=True)
            netlab.wait_until(lambda: lab.probe_pings_hub(), 60, 0.2, what="probe pings the hub")
            reloads = args.reloads if n > 10 else max(args.reloads, 20)
            r = measure_reloads(lab, reloads)
            r["start_rss"] = started
            results[n] = r
            print("  per SIGHUP (median of %d): CPU %.3f s, wall %.3f s, relay stall %.3f s; "
                  "RSS MB %s" % (
                      reloads, r["cpu"], r["wall"], r["stall"],
                      ", ".join("%d: %.1f" % (k, v / 1024) for k, v in sorted(r["rss"].items()))),
                  flush=True)
    base = results[10]
    print("\nReload cost vs host files (baseline: 10 host files, same run; %s)" % load())
    for n, r in results.items():
        last = max(r["rss"])
        per_reload = (r["rss"][last] - r["rss"][0]) * 1024 / last
        print("  N=%6d: wall %.3f s (%.0fx the baseline's %.3f s), relay stall %.3f s (%.0fx %.3f s), "
              "CPU %.3f s (%.1f us per host file); RSS %.1f MB at start, %s; +%.0f B per reload "
              "(%.1f B per host file)" % (
                  n, r["wall"], r["wall"] / max(base["wall"], 0.0005), base["wall"], r["stall"],
                  r["stall"] / max(base["stall"], 0.0005), base["stall"], r["cpu"], r["cpu"] / n * 1e6,
                  r["start_rss"] / 1024, ", ".join("%.1f after %d" % (v / 1024, k) for k, v in sorted(r["rss"].items()) if k),
                  per_reload, per_reload / n))
    return 0


def burst_mode(args) -> int:
    keys = derived_public_keys(args.burst * args.bursts)
    probe_key = new_private_key()
    with HubTincdLab(NET, "10.61.0.0/16") as lab:
        hub = lab.hub
        if args.prefill:  # host files the registry does not know (kept by the follower): cost
            write_host_files(lab.hosts_dir, lab.free_addresses(args.prefill, skip=args.burst * args.bursts + 10),
                             keys[0], prefix="x")
            lab.restart_tincd()
        env = {"PYTHONUNBUFFERED": "1"}
        if args.hub_pythonpath:
            env["PYTHONPATH"] = args.hub_pythonpath
        hub.serve_proc = hub.host.popen([hub.tinc_hub, "serve"] + SERVE_OPTIONS, log="hub.tinc-hub-serve.log", env=env)
        hub.wait_healthy(60)
        token = hub.token_create("--uses", str(args.burst * args.bursts + 1))["token"]
        print("hub: tinc-hub serve%s + its tincd, %d host files; %s" % (
            " (PYTHONPATH=%s)" % args.hub_pythonpath if args.hub_pythonpath else "",
            len(os.listdir(lab.hosts_dir)), load()), flush=True)
        for b in range(args.bursts):
            hups, rss = hup_count(lab.log_text()), rss_kib(lab.pid)
            names = ["b%dn%d" % (b, i) for i in range(args.burst)]
            t = time.monotonic()
            replies = enrol_burst_in(lab.topo.hub, token, names, keys[b * args.burst:(b + 1) * args.burst])
            took = time.monotonic() - t
            ok = sum(r["status"] == 200 for r in replies)
            if ok < len(replies):
                print("  not 200: %s" % sorted({(r["status"], r["error"][:60]) for r in replies if r["status"] != 200}))
            secs = sorted(r["seconds"] for r in replies)
            wait_idle(lab.pid, 60)
            print("burst %d: %d/%d enrolled in %.1f s (p50 %.2f s, p99 %.2f s); SIGHUPs %d; "
                  "tincd RSS %.1f -> %.1f MB; host files %d; %s" % (
                      b + 1, ok, len(replies), took, secs[len(secs) // 2], secs[int(len(secs) * 0.99)],
                      hup_count(lab.log_text()) - hups, rss / 1024, rss_kib(lab.pid) / 1024,
                      len(os.listdir(lab.hosts_dir)), load()), flush=True)
        # the node after the burst: enrol (real key), start its tincd, seconds until it pings
        answered = lab.enrol_and_start_probe(token, probe_key)
        t2 = time.monotonic()
        netlab.wait_until(lambda: lab.probe_pings_hub(0.5), 60, 0.05, what="late node pings the hub")
        print("node after the bursts: answered in %.2f s, pings the hub %.2f s after its tincd started"
              % (answered, time.monotonic() - t2))
        print("hub log: %s" % " | ".join(l for l in hub.serve_proc.output().splitlines() if "reload" in l)[-600:])
        print("tincd: %d SIGHUPs in all, RSS %.1f MB; %s" % (hup_count(lab.log_text()), rss_kib(lab.pid) / 1024, load()))
    return 0


def fact_mode(args) -> int:
    with HubTincdLab(NET, "10.62.0.0/24") as lab:
        time.sleep(1.1)  # the host file's mtime (seconds) must be after tincd's start
        address = str(lab.vpn_subnet.network_address + 2)
        lab.start_probe(address, new_private_key())  # host file written now: no SIGHUP since
        activated = netlab.wait_until(lambda: "Connection with %s" % lab.probe_name in lab.log_text()
                                      and "activated" in lab.log_text(), 30, 0.1, what="connection")
        print("host file written after the hub's last reload: meta connection activated: %s" % bool(activated))
        pings = lab.probe_pings_hub(1.0) or lab.probe_pings_hub(1.0)
        print("  ping probe -> hub before any SIGHUP: %s" % ("answered" if pings else "NO answer"))
        os.kill(lab.pid, signal.SIGHUP)
        t = time.monotonic()
        netlab.wait_until(lambda: lab.probe_pings_hub(0.5), 60, 0.05, what="ping after SIGHUP")
        print("  after one SIGHUP: answered %.2f s later" % (time.monotonic() - t))
        print("  hub log:\n    " + "\n    ".join(l for l in lab.log_text().splitlines()
                                             if lab.probe_name in l or "HUP" in l or "Subnet" in l)[-3000:])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("mode", nargs="?", default="reload", choices=("reload", "burst", "fact"))
    parser.add_argument("--files", default="1000,10000,50000", help="host file counts (the 10-file baseline is added)")
    parser.add_argument("--reloads", type=int, default=50, help="SIGHUPs per host file count")
    parser.add_argument("--burst", type=int, default=1000, help="concurrent enrolments per burst")
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=0,
                        help="burst: host files written into hosts/ first (unknown to the registry: reload cost)")
    parser.add_argument("--hub-pythonpath", default="",
                        help="burst: PYTHONPATH for tinc-hub serve (e.g. an older checkout's hub:root, to compare)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("sighup_scale: needs root (network namespaces, tincd)", file=sys.stderr)
        return 2
    return {"reload": reload_mode, "burst": burst_mode, "fact": fact_mode}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
