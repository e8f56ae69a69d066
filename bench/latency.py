#!/usr/bin/env python3
"""Enrolment latency: ``bootstrap.py`` start -> first ping of the hub over the VPN, against
a floor measured in the same run on the same topology: the walkthrough's steps scripted with
no HTTP (tinc.conf, ``tincd -K``, host files copied both ways, SIGHUP of the hub, tinc-up,
start tincd, ping until it answers). tinc is preinstalled, both use the same key size.
Median of N runs each (interleaved); prints the ratio. Needs root (network namespaces).

    .venv/bin/python bench/latency.py [--runs 5] [--key-size 2048]
"""

import argparse
import statistics
import sys
import time

from labkit import netlab

NET = "benchnet"
HUB = "benchhub"

NODE_PART1 = r"""
set -e
d=/etc/tinc/$NET; mkdir -p $d/hosts
printf 'Name = %s\nAddressFamily = ipv4\nInterface = %s\nConnectTo = %s\n' "$NAME" "$NET" "$HUB" > $d/tinc.conf
printf 'Subnet = %s/32\n\n' "$ADDR" > $d/hosts/$NAME
tincd -n $NET -K$BITS </dev/null >/dev/null 2>&1
printf '#!/bin/sh\nip addr add %s/%s dev $INTERFACE\nip link set $INTERFACE up\n' "$ADDR" "$PREFIX" > $d/tinc-up
chmod 755 $d/tinc-up
cat $d/hosts/$NAME
"""

NODE_PART2 = r"""
set -e
d=/etc/tinc/$NET
cat > $d/hosts/$HUB
tincd -n $NET
until ping -n -q -c 1 -W 1 $HUBVPN >/dev/null 2>&1; do sleep 0.1; done
"""

HUB_PART = r"""
set -e
cat > /etc/tinc/$NET/hosts/$NAME
kill -HUP $(cat /var/run/tinc.$NET.pid)
cat /etc/tinc/$NET/hosts/$HUB
"""

CLEAN_NODE = "kill $(cat /var/run/tinc.$NET.pid) 2>/dev/null; sleep 0.3; rm -rf /etc/tinc/$NET; true"


def floor_once(topo, hub: netlab.HubDriver, index: int, bits: int, hub_vpn: str) -> float:
    node = topo.nodes[0]
    name, addr = f"floor{index}", f"10.0.0.{200 + index}"
    env = {"NET": NET, "HUB": HUB, "NAME": name, "ADDR": addr, "PREFIX": "24", "BITS": bits,
           "HUBVPN": hub_vpn}
    started = time.monotonic()
    node_host = node.run(["sh", "-c", NODE_PART1], env=env, timeout=120).stdout
    hub_host = topo.hub.run(["sh", "-c", HUB_PART], env=env, input=node_host, timeout=30).stdout
    node.run(["sh", "-c", NODE_PART2], env=env, input=hub_host, timeout=120)
    took = time.monotonic() - started
    node.run(["sh", "-c", CLEAN_NODE], env=env, timeout=30)
    topo.hub.run(["rm", "-f", f"/etc/tinc/{NET}/hosts/{name}"])
    return took


def bootstrap_once(topo, hub: netlab.HubDriver, index: int, bits: int) -> float:
    node = topo.nodes[0]
    token = hub.token_create()["token"]
    started = time.monotonic()
    cp = node.run(netlab.bootstrap_argv(name=f"boot{index}", key_size=bits, timeout=60),
                  env={"TINC_BOOTSTRAP_TOKEN": token}, timeout=180, check=False)
    took = time.monotonic() - started
    if cp.returncode != 0:
        raise SystemExit(f"bootstrap failed ({cp.returncode}):\n{cp.stderr}")
    node.run(["python3", str(netlab.BOOTSTRAP_PY), "leave"], timeout=60)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--key-size", type=int, default=2048)
    args = parser.parse_args()
    topo = netlab.build_nat_topology(node_names=["node"], hub_name="hub")
    try:
        hub = netlab.HubDriver(topo.hub, NET, HUB)
        hub.init(key_size=args.key_size)
        hub.serve()
        hub_vpn = hub.vpn_address()
        floors, boots = [], []
        for i in range(args.runs):
            floors.append(floor_once(topo, hub, i, args.key_size, hub_vpn))
            boots.append(bootstrap_once(topo, hub, i, args.key_size))
            print(f"run {i + 1}: floor {floors[-1]:.2f} s, bootstrap.py {boots[-1]:.2f} s", flush=True)
        floor, boot = statistics.median(floors), statistics.median(boots)
        print(f"key size {args.key_size}; median of {args.runs}: floor (scripted walkthrough, no HTTP)"
              f" {floor:.2f} s, bootstrap.py start -> first ping {boot:.2f} s;"
              f" ratio {boot / floor:.2f}x (target <= 1.15x: {'met' if boot / floor <= 1.15 else 'MISSED'})")
    finally:
        topo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
