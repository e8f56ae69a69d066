#!/usr/bin/env python3
"""A fleet of real tinc daemons (issue 14): how long N tincd nodes take to connect to a hub,
and to come back after a restart of the hub's tincd, against tinc's accept limit.

One fleet (labkit.fleet: N tincd nodes with DeviceType = dummy in one namespace plus a few
real tun nodes, every node enrolled through the real `tinc-hub serve` API, keys cached), then
for each node configuration (--configs, in one run, on the same fleet and hub):

- connect: all node tincd started at once; seconds until the hub's tincd has seen every node
  come up (its host-up liveness records), and the ratio to the accept bound N / 10 s
  (tinc 1.0 accepts at most 10 new meta connections per second, handle_new_meta_connection);
- memory: RSS of the hub's tincd and of `tinc-hub serve` with every node connected;
- recovery: the hub's tincd restarted (SIGTERM, start): seconds until every node is back,
  and the ratio to the same bound.

Configurations: `900` = tinc's defaults (MaxTimeout 900), `30` = MaxTimeout 30 (the node
config before issue 14), `10` = MaxTimeout 10 (a lower cap alone), `product` = what
bootstrap.py writes now (MinTimeout = MaxTimeout, 5..14 s, spread over the nodes by
name).

With --hubs 2 (needs PostgreSQL's binaries): the nodes connect to both hubs; the tun nodes
ping each other every 0.2 s while each hub's tincd restarts in turn: pings lost (target 0)
and when, and the datagrams each hub's kernel dropped for a full UDP receive buffer (the
cause of the losses before the hubs' UDPRcvBuf: roster.HUB_UDP_RCVBUF); then again with the
hubs' host-down script moved aside (it made no difference to the losses: 25 and 12 lost
with it, 27 and 12 without, before UDPRcvBuf).

    .venv/bin/python bench/fleet.py [--nodes 1000] [--tun 4] [--configs 30,product] [--hubs 1]
"""

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

from labkit import fleet as fleetlab
from labkit import netlab

CONFIGS = {
    "900": ["PingInterval = 5", "PingTimeout = 3"],
    "30": ["PingInterval = 5", "PingTimeout = 3", "MaxTimeout = 30"],
    "10": ["PingInterval = 5", "PingTimeout = 3", "MaxTimeout = 10"],
    "product": None,  # bootstrap.render_node_tinc_conf's own lines
}
SETTLE_S = 5 + 3 + 1  # a connection's backoff resets at its first PONG (PingInterval 5)


