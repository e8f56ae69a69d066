#!/usr/bin/env python3
"""One TunnelServer hub (today's set-up), nodes a and b (real tincd), hostile enrolled node c
(evil.py). Does a forged ANS_KEY from c redirect the hub's traffic for b to c?"""
import json, subprocess, time
import lab
lab.HUBS = ("h1",)
lab.NODES = ("a", "b", "c")
lab.UNDER["c"] = "192.0.2.13"
lab.VPN["c"] = "10.0.0.13"
for n in ("h1", "a", "b", "c"):
    lab.ensure_key(n)
L = lab.Lab("evil")
res = {}
try:
    L.build()
    hosts = {"h1": ["10.0.0.1/32", "10.0.0.0/24"], "a": ["10.0.0.11/32"], "b": ["10.0.0.12/32"],
             "c": ["10.0.0.13/32"]}
    L.configure("h1", ["TunnelServer = yes"], hosts)
    for n in ("a", "b"):
        L.configure(n, ["ConnectTo = h1"], {"h1": hosts["h1"], n: hosts[n]})
    for n in ("h1", "a", "b"):
        L.start(n)
    res["a_b_before"] = L.wait_ping("a", "b", 20)
    pub = L.dir / "hubpub"
    pub.write_text(lab.pubkey("h1"))
    pinger = lab.Pinger(L, "a", "b")
    cp = subprocess.run(["ip", "netns", "exec", L.ns["c"], "/work/main/.venv/bin/python",
                         "/tmp/multihub/evil.py", str(lab.KEYS / "c"), str(pub), "192.0.2.1",
                         "192.0.2.13", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=60)
    replies = pinger.stop()
    res["evil_output"] = cp.stdout.strip().splitlines()[-3:]
    res["a_b_replies_during_attack_10s"] = len(replies)
    res["a_b_after"] = L.wait_ping("a", "b", 20)
finally:
    L.close()
print(json.dumps(res, indent=1))
with open("/tmp/multihub/results.jsonl", "a") as f:
    f.write(json.dumps(dict(res, tag="evil-ans-key")) + "\n")
