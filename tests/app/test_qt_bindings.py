"""The installed PySide6 against a binding bug that aborts the app: 6.12.0 drops a reference to
None on every call of a Qt method that returns nothing, so on Python < 3.12 (where None is not
immortal) None's count reaches zero after a few thousand label updates or status messages and
the interpreter aborts ("Fatal Python error: none_dealloc"), mid-session or at exit.
pyproject.toml keeps that version out; this fails if an install brings such a one back."""

import sys

import pytest
from PySide6.QtWidgets import QLabel, QStatusBar


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="None is immortal on Python 3.12+: nothing to lose"
)
def test_calls_returning_nothing_keep_none_alive(qapp):
    label, bar = QLabel(), QStatusBar()
    before = sys.getrefcount(None)
    for i in range(500):
        label.setText(f"token {i}")
        bar.showMessage(f"status {i}")
        bar.clearMessage()
    lost = before - sys.getrefcount(None)
    assert lost < 50, f"{lost} references to None lost in 1500 calls"  # 6.12.0: 1500
