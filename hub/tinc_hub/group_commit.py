"""Group commit: the writes of concurrent callers run together, one batch at a time.

Callers hand :class:`GroupCommit` one item each (``outcome`` blocks a thread;
``outcome_async`` waits in the event loop without holding a thread; ``submit`` calls back). One writer thread,
started when an item arrives and gone when the queue is empty, runs batches: it takes the
lock (the registry write lock), drains the queue (at most ``max_batch`` items) and runs them
all through ``run_batch``; the items queued meanwhile form the next batch. There is no timer:
one item alone is a batch of one at once, and under load the batches grow by themselves to
what queued during the previous one. Each caller gets its own item's outcome (its result or
its exception); an exception of ``run_batch`` itself (the COMMIT failed, the registry is
unreachable) is the outcome of every item of the batch it had not settled.
"""

import asyncio
import threading
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

Item = TypeVar("Item")


_held_wakes = threading.local()  # .by_loop: the wakes of an open wakes_together(), per loop


def wake_future(loop: asyncio.AbstractEventLoop, future: "asyncio.Future[Any]", value: object,
                error: Optional[BaseException] = None) -> None:
    """From any thread: ``future``'s result is ``value``, or its exception ``error`` when one
    is given (unless it is done: cancelled). Inside :func:`wakes_together`, sent with the
    others at its end."""
    def settle() -> None:
        if future.done():  # cancelled: nobody waits
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    held: Optional[Dict[asyncio.AbstractEventLoop, List[Callable[[], None]]]] = \
        getattr(_held_wakes, "by_loop", None)
    if held is not None:
        held.setdefault(loop, []).append(settle)
        return
    _send_to_loop(loop, settle)


@contextmanager
def wakes_together() -> Iterator[None]:
    """The wake_future calls this thread makes inside reach each event loop as one callback
    at the end, in order: one wake-up of the loop (a write to its self-pipe, which lets go of
    the GIL and waits to take it back) for a whole batch instead of one per future."""
    if getattr(_held_wakes, "by_loop", None) is not None:  # nested: the outer one sends
        yield
        return
    held: Dict[asyncio.AbstractEventLoop, List[Callable[[], None]]] = {}
    _held_wakes.by_loop = held
    try:
        yield
    finally:
        _held_wakes.by_loop = None
        for loop, settles in held.items():
            _send_to_loop(loop, lambda settles=settles: [settle() for settle in settles])


def _send_to_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed (serve stopping): nobody waits any more
        pass


class Pending(Generic[Item]):
    """One caller's item and its outcome, settled once by the batch that runs it."""

    __slots__ = ("item", "result", "error", "settled", "_wake")

    def __init__(self, item: Item, wake: Callable[[], None]) -> None:
        self.item = item
        self.result: object = None
        self.error: Optional[BaseException] = None
        self.settled = False
        self._wake = wake

    def succeed(self, result: object) -> None:
        if not self.settled:
            self.result, self.settled = result, True

    def fail(self, error: BaseException) -> None:
        if not self.settled:
            self.error, self.settled = error, True


class GroupCommit(Generic[Item]):
    """Batches of ``run_batch(pendings)``, each under ``hold()``; ``run_batch`` settles every
    pending it is given (``succeed``/``fail``). ``max_batch`` bounds one batch (and so how
    long one transaction holds the lock)."""

    def __init__(self, run_batch: Callable[[List[Pending[Item]]], None],
                 hold: Callable[[], AbstractContextManager], max_batch: int = 500,
                 name: str = "group-commit") -> None:
        self._run_batch = run_batch
        self._hold = hold
        self.max_batch = max_batch
        self.name = name
        self._lock = threading.Lock()
        self._queue: List[Pending[Item]] = []
        self._writer: Optional[threading.Thread] = None
        self.batches = 0  # batches run so far
        self.items = 0  # items run so far

    def waiting(self) -> int:
        """Items queued and not yet taken by a batch."""
        with self._lock:
            return len(self._queue)

    def outcome(self, item: Item) -> Tuple[object, Optional[BaseException]]:
        """Run ``item`` in a batch, blocking this thread: (result, None) or (None, error)."""
        done = threading.Event()
        pending: Pending[Item] = Pending(item, done.set)
        self._enqueue(pending)
        done.wait()
        return pending.result, pending.error

    async def outcome_async(self, item: Item) -> Tuple[object, Optional[BaseException]]:
        """``outcome`` for a coroutine: waits in the event loop, no thread held. Cancelling
        the wait does not take the item back (it is written all the same)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pending = self.submit(item, lambda _: wake_future(loop, done, None))
        await done
        return pending.result, pending.error

    def submit(self, item: Item, settled: Callable[[Pending[Item]], None]) -> Pending[Item]:
        """Queue ``item`` without waiting: ``settled(pending)`` is called (in the writer thread,
        once the batch is done with it) with its ``result``/``error`` set."""
        pending: Pending[Item] = Pending(item, lambda: settled(pending))
        self._enqueue(pending)
        return pending

    def _enqueue(self, pending: Pending[Item]) -> None:
        with self._lock:
            self._queue.append(pending)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_all, name=self.name, daemon=True)
                self._writer.start()

    def _write_all(self) -> None:
        """The writer thread: batches until the queue is empty."""
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._writer = None
                        return
                self._write_one_batch()
        finally:
            with self._lock:  # never leave a dead writer registered: the next item starts one
                if self._writer is threading.current_thread():
                    self._writer = None
                    if self._queue:
                        self._writer = threading.Thread(target=self._write_all, name=self.name,
                                                        daemon=True)
                        self._writer.start()

    def _write_one_batch(self) -> None:
        batch: List[Pending[Item]] = []
        try:
            with self._hold():
                with self._lock:
                    batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self.batches += 1
                self.items += len(batch)
                self._run_batch(batch)
        except BaseException as exc:  # noqa: B902 - the outcome of every item it concerns
            if not batch:  # the lock itself failed: everyone waiting gets the error
                with self._lock:
                    batch, self._queue = self._queue, []
            for pending in batch:
                pending.fail(exc)
        finally:
            with wakes_together():
                for pending in batch:
                    pending.fail(RuntimeError("group commit left an item without an outcome"))
                    pending._wake()
