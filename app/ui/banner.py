"""The error line at the top of a window: the message, selectable, and a button that hides it."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QToolButton

LINK = "#a50e0e"  # the banner's own text colour (its background is light in both themes)


class ErrorBanner(QFrame):
    """Hidden until ``show_message``; the user closes it with ✕ (before, an error stayed on
    screen until the next message was sent, or for as long as the Models window was open)."""

    def __init__(self) -> None:
        super().__init__(objectName="errorBanner", visible=False)
        self.label = QLabel(wordWrap=True)
        self.label.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse
            | Qt.TextInteractionFlag.LinksAccessibleByMouse
        )
        self.label.linkActivated.connect(lambda url: QDesktopServices.openUrl(QUrl(url)))
        self.plain = ""
        self.label.setAccessibleName("Error")
        self.close_button = QToolButton(text="✕", autoRaise=True)
        self.close_button.setToolTip("Dismiss this message")
        self.close_button.setAccessibleName("Dismiss this message")
        self.close_button.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 6, 4, 6)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.close_button, 0, Qt.AlignmentFlag.AlignTop)

    def show_message(self, text: str, logs: Path | None = None) -> None:
        """``text`` as written (no markup); ``logs``: a folder, shown after it as a link that
        opens it in the file manager."""
        self.plain = text + (f"\nLogs: {logs}" if logs else "")
        shown = html.escape(text, quote=False).replace("\n", "<br>")
        if logs:
            url = QUrl.fromLocalFile(str(logs)).toString()
            folder = html.escape(str(logs))
            shown += f"<br>Logs: <a href='{html.escape(url)}' style='color: {LINK}'>{folder}</a>"
        self.label.setText(shown)
        self.show()

    def text(self) -> str:
        """The message as plain text (with its "Logs: folder" line)."""
        return self.plain
