#!/usr/bin/env python3
"""Run the measurement scenarios; one JSON line per scenario appended to results.jsonl."""
import json
import signal
import sys
import time

from lab import HUBS, NODES, VPN, Lab, Pinger, ensure_key, outage, wait_for

FAST = ["PingInterval = 5", "PingTimeout = 2"]
NET = "10.0.0.0/24"


def own32(n):
    return [VPN[n] + "/32"]


# hub subnet layouts: f(viewer, hub) -> Subnet lines of hub's host file as the viewer has it
LAYOUTS = {
    # (i) every hub claims its /32 and the /24 (what one hub does today)
    "both24": lambda viewer, hub: own32(hub) + [NET],
    # (ii) hubs claim only their /32
    "only32": lambda viewer, hub: own32(hub),
    # only h1 claims the /24
    "h1only24": lambda viewer, hub: own32(hub) + ([NET] if hub == "h1" else []),
    # (iii) hub relay: a hub's own /24 weighs more (worse) than the other hubs' /24 in its view,
    # so a hub that lacks the destination node hands the packet to another hub.
    "relay": lambda viewer, hub: own32(hub) + [NET + ("#20" if viewer == hub else "#10")],
}


def setup(lab, layout, hub_connect, node_conf, hub_conf=(), stagger=0):
    lay = LAYOUTS[layout]
    for h in HUBS:
        conf = ["TunnelServer = yes"] + list(hub_conf)
        if hub_connect:
            conf += ["ConnectTo = %s" % o for o in HUBS if o != h]
        hosts = {o: lay(h, o) for o in HUBS}
        hosts.update({n: own32(n) for n in NODES})
        lab.configure(h, conf, hosts)
    for n in NODES:
        conf = ["ConnectTo = %s" % h for h in HUBS] + list(node_conf)
        hosts = {h: lay(n, h) for h in HUBS}
        hosts[n] = own32(n)
        lab.configure(n, conf, hosts)
    for x in HUBS + NODES:
        if x == "b" and stagger:
            time.sleep(stagger)  # desynchronise the nodes' ping and retry phases
        lab.start(x)


