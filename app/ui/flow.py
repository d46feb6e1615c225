"""A row of widgets that wraps onto more rows where its width does not hold them all."""

from __future__ import annotations

from PySide6.QtCore import QPoint, QRect, QSize, Qt
from PySide6.QtWidgets import QLayout, QLayoutItem


class FlowRow(QLayout):
    """Widgets side by side against the right edge, in as many rows as the width needs (a
    message's buttons at a large text size in a narrow chat: squeezed into one row, they cut
    their labels short, "Co…de"). Hidden widgets take no room. Made to sit inside another
    layout: it has no margins of its own."""

    def __init__(self, spacing: int = 6) -> None:
        super().__init__()
        self.items: list[QLayoutItem] = []
        self.setSpacing(spacing)

    # -- QLayout's interface --------------------------------------------------------------------
    def addItem(self, item: QLayoutItem) -> None:
        self.items.append(item)

    def count(self) -> int:
        return len(self.items)

    def itemAt(self, i: int) -> QLayoutItem | None:
        return self.items[i] if 0 <= i < len(self.items) else None

    def takeAt(self, i: int) -> QLayoutItem | None:
        return self.items.pop(i) if 0 <= i < len(self.items) else None

    def expandingDirections(self) -> Qt.Orientation:
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._place(QRect(0, 0, width, 0), move=False)

    def sizeHint(self) -> QSize:
        """All in one row."""
        shown = self._shown()
        width = sum(i.sizeHint().width() for i in shown) + self.spacing() * max(0, len(shown) - 1)
        return QSize(width, max((i.sizeHint().height() for i in shown), default=0))

    def minimumSize(self) -> QSize:
        """One a row: the widest."""
        shown = self._shown()
        return QSize(
            max((i.sizeHint().width() for i in shown), default=0),
            max((i.sizeHint().height() for i in shown), default=0),
        )

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._place(rect, move=True)

    # -- placing ----------------------------------------------------------------------------------
    def _shown(self) -> list[QLayoutItem]:
        return [i for i in self.items if not i.isEmpty()]

    def _place(self, rect: QRect, move: bool) -> int:
        """Lay the shown items out in ``rect``'s width, rows filled from the left and set against
        the right edge (placed where ``move``); the rows' height."""
        rows: list[list[QLayoutItem]] = [[]]
        used = 0
        for item in self._shown():
            w = item.sizeHint().width()
            if rows[-1] and used + self.spacing() + w > rect.width():
                rows.append([])
                used = 0
            used += (self.spacing() if rows[-1] else 0) + w
            rows[-1].append(item)
        y = rect.y()
        for row in filter(None, rows):
            sizes = [i.sizeHint() for i in row]
            width = sum(s.width() for s in sizes) + self.spacing() * (len(row) - 1)
            x = rect.x() + max(0, rect.width() - width)
            for item, size in zip(row, sizes, strict=True):
                if move:
                    item.setGeometry(QRect(QPoint(x, y), size))
                x += size.width() + self.spacing()
            y += max(s.height() for s in sizes) + self.spacing()
        return max(0, y - rect.y() - self.spacing())
