"""SIGHUP pacing (issue 14): tincd's reload cost grows with hosts/ (TunnelServer parses every
host file) and tinc 1.0.36 leaks per reload, so enrolment bursts must not become SIGHUP
storms. Real processes throughout: a real tincd (DeviceType = dummy, on 127.0.0.1) for the
reloader, and in a netlab namespace a real hub (tincd + ``tinc-hub serve``) taking a burst of
300 enrolments over 20,000 host files, then a node with a real tun device that must connect
promptly. The full-size figures: bench/sighup_scale.py."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from bootstrap import bootstrap
from tinc_hub import reload as reload_mod
from tinc_hub.reload import BUSY_FRACTION, TincdReloader, pace_interval, wait_reloaded
from tinc_hub.hostfiles import render_node_host_file
from hub_fixtures import rsa_public_pem, wait_until
from labkit.loopback_hub import free_port

PREFILL = 20000  # host files the hub's tincd re-reads on every SIGHUP in these tests
BURST = 300


def test_pace_keeps_reloads_under_the_busy_fraction() -> None:
    for duration in (0.0005, 0.01, 0.03, 0.1, 0.5, 1.0, 1.4):
        interval = pace_interval(duration)
        assert interval >= 0.3 and duration / interval <= BUSY_FRACTION + 1e-9, (duration, interval)
    assert pace_interval(0.001) == 0.3  # an idle small hub reloads at today's pace
    assert pace_interval(None) == 0.3  # not measurable: the minimum
    assert pace_interval(60.0) == reload_mod.MAX_INTERVAL  # enrolments never wait longer


def test_wait_reloaded_sees_sleeping_busy_and_gone_processes() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert wait_until(lambda: reload_mod.tincd_state(sleeper.pid).state == "S", 5)
        assert wait_reloaded(sleeper.pid, 2.0) < 0.5
        assert wait_reloaded(busy.pid, 0.3) >= 0.3  # never idle: the timeout, no longer
        assert wait_reloaded(busy.pid, 0.3) < 2.0
    finally:
        for child in (sleeper, busy):
            child.kill()
            child.wait()
    assert wait_reloaded(sleeper.pid, 1.0) is None  # reaped: nothing to watch


@pytest.fixture
def loopback_tincd(tmp_path: Path) -> Iterator[dict]:
    """A real tincd as the hub runs it (TunnelServer), DeviceType = dummy, only on 127.0.0.1,
    with PREFILL host files; its pidfile in /var/run (root)."""
    if os.geteuid() != 0 or shutil.which("tincd") is None:
        pytest.skip("needs root (tincd's pidfile in /var/run) and tincd")
    net = "hupt%s" % uuid.uuid4().hex[:8]
    conf = tmp_path / net
    (conf / "hosts").mkdir(parents=True)
    port = free_port()
    (conf / "tinc.conf").write_text("Name = hub1\nAddressFamily = ipv4\nDeviceType = dummy\n"
                                    "BindToAddress = 127.0.0.1\nPort = %d\nTunnelServer = yes\n" % port)
    subprocess.run(["tincd", "-c", str(conf), "-K2048"], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=60)
    key = rsa_public_pem(1)
    for i in range(PREFILL):
        (conf / "hosts" / ("n%d" % i)).write_text(
            render_node_host_file("10.%d.%d.%d" % (64 + i // 65536, i // 256 % 256, i % 256), key))
    log = tmp_path / "tincd.log"
    subprocess.run(["tincd", "-n", net, "-c", str(conf), "--logfile=%s" % log], check=True,
                   capture_output=True, timeout=30)
    try:
        assert wait_until(lambda: bootstrap.pid_from_file(net) is not None, 10)
        pid = bootstrap.pid_from_file(net)
        assert wait_until(lambda: "Ready" in log.read_text(errors="replace"), 30)
        yield {"net": net, "dir": str(tmp_path), "pid": pid, "log": log}
    finally:
        pid = bootstrap.pid_from_file(net)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: bootstrap.pid_from_file(net) is None, 10)


def test_reloader_paces_sighups_by_the_measured_reload(loopback_tincd: dict) -> None:
    reloader = TincdReloader(loopback_tincd["net"], loopback_tincd["dir"])
    log = loopback_tincd["log"]
    hups = log.read_text().count("Got HUP signal")
    started = time.monotonic()
    assert reloader.reload()  # an idle hub: at once
    assert time.monotonic() - started < reloader.last_duration + 0.5
    assert reloader.last_duration is not None and reloader.last_duration > 0.005  # 20,000 files
    first_interval = reloader.interval
    assert first_interval == pytest.approx(pace_interval(reloader.last_duration))
    sent = [(reloader.last_sent, reloader.interval)]
    for _ in range(3):
        assert reloader.reload()
        sent.append((reloader.last_sent, reloader.interval))
    # each SIGHUP waited for the pace set by the reload before it
    assert all(b - a >= pace * 0.99 for (a, pace), (b, _) in zip(sent, sent[1:])), sent
    assert log.read_text().count("Got HUP signal") - hups == 4
    print("reload of %d host files: %.3f s; interval %.2f s" % (PREFILL, reloader.last_duration,
                                                               reloader.interval))


# ------------------------------------------------------------- the burst, through the real API

@pytest.mark.netlab
def test_enrolment_burst_is_not_a_sighup_storm() -> None:
    from labkit.hub_tincd import (HubTincdLab, derived_public_keys, enrol_burst_in, hup_count,
                                  new_private_key, rss_kib, wait_idle, write_host_files)
    from labkit import netlab

    if not netlab.TINC_HUB.exists():
        pytest.fail("%s missing: run tests/setup-env" % netlab.TINC_HUB)
    keys = derived_public_keys(BURST)
    late_key = new_private_key()
    with HubTincdLab("hup%d" % (os.getpid() % 100000), "10.63.0.0/16") as lab:
        # 20,000 host files unknown to the registry (the follower keeps them): reload cost
        write_host_files(lab.hosts_dir, lab.free_addresses(PREFILL, skip=4000), keys[0], prefix="x")
        lab.restart_tincd()
        lab.hub.serve()
        token = lab.hub.token_create("--uses", str(BURST + 1))["token"]
        wait_idle(lab.pid, 30)
        os.kill(lab.pid, signal.SIGHUP)  # one reload, timed here: what the hub paces by
        reload_time = wait_idle(lab.pid, 30)
        time.sleep(reload_time / BUSY_FRACTION)  # the hub's next SIGHUP would wait this long too
        hups, rss = hup_count(lab.log_text()), rss_kib(lab.pid)
        started = time.monotonic()
        replies = enrol_burst_in(lab.topo.hub, token, ["b%d" % i for i in range(BURST)], keys)
        took = time.monotonic() - started
        assert [r["status"] for r in replies] == [200] * BURST, [r for r in replies if r["status"] != 200][:3]
        wait_idle(lab.pid, 30)
        storm = hup_count(lab.log_text()) - hups
        grown = rss_kib(lab.pid) - rss
        print("burst of %d over %d host files (one reload: %.3f s): %.1f s, %d SIGHUPs, tincd RSS +%d KiB"
              % (BURST, PREFILL, reload_time, took, storm, grown))
        # Paced by cost (SIGHUPs reload_time / BUSY_FRACTION apart; half that for the noise of a
        # loaded machine), the burst shares a few SIGHUPs; at the old fixed 0.3 s it got one per
        # 0.3 s + reload_time (measured here: 7 in 7.6 s where this allows 6).
        assert 1 <= storm <= 2 + took / (0.5 * reload_time / BUSY_FRACTION), (storm, took, reload_time)
        # tinc 1.0.36 leaks 64 bytes per known Subnet per reload: bounded by the count above
        assert grown <= (storm + 1) * (PREFILL + BURST) * 100 / 1024 + 4096, grown

        # the node enrolled after the burst connects (real tun) and pings the hub promptly
        answered = lab.enrol_and_start_probe(token, late_key)
        joined = time.monotonic()
        assert wait_until(lambda: lab.probe_pings_hub(0.5), 20), "late node never pinged the hub"
        pinged = time.monotonic() - joined
        print("late node: answer in %.2f s, pings the hub %.2f s after its tincd started"
              % (answered, pinged))
        assert answered <= reload_mod.MAX_INTERVAL + 5 and pinged <= 10
        assert "Closing connection with %s" % lab.probe_name not in lab.log_text()  # never dropped
