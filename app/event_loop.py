"""The Qt + asyncio event loop the app runs on (qasync), with one fix.

qasync's run_until_complete ends by processing Qt's pending events once more after the asyncio
loop has stopped running. A task resumed in that pass that then waits on an asyncio.Queue
already bound to the loop (the chat's stream of engine events, app/controller.py) raises
"bound to a different event loop" and dies: the answer then never finishes. The app runs
run_until_complete twice (until the window closes, then the shutdown that saves a streaming
answer), the GUI tests many times; here that last pass runs with the loop marked running.

And one change: asyncio.to_thread (the hub's calls) runs each call in a daemon thread of its
own (DaemonThreads), not in qasync's QThreads.
"""

from __future__ import annotations

import asyncio

import qasync
from PySide6.QtCore import QEventLoop
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
        asyncio.events._set_running_loop(self)  # the last pass, as a running loop
        try:
            self._qapp.eventDispatcher().processEvents(QEventLoop.ProcessEventsFlag.AllEvents)
        finally:
            asyncio.events._set_running_loop(None)
        if not future.done():
            raise RuntimeError("the event loop stopped before the future completed")
        return future.result()
