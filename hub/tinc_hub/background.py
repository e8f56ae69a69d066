"""A serve-side daemon thread that loops until stopped (the registry follower, the reaper)."""

import threading


class BackgroundLoop:
    """Runs ``_run`` in a daemon thread named ``thread_name`` from ``start()``; ``_run`` waits on
    ``self._stop`` between rounds, so ``stop()`` ends it within one wait (joined for <= 10 s)."""

    thread_name = "background-loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        raise NotImplementedError