def say(msg: str) -> None:
    print("[fleet %6.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


T0 = time.monotonic()


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def figure(label: str, seconds: Optional[float], bound: float, timeout: float,
           reached: int, total: int) -> str:
    if seconds is None:
        return "%-34s > %.0f s (%d of %d connected)   bound %.0f s   ratio > %.1f   (%s)" % (
            label, timeout, reached, total, bound, timeout / bound, load())
    return "%-34s %6.1f s   bound %.0f s   ratio %.2f   (%s)" % (
        label, seconds, bound, seconds / bound, load())


def wait_all(lab: fleetlab.Fleet, hub: str, since: int, timeout: float,
             tun_since: Optional[int] = None):
    took = lab.wait_connected(hub, since, timeout, tun_since)
    return took, lab.connected_since(hub, since, tun_since)


def run_config(lab: fleetlab.Fleet, name: str, timeout: float) -> dict:
    hub = lab.hub_names[0]
    bound = fleetlab.accept_bound_s(lab.total)
    lab.set_keepalive(CONFIGS[name])
    since = int(time.time())
    started = time.monotonic()
    launch = lab.start_nodes()
    took, reached = wait_all(lab, hub, since, timeout - (time.monotonic() - started), 0)
    connect = None if took is None else time.monotonic() - started
    say(figure("[%s] connect (launch %.1f s)" % (name, launch), connect, bound, timeout,
               reached, lab.total))
    rss = lab.hub_rss_mb(hub)
    say("[%s] RSS with %d nodes: hub tincd %.1f MB, tinc-hub serve %.1f MB"
        % (name, reached, rss["tincd"], rss.get("api", float("nan"))))
    result = {"config": name, "connect": connect, "rss": rss, "recover": None}
    if connect is not None:
        time.sleep(SETTLE_S)
        restart = lab.restart_hub_tincd(hub)
        took, reached = wait_all(lab, hub, restart.since, timeout)
        result["recover"] = took
        result["stop_s"] = restart.stop_s
        say("[%s] hub tincd took %.1f s to exit (host-down for each node), %.1f s to listen"
            % (name, restart.stop_s, restart.start_s))
        say(figure("[%s] back after hub tincd restart" % name, took, bound, timeout, reached,
                   lab.total))
    lab.stop_nodes()
    return result


def two_hubs(lab: fleetlab.Fleet, timeout: float) -> None:
    """Nodes on both hubs; tun1 <-> tun2 pings while each hub's tincd restarts in turn."""
    since = int(time.time())
    lab.start_nodes()
    for hub in lab.hub_names:
        took, reached = wait_all(lab, hub, since, timeout, 0)
        say(figure("[2 hubs] connect to %s" % hub, took, fleetlab.accept_bound_s(lab.total),
                   timeout, reached, lab.total))
    time.sleep(SETTLE_S)
    src, dst = lab.tun_names[0], lab.tun_addresses[lab.tun_names[1]]
    for host_down in (True, False):
        for hub in lab.hub_names:
            lab.set_host_down_script(hub, host_down)
            ping = fleetlab.PingLoss(lab.topo[src], dst, interval=0.2)
            drops = {h: lab.udp_receive_drops(h) for h in lab.hub_names}
            time.sleep(2)
            restart = lab.restart_hub_tincd(hub)
            took, reached = wait_all(lab, hub, restart.since, timeout)
            time.sleep(2)
            lost = ping.stop()
            drops = {h: lab.udp_receive_drops(h) - drops[h] for h in lab.hub_names}
            say("[2 hubs, host-down %s] %s tincd restarted (exit %.1f s): all back in %s; "
                "%s -> %s pings lost: %d of %d (target 0); datagrams dropped for a full UDP "
                "buffer: %s" % (
                    "on" if host_down else "off", hub, restart.stop_s,
                    "%.1f s" % took if took is not None else "> %.0f s" % timeout,
                    src, dst, lost, len(ping.replies()) + max(lost, 0),
                    ", ".join("%s %d" % item for item in sorted(drops.items()))))
            if lost:
                say("    lost (s after the first reply, restart at ~2 s, count): %s"
                    % ping.gaps())
            lab.set_host_down_script(hub, True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="dummy tincd nodes (1000)")
    parser.add_argument("--tun", type=int, default=4, help="real tun nodes (4; at least 2)")
    parser.add_argument("--configs", default="30,product",
                        help="node configurations to compare, in order: %s (30,product)"
                             % ",".join(CONFIGS))
    parser.add_argument("--hubs", type=int, default=1, choices=(1, 2),
                        help="2: the two-hub phase instead (pings lost while a hub restarts)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="seconds to wait for all nodes per step (default: 5 x N/10 + 60)")
    parser.add_argument("--key-size", type=int, default=2048)
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if any(c not in CONFIGS for c in configs) or args.tun < 2:
        parser.error("--configs from %s; --tun at least 2" % ",".join(CONFIGS))
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    netlab.install_signal_handlers()
    timeout = args.timeout or 5 * fleetlab.accept_bound_s(args.nodes + args.tun) + 60
    say("%d nodes + %d tun nodes, %d hub(s), %s" % (args.nodes, args.tun, args.hubs, load()))
    results: List[dict] = []
    with fleetlab.Fleet(args.nodes, tun=args.tun, hubs=args.hubs, key_size=args.key_size,
                        say=say) as lab:
        for name in lab.tun_names[1:]:
            if not lab.topo[lab.tun_names[0]].wait_ping(lab.tun_addresses[name], timeout=60):
                raise SystemExit("tun nodes do not ping through the hub")
        say("tun nodes ping each other through the hub")
        if args.hubs == 2:
            two_hubs(lab, timeout)
            return 0
        for name in configs:
            results.append(run_config(lab, name, timeout))
    bound = fleetlab.accept_bound_s(args.nodes + args.tun)
    print("\nsummary (bound = %d nodes / %d per s = %.0f s):" % (
        args.nodes + args.tun, fleetlab.ACCEPT_RATE, bound))
    for r in results:
        def fmt(v):
            return "%6.1f s (x%.2f)" % (v, v / bound) if v is not None else "   timeout     "
        print("  %-8s connect %s   recover %s   hub tincd %.1f MB   serve %.1f MB   "
              "hub tincd exit %.1f s" % (r["config"], fmt(r["connect"]), fmt(r["recover"]),
                                         r["rss"]["tincd"], r["rss"].get("api", float("nan")),
                                         r.get("stop_s", float("nan"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
