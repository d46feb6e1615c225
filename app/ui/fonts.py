"""The app's text size (View > Larger text, Smaller text, Normal text size), as a percentage of
the system's font in steps like a web browser's zoom."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QObject, Qt, Signal
from PySide6.QtGui import QFont, QFontDatabase
from PySide6.QtWidgets import QApplication, QWidget

STEPS = (70, 80, 90, 100, 110, 125, 150, 175, 200)  # percent of the system's font size
NORMAL = 100  # the system's own size


def next_size(percent: int, direction: int) -> int:
    """The step after ``percent`` towards larger (``direction`` > 0) or smaller text, at most
    the last step; a size between steps (from a hand-edited file) goes to the next step."""
    if direction > 0:
        return next((s for s in STEPS if s > percent), STEPS[-1])
    return next((s for s in reversed(STEPS) if s < percent), STEPS[0])


def clamp(percent: int) -> int:
    return min(max(percent, STEPS[0]), STEPS[-1])


def scaled_font(percent: int) -> QFont:
    """The system's font at ``percent`` of its size: the application's font, which every widget
    without a font of its own follows."""
    font = QFontDatabase.systemFont(QFontDatabase.SystemFont.GeneralFont)
    if font.pointSizeF() > 0:
        font.setPointSizeF(font.pointSizeF() * percent / 100)
    else:  # a platform that gives its font in pixels
        font.setPixelSize(max(1, round(font.pixelSize() * percent / 100)))
    return font


def set_text_size(percent: int) -> None:
    """Every window's text at ``percent`` of the system's size. Qt passes a new application font
    on only to widgets that no style sheet styles: with the app's style sheet set (apply_theme)
    the rest kept their size until it was set again, which polishes every widget anew."""
    app = QApplication.instance()
    app.setFont(scaled_font(percent))
    if app.styleSheet():
        app.setStyleSheet(app.styleSheet())


class CtrlWheel(QObject):
    """Ctrl+wheel over any of the app's windows steps the text size, as in a web browser: a
    step a notch, a touchpad's small turns adding up to one. An event filter of the whole
    application: over the chat list, the panel or the Models window Ctrl+wheel scrolled, and
    over a text box or a message it zoomed that one's text alone (Qt's own)."""

    step = Signal(int)  # a step larger (1) or smaller (-1)

    def __init__(self, parent: QObject) -> None:
        super().__init__(parent)
        self.turned = 0  # towards the next step (120: a notch)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if (
            event.type() != QEvent.Type.Wheel
            or not event.modifiers() & Qt.KeyboardModifier.ControlModifier
            or not isinstance(watched, QWidget)  # (its window's copy of the event comes first)
        ):
            return False
        self.turned += event.angleDelta().y()
        if abs(self.turned) >= 120:
            self.step.emit(1 if self.turned > 0 else -1)
            self.turned = 0
        return True
