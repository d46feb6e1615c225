"""The first-run check as a window: one line per item, what to do about each failing one."""

from __future__ import annotations

import html
from collections.abc import Callable

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..first_run import Check, verdict
from .colours import colour

# each check's mark and its colour (app/ui/colours.py): passed, failed, not needed
MARKS = {True: ("✔", "ok"), False: ("✖", "does not fit"), None: ("–", "muted")}


class FirstRunDialog(QDialog):
    def __init__(self, parent: QWidget | None, run: Callable[[], list[Check]]):
        super().__init__(parent)
        self.setWindowTitle("What this computer can do")
        self.setMinimumWidth(480)
        self.run = run
        self.summary = QLabel(wordWrap=True)
        self.summary.setStyleSheet("font-weight: bold;")
        self.items = QVBoxLayout()
        again = QPushButton("Check again")
        again.setAccessibleName("Run the checks again")
        again.clicked.connect(self.refresh)
        close = QPushButton("Continue")
        close.setDefault(True)
        close.clicked.connect(self.accept)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(again)
        buttons.addWidget(close)
        # the lines scroll where the window is shorter than they are (they overlapped, clipped)
        lines = QWidget()
        inner = QVBoxLayout(lines)
        inner.setContentsMargins(0, 0, 0, 0)
        inner.addLayout(self.items)
        inner.addStretch(1)  # spare height below the lines, not between them
        scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        scroll.setAccessibleName("Check results")
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(lines)
        lay = QVBoxLayout(self)
        lay.addWidget(self.summary)
        lay.addWidget(scroll, 1)
        lay.addLayout(buttons)
        self.labels: list[QLabel] = []
        self.refresh()

    def refresh(self) -> None:
        for label in self.labels:  # out of the layout now: deleteLater waits for the loop
            self.items.removeWidget(label)
            label.hide()
            label.deleteLater()
        self.labels = []
        checks = self.run()
        self.summary.setText(verdict(checks))
        for c in checks:
            mark, tone = MARKS[c.ok]
            # escaped: a kernel build's reason quotes compiler lines ("#include <cuda.h>"),
            # which rich text took for tags and dropped
            text = (
                f"<span style='color: {colour(tone, self)};'>{mark}</span> "
                f"<b>{html.escape(c.name)}</b>: {html.escape(c.detail)}"
            )
            if c.fix:
                muted = colour("muted", self)
                text += f"<br><span style='color: {muted};'>{html.escape(c.fix)}</span>"
            label = QLabel(text, wordWrap=True, textFormat=Qt.TextFormat.RichText)
            state = {True: "ok", False: "problem", None: "not needed"}[c.ok]
            label.setAccessibleName(f"{c.name}: {state}")
            self.items.addWidget(label)
            self.labels.append(label)
        self.checks = checks
