"""tinc_hub.prechecks: pre-checks on the pool's threads hand their writes straight to the
group commit; each request gets its own answer and audit line, errors reach the caller."""

import asyncio
import json
import logging
import threading
from pathlib import Path

import pytest

from hub_fixtures import init_hub
from labkit.loopback_hub import public_keys
from tinc_hub.prechecks import PrecheckPool, checked_and_written


def body(name: str, key: str) -> bytes:
    return json.dumps({"name": name, "public_key": key}).encode()


def test_pool_writes_share_a_batch_and_each_gets_its_own_answer(tmp_path: Path, caplog) -> None:
    env = init_hub(tmp_path)
    keys = public_keys(3)
    token = env.token(uses=3).token
    enroller = env.enroller
    pool = PrecheckPool(2)
    plan = [("p0", keys[0]), ("p1", keys[1]), ("p0", keys[0]),  # a replay of a batch-mate
            ("p2", "not a key"), ("p3", keys[2])]
    caplog.set_level(logging.INFO, logger="tinc_hub.audit")

    async def all_of_them():
        return await asyncio.gather(*(checked_and_written(enroller, pool, "Bearer " + token,
                                                          body(name, key), "192.0.2.7")
                                      for name, key in plan))

    batches = enroller.writes.batches
    with env.registry.exclusive():  # the writer waits: every write queues for one batch
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(all_of_them())
            # the bad key is refused by the pre-check alone; the four writes wait for the lock
            loop.run_until_complete(asyncio.wait_for(_until(lambda: enroller.writes.waiting() == 4), 30))
            assert not task.done()
        except BaseException:
            loop.close()
            raise
    try:
        requests = loop.run_until_complete(asyncio.wait_for(task, 60))
    finally:
        loop.close()
    assert enroller.writes.batches == batches + 1
    outcomes = [r.outcome for r in requests]
    assert [o.status for o in outcomes] == [200, 200, 200, 400, 200], [o.body for o in outcomes]
    assert [o.body.get("name") for o in outcomes] == ["p0", "p1", "p0", None, "p3"]
    assert outcomes[0].body["address"] == outcomes[2].body["address"]
    assert len({outcomes[i].body["address"] for i in (0, 1, 4)}) == 3
    assert set(outcomes[4].body["names"]) >= {"p0", "p1", "p3"}  # the batch's names
    assert [o.reload_needed for o in outcomes] == [True, True, False, False, True]
    audit = [r.getMessage() for r in caplog.records if r.name == "tinc_hub.audit"]
    assert sum("status=200" in line for line in audit) == 4 and len(audit) == 5
    for name in ("p0", "p1", "p3"):
        assert (env.config.hosts_dir / name).is_file()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_a_fault_in_the_precheck_is_the_callers_error_and_the_pool_goes_on(tmp_path: Path) -> None:
    env = init_hub(tmp_path)
    enroller = env.enroller
    pool = PrecheckPool(1)
    real_request = enroller.request
    calls = []

    def broken(*args):
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real_request(*args)

    enroller.request = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="disk on fire"):
        asyncio.run(checked_and_written(enroller, pool, None, b"{}", "192.0.2.8"))
    second = asyncio.run(checked_and_written(enroller, pool, None, b"{}", "192.0.2.8"))
    assert second.outcome is not None and second.outcome.status == 401  # no token: answered
    assert calls == ["enrol-precheck-0", "enrol-precheck-0"]


def test_group_commit_submit_calls_back_after_the_outcome() -> None:
    from tinc_hub.group_commit import GroupCommit

    lock = threading.Lock()

    def run_batch(pendings) -> None:
        for pending in pendings:
            if pending.item == "bad":
                pending.fail(ValueError("refused"))
            else:
                pending.succeed(pending.item.upper())

    group = GroupCommit(run_batch, lambda: lock)
    seen = []
    done = threading.Event()

    def settled(pending) -> None:
        seen.append((pending.item, pending.result, type(pending.error).__name__, pending.settled))
        if len(seen) == 2:
            done.set()

    with lock:
        group.submit("ok", settled)
        group.submit("bad", settled)
        assert group.waiting() == 2 and not seen  # nothing before the batch ran
    assert done.wait(30)
    assert sorted(seen) == [("bad", None, "ValueError", True), ("ok", "OK", "NoneType", True)]


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the wake-ups other threads send it."""

    def __init__(self) -> None:
        super().__init__()
        self.wakes_from_threads = 0

    def call_soon_threadsafe(self, callback, *args, context=None):
        if threading.current_thread() is not threading.main_thread():
            self.wakes_from_threads += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


def test_a_batch_wakes_the_event_loop_once_and_settles_each_future_in_order() -> None:
    from tinc_hub.group_commit import GroupCommit, wake_future, wakes_together

    lock = threading.Lock()
    order = []

    def run_batch(pendings) -> None:
        for pending in pendings:
            pending.succeed(pending.item * 2)

    group = GroupCommit(run_batch, lambda: lock)
    loop = CountingLoop()
    try:
        async def all_of_them():
            async def one(item):
                result = await group.outcome_async(item)
                order.append(item)
                return result
            tasks = [asyncio.ensure_future(one(i)) for i in range(6)]
            await _until(lambda: group.waiting() == 6)
            lock.release()  # the writer takes all six in one batch
            return await asyncio.gather(*tasks)

        lock.acquire()
        results = loop.run_until_complete(asyncio.wait_for(all_of_them(), 30))
        assert results == [(2 * i, None) for i in range(6)]
        assert order == list(range(6))
        assert group.batches == 1 and loop.wakes_from_threads == 1

        # nested: the outer block sends; a closed loop is no error (serve stopping)
        futures = [loop.create_future() for _ in range(3)]
        def from_a_thread() -> None:
            with wakes_together():
                wake_future(loop, futures[0], "a")
                with wakes_together():
                    wake_future(loop, futures[1], None, ValueError("b"))
                wake_future(loop, futures[2], "c")
        thread = threading.Thread(target=from_a_thread)
        thread.start()
        thread.join()
        assert loop.wakes_from_threads == 2
        loop.run_until_complete(asyncio.wait_for(asyncio.wait(futures), 30))
        assert futures[0].result() == "a" and futures[2].result() == "c"
        assert isinstance(futures[1].exception(), ValueError)
    finally:
        loop.close()
    errors = []

    def wake_the_closed_loop() -> None:
        try:
            with wakes_together():
                wake_future(loop, loop.create_future(), 1)
            wake_future(loop, loop.create_future(), 2)
        except BaseException as exc:  # noqa: B902 - what the test looks for
            errors.append(exc)
    thread = threading.Thread(target=wake_the_closed_loop)
    thread.start()
    thread.join()
    assert errors == []
