"""One app per user and data folder: a second launch asks the first to come to the front over
a local socket, then exits before it starts anything (no second window, no second engine)."""

from __future__ import annotations

import getpass
import hashlib
from collections.abc import Callable
from pathlib import Path

from PySide6.QtNetwork import QLocalServer, QLocalSocket

ACTIVATE = b"activate\n"


def server_name(data: Path) -> str:
    digest = hashlib.sha1(str(data.resolve()).encode()).hexdigest()[:12]
    return f"vptq-chat-{getpass.getuser()}-{digest}"


def ask_running_instance(name: str, timeout_ms: int = 500) -> bool:
    """True if an instance was listening and was asked to show itself."""
    sock = QLocalSocket()
    sock.connectToServer(name)
    if not sock.waitForConnected(timeout_ms):
        return False
    sock.write(ACTIVATE)
    sock.waitForBytesWritten(timeout_ms)
    sock.disconnectFromServer()
    return True


class InstanceServer:
    def __init__(self, name: str, on_activate: Callable[[], None]):
        self.server = QLocalServer()
        self.on_activate = on_activate
        if not self.server.listen(name):
            QLocalServer.removeServer(name)  # a socket file left by a crashed instance
            self.server.listen(name)
        self.server.newConnection.connect(self._accept)

    def _accept(self) -> None:
        while (conn := self.server.nextPendingConnection()) is not None:
            conn.readyRead.connect(lambda c=conn: self._read(c))

    def _read(self, conn: QLocalSocket) -> None:
        if bytes(conn.readAll().data()).startswith(ACTIVATE.strip()):
            self.on_activate()
        conn.disconnectFromServer()

    def close(self) -> None:
        self.server.close()
