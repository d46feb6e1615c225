"""The live panel: model and kernel state, each GPU's memory/utilisation/temperature, and
throughput (the answer being written and a plot of recent answers)."""

from __future__ import annotations

from PySide6.QtCore import QPointF, Qt
from PySide6.QtGui import QPainter, QPen, QPolygonF
from PySide6.QtWidgets import (
    QFrame,
    QLabel,
    QProgressBar,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from engine.memory import gib as size

from ..gpu import GpuInfo, cuda_index
from ..hub import model_label
from .chat_view import prompt_part

GiB = 1 << 30


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


class Sparkline(QWidget):
    """Tokens/s of recent answers, newest on the right."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []
        self.setMinimumHeight(80)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setAccessibleName("Tokens per second of recent answers")

    def add(self, value: float, keep: int = 30) -> None:
        self.values = [*self.values, value][-keep:]
        self.update()

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        r = self.rect().adjusted(4, 4, -4, -4)
        p.setPen(QPen(self.palette().mid().color(), 1))
        p.drawRect(r)
        if len(self.values) < 1:
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, "no answers yet")
            return
        # the line below the scale's label, so that a steady rate does not run through it
        plot = r.adjusted(3, p.fontMetrics().height() + 4, -3, -3)
        top = max(self.values) or 1.0
        n = max(len(self.values) - 1, 1)
        pts = [
            QPointF(
                plot.right() - plot.width() * (len(self.values) - 1 - i) / n,
                plot.bottom() - plot.height() * v / top,
            )
            for i, v in enumerate(self.values)  # newest on the right, the first answer too
        ]
        p.setPen(QPen(self.palette().highlight().color(), 2))
        p.drawPolyline(QPolygonF(pts))
        p.setBrush(self.palette().highlight())
        p.drawEllipse(pts[-1], 3, 3)
        p.setPen(self.palette().text().color())
        p.drawText(r.adjusted(4, 2, 0, 0), Qt.AlignmentFlag.AlignLeft, f"max {top:.1f} tok/s")


class GpuCard(QFrame):
    def __init__(self) -> None:
        super().__init__()
        self.setFrameShape(QFrame.Shape.StyledPanel)
        # the panel never scrolls sideways: what cannot wrap must shrink, or a GPU's long name
        # ("GPU 0 (cuda:1): NVIDIA GeForce RTX 4090") or the bar's text widened the panel's
        # content past its width and cut every line at the window's edge
        self.title = QLabel()
        self.title.setStyleSheet("font-weight: bold;")
        self.title.setWordWrap(True)
        self.bar = QProgressBar()
        self.bar.setMinimumWidth(60)  # its text clipped, not the panel
        self.bar.setAccessibleName("GPU memory used")
        self.detail = QLabel()
        self.detail.setWordWrap(True)
        lay = QVBoxLayout(self)
        for w in (self.title, self.bar, self.detail):
            lay.addWidget(w)

    def show_info(self, g: GpuInfo, cuda_index: int | None = None) -> None:
        cuda = f" (cuda:{cuda_index})" if cuda_index is not None else ""
        self.title.setText(f"GPU {g.index}{cuda}: {g.name}")
        self.bar.setRange(0, max(g.total // (1 << 20), 1))
        self.bar.setValue(g.used // (1 << 20))
        # short enough for the panel at its narrowest; the words are in the lines below
        self.bar.setFormat(f"{g.used / GiB:.1f} / {gib(g.total)}")
        lines = [f"Used: {gib(g.used)} of {gib(g.total)}", f"Free: {gib(g.free)}"]
        if g.engine_bytes is not None:
            lines.append(f"This engine: {gib(g.engine_bytes)}")
        if g.util is not None:
            lines.append(f"Utilisation: {g.util}%")
        if g.temp is not None:
            lines.append(f"Temperature: {g.temp} °C")
        self.detail.setText("\n".join(lines))


class LivePanel(QScrollArea):
    """In a scroll area: in a short window its wrapped lines keep their height and scroll,
    where a plain layout squeezed them and cut off their first and last lines."""

    def __init__(self) -> None:
        super().__init__()
        self.setAccessibleName("Live panel")
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.engine = QLabel("Engine: starting…")
        self.engine.setWordWrap(True)
        # a load's stage and bar (reading the weights, building the kernels once, ...): a 70B
        # model takes minutes, which the status bar's one line told too quietly
        self.stage = QLabel()
        self.stage.setWordWrap(True)
        self.stage.setAccessibleName("Loading stage")
        self.load_bar = QProgressBar()
        self.load_bar.setAccessibleName("Loading progress")
        self.load_bar.setFormat("%p%")
        for w in (self.stage, self.load_bar):
            w.setVisible(False)
        self.loading = False  # whether the engine is loading a model (set_engine)
        self.kernels = QLabel()
        self.kernels.setWordWrap(True)
        self.gpu_note = QLabel()
        self.gpu_note.setWordWrap(True)
        self.cards: list[GpuCard] = []
        self.cuda_devices: list[dict] = []  # from the engine's hello: index, name, uuid
        self.cards_box = QVBoxLayout()
        self.rate = QLabel("Now: idle")
        self.rate.setAccessibleName("Current tokens per second")
        self.last = QLabel()
        self.last.setWordWrap(True)
        self.plot = Sparkline()
        content = QWidget()
        lay = QVBoxLayout(content)
        for w in (_heading("Model"), self.engine, self.stage, self.load_bar, self.kernels,
                  _heading("GPUs"), self.gpu_note):  # fmt: skip
            lay.addWidget(w)
        lay.addLayout(self.cards_box)
        for w in (_heading("Throughput"), self.rate, self.plot, self.last):
            lay.addWidget(w)
        lay.addStretch(1)
        self.setWidget(content)
        self.setMinimumWidth(180)

    def least_width(self) -> int:
        """The narrowest the panel shows its lines whole at: its widest word or heading, and the
        scroll bar beside them (narrower, the lines went on past its edge, cut off)."""
        return self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()

    def set_progress(self, fraction: float, stage: str) -> None:
        """A step of the load under way (none shows once the engine has left the state)."""
        if not self.loading:
            return
        self.stage.setText(stage[:1].upper() + stage[1:])
        self.stage.setVisible(bool(stage))
        # a step that tells no fraction (the kernels' build, minutes): a busy bar, not 0%
        self.load_bar.setRange(0, 100 if fraction > 0 else 0)
        self.load_bar.setValue(round(100 * min(max(fraction, 0.0), 1.0)))  # as the status bar
        self.load_bar.setVisible(True)

    def set_engine(self, state: str, info: dict) -> None:
        self.loading = state == "loading"
        for w in (self.stage, self.load_bar):
            w.setVisible(False)
        if self.loading:  # the bar at 0 until the engine's first step
            self.set_progress(0.0, "")
            self.engine.setText(f"Loading {model_label(info.get('path'))}…")
            return
        if state == "loaded":
            quant = info.get("quant", "")
            text = (
                f"{model_label(info.get('model'))} ({quant}) on {info.get('device')}, "
                f"{info.get('n_ctx')} tokens of context"
            )
            if info.get("kv_cache_bytes"):  # GPU: where the memory went
                text += (
                    f". Weights {size(info.get('weight_bytes') or 0)}"
                    + (
                        f", fast decode layout {size(info['layout_bytes'])}"
                        if info.get("layout_bytes")
                        else ""
                    )
                    + ", KV cache "
                    f"{size(info['kv_cache_bytes'])}, workspace "
                    f"{size(info.get('workspace_bytes') or 0)}; up to {info.get('max_context')} "
                    "tokens would fit"
                    + (
                        f". The embedding table ({size(info['host_weight_bytes'])}) stays in "
                        "host memory to leave the GPU room."
                        if info.get("host_weight_bytes")
                        else ""
                    )
                )
            if info.get("note"):  # a choice the load made, such as bfloat16 on the CPU
                text += f". Note: {info['note']}"
            self.engine.setText(text)
            if info.get("kernels") == "cuda":
                self.kernels.setText(f"Kernels: CUDA ({info.get('kernels_reason', '')})")
                self.kernels.setObjectName("ok")
            else:
                self.kernels.setText(
                    "Kernels: pure-PyTorch reference path (slow): "
                    f"{info.get('kernels_reason', 'reason unknown')}"
                )
                self.kernels.setObjectName("warning")
            # the style sheet's colour follows the new name only once the label is polished
            # again (setting the same style sheet again, as this did, changed nothing)
            self.kernels.style().unpolish(self.kernels)
            self.kernels.style().polish(self.kernels)
        elif state == "ready":  # the engine's hello, or a failed load that let the model go
            self.engine.setText("Engine: ready, no model loaded")
            if info.get("kernels"):  # the hello
                slow = "pure-PyTorch reference path (slow)"
                label = "CUDA" if info["kernels"] == "cuda" else slow
                self.kernels.setText(f"Kernels: {label}: {info.get('kernels_reason', '')}")
                self.cuda_devices = info.get("cuda_devices") or []
        elif state in ("crashed", "failed"):
            self.engine.setText(f"Engine {state}: {info.get('message', '')}")
        else:
            self.engine.setText(f"Engine: {state}")

    def set_gpus(
        self,
        gpus: list[GpuInfo],
        note: str | None,
        engine_rss: int | None,
        engine_vram: int | None = None,
    ) -> None:
        """``engine_vram``: what PyTorch holds in the engine (its stats), said where NVML
        cannot be read."""
        if not gpus and self.cuda_devices:  # CUDA works where NVML does not (a container
            names = ", ".join(str(d.get("name", "a GPU")) for d in self.cuda_devices)  # without
            held = f" and holds {gib(engine_vram)} there for PyTorch" if engine_vram else ""
            rest = "the rest of the GPU's memory" if engine_vram else "its memory"
            self.gpu_note.setText(  # the driver's libraries): not "no driver, the CPU"
                f"The engine uses {names} (CUDA){held}; {rest} cannot be read here (NVML is not "
                "available)."
            )
        elif not gpus:
            cpu = f" Engine memory (CPU): {gib(engine_rss)}." if engine_rss else ""
            self.gpu_note.setText((note or "No GPU found.") + cpu)
        else:
            self.gpu_note.setText("")
        while len(self.cards) < len(gpus):
            self.cards.append(GpuCard())
            self.cards_box.addWidget(self.cards[-1])
        while len(self.cards) > len(gpus):
            self.cards.pop().deleteLater()
        for card, g in zip(self.cards, gpus, strict=True):
            card.show_info(g, self.cuda_index(g.uuid))

    def cuda_index(self, nvml_uuid: str) -> int | None:
        """The engine's CUDA number of an NVML device (the two orders can differ)."""
        return cuda_index(nvml_uuid, self.cuda_devices)

    def set_rate(self, tok_s: float | None) -> None:
        self.rate.setText("Now: idle" if tok_s is None else f"Now: {tok_s:.1f} tok/s")

    def show_history(self, answers: list[dict]) -> None:
        """Recent answers' stats from the history, oldest first: the plot and the last line
        show what came before this start."""
        for stats in answers:
            self.add_answer(stats)

    def add_answer(self, stats: dict) -> None:
        if stats.get("decode_tok_s"):
            self.plot.add(float(stats["decode_tok_s"]))
        ttft, prompt = stats.get("ttft_s", 0) * 1000, prompt_part(stats)
        self.last.setText(
            f"Last answer: first token {ttft:.0f} ms, {prompt + ', ' if prompt else ''}"
            f"writing {stats.get('decode_tok_s', 0):.1f} tok/s"
        )
        self.set_rate(None)


def _heading(text: str) -> QLabel:
    label = QLabel(text)
    label.setStyleSheet("font-weight: bold; margin-top: 8px;")
    return label
