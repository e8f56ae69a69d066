"""Group commit: the writes of concurrent callers run together, one batch at a time.

A caller hands :meth:`GroupCommit.submit` one item and blocks until its batch ran. There is
no writer thread and no timer: the first caller to arrive while no batch is running leads
one (takes the lock, drains the queue, runs every queued item through ``run_batch``); the
callers arriving meanwhile queue, and when the batch ends the first of them leads the next
one with everything queued by then. One caller alone is a batch of one, at once; under load
the batches grow by themselves to what queued during the previous one. Each caller gets its
own item's outcome (its result, or its exception); an exception of ``run_batch`` itself
(the commit failed, the registry is unreachable) is the outcome of every item it had not
settled yet.
"""

import threading
from contextlib import AbstractContextManager
from typing import Callable, Generic, List, Optional, TypeVar

Item = TypeVar("Item")


class Pending(Generic[Item]):
    """One caller's item in the queue and its outcome, set once by the batch that runs it."""

    __slots__ = ("item", "result", "error", "settled", "_leads", "_wake")

    def __init__(self, item: Item) -> None:
        self.item = item
        self.result: object = None
        self.error: Optional[BaseException] = None
        self.settled = False
        self._leads = False
        self._wake = threading.Event()

    def succeed(self, result: object) -> None:
        self.result, self.settled = result, True

    def fail(self, error: BaseException) -> None:
        self.error, self.settled = error, True


class GroupCommit(Generic[Item]):
    """Batches of ``run_batch(pendings)``, each under ``hold()`` (the registry write lock), which
    must settle every pending it is given (``succeed``/``fail``). ``max_batch`` bounds one
    batch (and so how long one transaction holds the lock)."""

    def __init__(self, run_batch: Callable[[List[Pending[Item]]], None],
                 hold: Callable[[], AbstractContextManager], max_batch: int = 256) -> None:
        self._run_batch = run_batch
        self._hold = hold
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: List[Pending[Item]] = []
        self._leading = False  # a batch is being run (or its leader is about to run it)
        self.batches = 0  # batches run so far (for tests and measurements)

    def submit(self, item: Item) -> object:
        """Run ``item`` in a batch; its result, or raise its exception."""
        mine: Pending[Item] = Pending(item)
        with self._lock:
            self._queue.append(mine)
            if not self._leading:
                self._leading = mine._leads = True
        while not mine.settled:
            if mine._leads:
                self._lead()
            else:
                mine._wake.wait()
                mine._wake.clear()
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _lead(self) -> None:
        """Run one batch (whatever is queued once the lock is held), then hand the lead to the
        first caller still queued, or end leading."""
        batch: List[Pending[Item]] = []
        try:
            with self._hold():
                with self._lock:
                    batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self.batches += 1
                self._run_batch(batch)
        except BaseException as exc:  # noqa: B902 - handed to every caller it concerns
            for pending in batch:
                if not pending.settled:
                    pending.fail(exc)
            if not batch:  # the lock itself failed: the queue's first caller gets it
                with self._lock:
                    if self._queue:
                        batch = [self._queue.pop(0)]
                        batch[0].fail(exc)
        finally:
            for pending in batch:
                if not pending.settled:  # run_batch broke its promise: never hang a caller
                    pending.fail(RuntimeError("group commit left an item without an outcome"))
            with self._lock:
                successor = self._queue[0] if self._queue else None
                self._leading = successor is not None
                for pending in batch:
                    pending._leads = False
                if successor is not None:
                    successor._leads = True
            for pending in batch:
                pending._wake.set()
            if successor is not None:
                successor._wake.set()
