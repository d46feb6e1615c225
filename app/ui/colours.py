"""The colours of the app's own text beyond the palette, per theme. Each is readable on every
background it is drawn on in its theme, the window's and the message bubbles' (WCAG contrast of
4.5 or more; tests/app/test_gui.py checks every pair): the first ones, one set for both themes,
were 2.6:1 (the context warning's orange on the light window) to 3.4:1 (grey notes)."""

from __future__ import annotations

from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QWidget

LIGHT = {
    "fits": "#2a7230",
    "tight": "#985c00",
    "does not fit": "#c62828",
    "ok": "#2a7230",
    "warning": "#985c00",
    "muted": "#5f6368",  # message stats, hints, the first-run check's fixes
    "user": "#e8f0fe",  # message bubbles
    "assistant": "#ffffff",
}
DARK = {
    "fits": "#81c995",
    "tight": "#fdd663",
    "does not fit": "#f28b82",
    "ok": "#81c995",
    "warning": "#fdd663",
    "muted": "#a9aeb4",
    "user": "#2b3a55",
    "assistant": "#26282b",
}


def colours(dark: bool) -> dict[str, str]:
    return DARK if dark else LIGHT


def is_dark(widget: QWidget) -> bool:
    """Whether ``widget`` is drawn in the dark theme (its window colour)."""
    return widget.palette().color(QPalette.ColorRole.Window).lightness() < 128


def colour(name: str, widget: QWidget) -> str:
    """The colour ``name`` for the theme ``widget`` is drawn in."""
    return colours(is_dark(widget))[name]