def run(tag, layout="both24", hub_connect=True, node_conf=(), hub_conf=(), blocks=(),
        fail=None, down_for=30, restore=True, settle=3, stagger=0):
    lab = Lab(tag)
    res = {"dir": str(lab.dir), "tag": tag, "layout": layout, "hub_connect": hub_connect, "node_conf": list(node_conf),
           "hub_conf": list(hub_conf), "blocks": [list(b) for b in blocks], "fail": fail}
    try:
        lab.build()
        for a, b in blocks:
            lab.block(a, b)
            lab.block(b, a)
        t0 = time.monotonic()
        setup(lab, layout, hub_connect, node_conf, hub_conf, stagger)
        res["first_ping_s"] = lab.wait_ping("a", "b", 30)
        res["ping_a_b_ok"] = res["first_ping_s"] is not None
        blocked = {frozenset(b) for b in blocks}
        want = {h: {n for n in NODES if frozenset((n, h)) not in blocked} for h in HUBS}
        res["all_attached_s"] = wait_for(lambda: all(want[h] <= lab.peers_of(h) for h in HUBS), 30)
        time.sleep(settle)
        res["peers"] = {h: sorted(lab.peers_of(h)) for h in HUBS}
        res["relay"], res["loss"] = lab.relay_hub("a", "b")
        if fail and res["ping_a_b_ok"]:
            pinger = Pinger(lab, "a", "b")
            time.sleep(3)
            t_event = time.time()
            res["t_event"] = t_event
            if fail in ("cut", "cut+kill"):
                lab.link("h1", False)
            if fail in ("kill", "cut+kill"):
                lab.kill("h1")
            time.sleep(1.5)
            rec = wait_for(lambda: lab.ping_once("a", "b"), 150)
            time.sleep(1.5)
            replies = pinger.stop()
            res["outage_gap_s"], res["recovery_s"] = outage(replies, t_event, time.time())
            res["recovered_by_probe"] = rec is not None
            res["relay_after_fail"], _ = lab.relay_hub("a", "b")
            if restore:
                rest = down_for - (time.time() - t_event)
                if rest > 0:
                    time.sleep(rest)
                res["down_for_s"] = round(time.time() - t_event, 1)
                pinger = Pinger(lab, "a", "b")
                time.sleep(2)
                t_back = time.time()
                res["t_back"] = t_back
                if fail in ("cut", "cut+kill"):
                    lab.link("h1", True)
                if "h1" not in lab.procs:
                    lab.start("h1")
                res["reconnect_a_s"] = wait_for(lambda: "a" in lab.peers_of("h1"), 400, 0.5)
                res["reconnect_both_s"] = wait_for(
                    lambda: {"a", "b"} <= lab.peers_of("h1"), 400, 0.5)
                if res["reconnect_both_s"] is not None:
                    res["reconnect_both_s"] = round(
                        res["reconnect_both_s"] + (res["reconnect_a_s"] or 0), 1)
                time.sleep(2)
                replies = pinger.stop()
                res["switchback_gap_s"], _ = outage(replies, t_back, time.time())
                res["relay_after_return"], _ = lab.relay_hub("a", "b")
    except Exception as e:  # report and continue with the next scenario
        res["error"] = repr(e)
    finally:
        lab.close()
    for k, v in list(res.items()):
        if isinstance(v, float) and not k.startswith("t_"):
            res[k] = round(v, 1)
    print(json.dumps(res), flush=True)
    with open("/tmp/multihub/results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    return res


SCENARIOS = {
    "i-default-cut": dict(layout="both24", fail="cut+kill", down_for=30),
    "i-fast-cut": dict(layout="both24", node_conf=FAST, fail="cut+kill", down_for=30),
    "i-fast-kill": dict(layout="both24", node_conf=FAST, fail="kill", down_for=30),
    "i-fast-cut-nohublink": dict(layout="both24", hub_connect=False, node_conf=FAST,
                                 fail="cut+kill", down_for=30),
    "i-fast-cut-maxto10": dict(layout="both24", node_conf=FAST + ["MaxTimeout = 10"],
                               fail="cut+kill", down_for=60),
    "i-fast-cut-down60": dict(layout="both24", node_conf=FAST, fail="cut+kill", down_for=60),
    "ii-only32": dict(layout="only32", node_conf=FAST),
    "h1only24-fast-cut": dict(layout="h1only24", node_conf=FAST, fail="cut+kill", down_for=30),
    "c-both24-hublink": dict(layout="both24", node_conf=FAST, blocks=[("a", "h2"), ("b", "h1")]),
    "c-relay-hublink": dict(layout="relay", node_conf=FAST, blocks=[("a", "h2"), ("b", "h1")]),
    "c-relay-nohublink": dict(layout="relay", hub_connect=False, node_conf=FAST,
                              blocks=[("a", "h2"), ("b", "h1")]),
    "i-fast-cut-maxto10-d40": dict(layout="both24", node_conf=FAST + ["MaxTimeout = 10"],
                                   fail="cut+kill", down_for=40),
    "iii-relay-fast-cut-maxto10-d40": dict(layout="relay", node_conf=FAST + ["MaxTimeout = 10"],
                                           fail="cut+kill", down_for=40),
    "i-st-fast-cut-maxto10-d40": dict(layout="both24", node_conf=FAST + ["MaxTimeout = 10"],
                                      fail="cut+kill", down_for=40, stagger=3.3),
    "iii-st-relay-fast-cut-maxto10-d40": dict(layout="relay", node_conf=FAST + ["MaxTimeout = 10"],
                                              fail="cut+kill", down_for=40, stagger=3.3),
    "i-st-default-cut-d40": dict(layout="both24", fail="cut+kill", down_for=40, stagger=3.3),
    "iii-relay-fast-cut": dict(layout="relay", node_conf=FAST, fail="cut+kill", down_for=30),
}

if __name__ == "__main__":
    for n in HUBS + NODES:
        ensure_key(n)
    names = sys.argv[1:] or list(SCENARIOS)
    for name in names:
        run(name, **SCENARIOS[name])
