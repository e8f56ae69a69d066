"""Enrolment pre-checks on a few worker threads, each handing its write straight to the group
commit: a request costs the event loop one wake-up (its answer is ready or written), not one
for the pre-check and another for the write."""

import asyncio
import logging
import queue
import threading
from typing import Callable, List, Optional, Tuple

from .enroll import Enroller, EnrolmentRequest
from .group_commit import Pending, wake_future

log = logging.getLogger("tinc_hub.serve")

class PrecheckPool:
    """``threads`` daemon threads (started on first use) running queued jobs in order."""

    def __init__(self, threads: int, name: str = "enrol-precheck") -> None:
        self.size = threads
        self.name = name
        self._jobs: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (it must not raise: its errors are its own to hand back)."""
        self._jobs.put(job)
        if len(self._threads) < self.size:
            with self._lock:
                while len(self._threads) < self.size:
                    thread = threading.Thread(target=self._work, daemon=True,
                                              name=f"{self.name}-{len(self._threads)}")
                    thread.start()
                    self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # a job's own bug: logged, the thread goes on with the next
                log.exception("%s: a job failed", self.name)


Checked = Tuple[EnrolmentRequest, Optional[Pending]]


async def checked_and_written(enroller: Enroller, pool: PrecheckPool,
                              authorization: Optional[str], body: bytes,
                              client: str) -> EnrolmentRequest:
    """``enroller.request`` run on ``pool``; its write (if any) queued to ``enroller.writes``
    by the same thread and resumed here once its batch settled it (the audit line and the
    answer are made in the caller's thread). Cancelling the wait does not take the request
    back: it is checked and written all the same."""
    loop = asyncio.get_running_loop()
    done: "asyncio.Future[Checked]" = loop.create_future()

    def settle(value: Optional[Checked], error: Optional[BaseException] = None) -> None:
        wake_future(loop, done, value, error)

    def check() -> None:
        try:
            enrolment = enroller.request(authorization, body, client)
        except BaseException as exc:  # noqa: B902 - the caller's error (a 500), not the pool's
            settle(None, exc)
            return
        if enrolment.write is None:
            settle((enrolment, None))
            return
        try:  # settled by the writer thread once the batch is done with it (after its COMMIT)
            enroller.writes.submit(enrolment.write, lambda pending: settle((enrolment, pending)))
        except BaseException as exc:  # noqa: B902 - no writer thread could start: a 500
            settle(None, exc)

    pool.run(check)
    enrolment, pending = await done
    if pending is not None:
        enrolment.resume(pending.result, pending.error)
    while enrolment.write is not None:  # a further write (none today): the plain way
        written, error = await enroller.writes.outcome_async(enrolment.write)
        enrolment.resume(written, error)
    return enrolment
