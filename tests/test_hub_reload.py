"""Batched SIGHUP: many enrolments share one signal; each waits for a signal sent after it."""

import asyncio
import os
import signal
import subprocess
import time

from tinc_hub import reload as reload_mod
from tinc_hub.reload import ReloadBatcher


def test_burst_is_coalesced_and_every_waiter_is_covered() -> None:
    sent_at = []

    def sighup() -> bool:
        sent_at.append(time.monotonic())
        return True

    async def scenario() -> None:
        batcher = ReloadBatcher(sighup, min_interval=0.2)
        await batcher.reload()  # the first request goes out at once
        assert len(sent_at) == 1
        requested = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(batcher.reload() for _ in range(200))), 5)
        assert len(sent_at) == 2  # 200 requests, one signal
        assert sent_at[1] >= requested
        assert sent_at[1] - sent_at[0] >= 0.19
        # A request made while a batch is pending joins it; a later one gets its own signal.
        first = asyncio.ensure_future(batcher.reload())
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(batcher.reload())
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert len(sent_at) == 3
        await asyncio.wait_for(batcher.reload(), 5)
        assert len(sent_at) == 4

    asyncio.run(scenario())


def test_failing_sighup_does_not_hang() -> None:
    def sighup() -> bool:
        raise OSError("boom")

    async def scenario() -> None:
        batcher = ReloadBatcher(sighup, min_interval=0.01)
        await asyncio.wait_for(batcher.reload(), 5)

    asyncio.run(scenario())


def test_send_sighup_uses_pid_file(monkeypatch) -> None:
    # A child that records SIGHUP; pid_from_file is pointed at it (a real tincd is not needed).
    child = subprocess.Popen(["python3", "-c",
                              "import signal,sys,time\n"
                              "signal.signal(signal.SIGHUP, lambda *a: (print('HUP', flush=True), sys.exit(0)))\n"
                              "print('ready', flush=True)\n"
                              "time.sleep(30)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        monkeypatch.setattr(reload_mod.bootstrap, "pid_from_file", lambda net: child.pid)
        assert reload_mod.send_sighup("whatever", "/nonexistent")
        assert child.wait(timeout=10) == 0
        assert child.stdout.read().strip() == "HUP"
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()


def test_send_sighup_without_tincd_is_false() -> None:
    assert reload_mod.send_sighup(f"nonet{os.getpid()}", "/nonexistent") is False


def test_slow_sighup_never_overlaps_and_keeps_the_interval() -> None:
    sent_at = []

    def slow_sighup() -> bool:
        sent_at.append(time.monotonic())
        time.sleep(0.05)
        return True

    async def scenario() -> None:
        batcher = ReloadBatcher(slow_sighup, min_interval=0.1)

        async def client(delay: float) -> None:
            await asyncio.sleep(delay)
            await batcher.reload()

        await asyncio.wait_for(asyncio.gather(*(client(i * 0.01) for i in range(60))), 10)

    asyncio.run(scenario())
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert len(sent_at) <= 8 and all(gap >= 0.099 for gap in gaps), gaps


def test_settled_waits_for_pending_and_inflight_but_sends_nothing() -> None:
    sent_at = []

    def slow_sighup() -> bool:
        time.sleep(0.1)
        sent_at.append(time.monotonic())
        return True

    async def scenario() -> None:
        batcher = ReloadBatcher(slow_sighup, min_interval=0.2)
        await asyncio.wait_for(batcher.settled(), 1)  # nothing pending: returns at once
        assert sent_at == []
        first = asyncio.ensure_future(batcher.reload())
        await asyncio.sleep(0.02)  # the first SIGHUP is now being sent
        await asyncio.wait_for(batcher.settled(), 5)
        assert len(sent_at) == 1
        await first
        second = asyncio.ensure_future(batcher.reload())  # pending (interval not over yet)
        await asyncio.sleep(0)
        await asyncio.wait_for(batcher.settled(), 5)
        assert len(sent_at) == 2
        await second
        await asyncio.wait_for(batcher.settled(), 1)
        assert len(sent_at) == 2

    asyncio.run(scenario())
