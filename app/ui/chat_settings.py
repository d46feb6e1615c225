"""The chat settings above the conversation: the system prompt and the sampling of the open
chat (with no chat open, of the next new one), folded away until asked for."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QScrollArea,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..settings import clean_sampling

NAMES = {  # a sampling setting in words
    "temperature": "temperature",
    "top_p": "top-p",
    "top_k": "top-k",
    "min_p": "min-p",
    "repetition_penalty": "repetition penalty",
}
ROOM = 0.45  # the most of the chat pane's height the open settings take (then they scroll)


class ChatSettings(QWidget):
    """Per-chat system prompt and sampling, folded away until asked for."""

    changed = Signal()  # the user changed a setting (not load())
    reset_requested = Signal()  # "Defaults": the app's, with the model's recommended over them

    def __init__(self) -> None:
        super().__init__()
        self.toggle = QToolButton(text="Chat settings ▸", checkable=True)
        self.toggle.setAccessibleName("Show chat settings")
        self.toggle.setAutoRaise(True)
        self.body = QWidget()
        # In a short window the settings scroll within part of the pane: open, they had made
        # the window taller than the screen's room for it, and hidden the conversation.
        self.area = QScrollArea(visible=False, widgetResizable=True)
        self.area.setAccessibleName("Chat settings")
        self.area.setFrameShape(QFrame.Shape.NoFrame)
        self.area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.area.setWidget(self.body)
        self.room = 1 << 20  # px the open settings may take (set_room)
        self.toggle.toggled.connect(self._show)
        self.grid = QGridLayout(self.body)
        self.grid.setContentsMargins(4, 2, 4, 2)
        self.system = QLineEdit(placeholderText="e.g. You are a concise assistant.")
        self.system.setAccessibleName("System prompt")
        self.grid.addWidget(QLabel("System prompt", buddy=self.system), 0, 0)
        self.fields: dict[str, QDoubleSpinBox | QSpinBox] = {}
        self.rows: list[tuple[QLabel, QWidget]] = []
        for key, label, lo, hi, step, dec in [
            ("temperature", "Temperature (0 = greedy)", 0, 2, 0.05, 2),
            ("top_p", "Top-p", 0.01, 1, 0.01, 2),
            ("top_k", "Top-k (0 = off)", 0, 1000, 1, 0),
            ("min_p", "Min-p", 0, 0.99, 0.01, 2),
            ("repetition_penalty", "Repetition penalty", 0.5, 2, 0.05, 2),
            ("max_new_tokens", "Max new tokens", 1, 32768, 16, 0),
            ("seed", "Seed (-1 = random)", -1, 2**31 - 1, 1, 0),
        ]:
            box = QSpinBox() if dec == 0 else QDoubleSpinBox(decimals=dec)
            box.setRange(lo, hi)
            box.setSingleStep(step)
            box.setAccessibleName(label)
            box.setMaximumWidth(140)  # a number, not a line of text
            self.fields[key] = box
            self.rows.append((QLabel(label, buddy=box), box))
        self.loading = False  # load() is setting the fields: no change of the user's
        for box in self.fields.values():
            box.valueChanged.connect(self._changed)
        self.system.editingFinished.connect(self._changed)
        self.recommended = QLabel(wordWrap=True, objectName="emptyHint")
        self.recommended.setAccessibleName("The model's recommended settings")
        self.defaults = QToolButton(text="Defaults")
        self.defaults.setToolTip(
            "Set the sampling to the app's defaults, with the loaded model's recommended "
            "settings over them (what a new chat starts with)"
        )
        self.defaults.setAccessibleName("Reset the sampling to the defaults")
        self.defaults.clicked.connect(self.reset_requested.emit)
        self.columns = 0
        self._arrange(1)
        # beside the toggle, shown with the settings: no row of their own below them, which made
        # the settings scroll in a 900 x 560 window
        head = QHBoxLayout()
        head.addWidget(self.toggle, 0, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        head.addWidget(self.recommended, 1)
        head.addWidget(self.defaults, 0, Qt.AlignmentFlag.AlignTop)
        self.recommended.setVisible(False)
        self.defaults.setVisible(False)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(head)
        lay.addWidget(self.area)

    def _arrange(self, columns: int) -> None:
        """The settings in one column, or in two where the pane is wide enough: half as tall,
        so that a small window keeps some of the conversation in view with them open."""
        if columns == self.columns:
            return
        self.columns = columns
        self.grid.addWidget(self.system, 0, 1, 1, 2 * columns - 1)
        for i, (label, box) in enumerate(self.rows):
            row, col = 1 + i // columns, 2 * (i % columns)
            self.grid.addWidget(label, row, col)
            self.grid.addWidget(box, row, col + 1)
        for col in range(4):
            self.grid.setColumnStretch(col, 1 if col % 2 and col < 2 * columns else 0)
        self._fit_area()

    def set_room(self, pane_height: int) -> None:
        """The chat pane is ``pane_height`` px tall: the open settings take at most ROOM of it."""
        self.room = max(60, int(pane_height * ROOM))
        self._fit_area()

    def _fit_area(self) -> None:
        self.area.setFixedHeight(min(self.body.sizeHint().height(), self.room))

    def two_columns_width(self) -> int:
        """The pane's width from which the settings take two columns: each column's widest
        label and its fields side by side (a fixed 560 px cut the right column's fields off at
        a larger text size)."""
        labels = [label.sizeHint().width() for label, _ in self.rows]
        field = max(box.sizeHint().width() for _, box in self.rows)
        margins = self.grid.contentsMargins()
        spacing = max(self.grid.horizontalSpacing(), 6)
        scroll = self.area.verticalScrollBar().sizeHint().width()  # when they scroll
        return (
            max(labels[0::2]) + max(labels[1::2]) + 2 * field + 3 * spacing
            + margins.left() + margins.right() + scroll
        )  # fmt: skip

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._arrange(2 if self.width() >= self.two_columns_width() else 1)

    def _show(self, on: bool) -> None:
        for w in (self.area, self.recommended, self.defaults):
            w.setVisible(on)
        self.toggle.setText("Chat settings ▾" if on else "Chat settings ▸")

    def load(self, system: str, sampling: dict) -> None:
        """Show a chat's settings (``changed`` is not emitted: nothing was changed)."""
        self.loading = True
        try:
            self.system.setText(system)
            values = clean_sampling(sampling)  # a damaged file's values: the defaults
            for key, box in self.fields.items():
                value = values.get(key)
                value = -1 if value is None else value  # seed None: random
                box.setValue(min(max(value, box.minimum()), box.maximum()))  # Qt's int: 32 bits
        finally:
            self.loading = False

    def _changed(self, *_) -> None:
        if not self.loading:
            self.changed.emit()

    def set_recommended(self, recommended: dict | None) -> None:
        """What the loaded model recommends, in words, beside Defaults (None: no model)."""
        said = ", ".join(f"{NAMES[k]} {v:g}" for k, v in (recommended or {}).items() if k in NAMES)
        if recommended is None:
            said = ""
        elif said:
            said = f"The model recommends {said}."
        else:
            said = "The model recommends no settings."
        self.recommended.setText(said)

    def values(self) -> tuple[str, dict]:
        sampling = {k: b.value() for k, b in self.fields.items()}
        if sampling["seed"] < 0:
            sampling["seed"] = None
        return self.system.text(), sampling
