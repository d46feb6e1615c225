"""Window sizes that fit the screen."""

from __future__ import annotations

from PySide6.QtCore import QPoint, QSize
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QWidget


def fit_to_screen(window: QWidget, width: int, height: int) -> None:
    """width x height, or the screen's free area where that is smaller (a frame and title bar
    come on top: 95% of its width, 90% of its height), centred on it."""
    screen = window.screen() or QGuiApplication.primaryScreen()
    if screen is None:
        window.resize(width, height)
        return
    free = screen.availableGeometry()  # without the task bar
    size = QSize(min(width, free.width() * 95 // 100), min(height, free.height() * 90 // 100))
    window.resize(size)
    window.move(free.center() - QPoint(size.width() // 2, size.height() // 2))
