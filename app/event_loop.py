"""The Qt + asyncio event loop the app runs on (qasync), with one fix.

qasync's run_until_complete ends by processing Qt's pending events once more after the asyncio
loop has stopped running. A task resumed in that pass that then waits on an asyncio.Queue
already bound to the loop (the chat's stream of engine events, app/controller.py) raises
"bound to a different event loop" and dies: the answer then never finishes. The app runs
run_until_complete twice (until the window closes, then the shutdown that saves a streaming
answer), the GUI tests many times; here that last pass runs with the loop marked running
(process_events), as do the passes pytest-qt makes around each GUI test.

And one change: asyncio.to_thread (the hub's calls) runs each call in a daemon thread of its
own (DaemonThreads), not in qasync's QThreads.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable

import qasync
from PySide6.QtCore import QEventLoop, QObject, QSocketNotifier
from PySide6.QtWidgets import QApplication

from .threads import DaemonThreads


class QtAsyncLoop(qasync.QEventLoop):
    def __init__(self, qapp: QApplication) -> None:
        super().__init__(qapp)
        self._qapp = qapp
        self.set_default_executor(DaemonThreads())

    def run_until_complete(self, future):
        future = asyncio.ensure_future(future, loop=self)

        def stop(_):
            self.stop()

        future.add_done_callback(stop)
        try:
            self.run_forever()
        finally:
            future.remove_done_callback(stop)
        self.process_events()  # the last pass, as a running loop
        if not future.done():
            raise RuntimeError("the event loop stopped before the future completed")
        return future.result()

    def process_events(self) -> None:
        """Qt's pending events once, with this loop marked as running, so that the asyncio
        callbacks Qt runs in the pass (qasync's timers and notifiers) find their loop. For a
        pass outside run_until_complete, as pytest-qt makes around each test
        (tests/app/conftest.py routes those here)."""
        asyncio.events._set_running_loop(self)
        try:
            self._qapp.eventDispatcher().processEvents(QEventLoop.ProcessEventsFlag.AllEvents)
        finally:
            asyncio.events._set_running_loop(None)


def close_on_signals(close: Callable[[], None], parent: QObject) -> None:
    """SIGTERM (a logout, `kill`), SIGINT (Ctrl+C in the terminal that started the app) and
    SIGHUP (that terminal closed) call ``close``, as Quit does: the app ended at once without
    its shutdown (settings unsaved, the model of the session before loaded at the next start).

    Python runs a signal's handler only when the interpreter runs, and Qt's loop sits in C++
    while nothing happens: the signal's byte on a wakeup socket wakes the loop (a notifier
    that lives as long as ``parent``), and the handler runs as its slot returns."""
    read, write = socket.socketpair()
    for sock in (read, write):
        sock.setblocking(False)
    signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    notifier = QSocketNotifier(read.fileno(), QSocketNotifier.Type.Read, parent)
    notifier.activated.connect(lambda *_: read.recv(64))
    notifier.sockets = (read, write)  # open as long as the notifier
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):  # Windows has no SIGHUP
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: close())
