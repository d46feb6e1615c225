"""An executor whose threads never hold the app's exit: DaemonThreads."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future


class DaemonThreads(Executor):
    """Calls in daemon threads: each in its own, or with ``max_workers`` in that many, taking
    the calls in the order submitted. The app's blocking calls (the hub's requests, downloads)
    run here: qasync's default executor runs them in QThreads, and one still waiting on the
    network when the app quit made Qt abort the process at exit ("QThread: Destroyed while
    thread is still running"); Python's own pool makes the exit wait for them, a stalled
    download for its read timeout and retries (the window gone, the process not). What runs
    here may be left unfinished: the hub's caches are written by rename, and a download's
    .part files resume at the next start and are checked against their checksums."""

    def __init__(self, max_workers: int | None = None, name: str = "app-call") -> None:
        self._max, self._name = max_workers, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        self._cancel = False  # shutdown(cancel_futures=True): calls not started never start

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        call = (future, fn, args, kwargs)
        if self._max is None:
            threading.Thread(target=self._run, args=(call,), name=self._name, daemon=True).start()
            return future
        self._queue.put(call)
        with self._lock:
            if self._started < self._max:
                self._started += 1
                threading.Thread(target=self._worker, name=self._name, daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Never waits (what runs may be left); cancel_futures: calls not started never do."""
        self._cancel = self._cancel or cancel_futures

    def _worker(self) -> None:
        while True:
            self._run(self._queue.get())

    def _run(self, call) -> None:
        future, fn, args, kwargs = call
        if self._cancel:
            future.cancel()
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # the caller's await raises it
            future.set_exception(e)
