"""The Models window: browse the VPTQ-community catalogue with scheme filters, see the exact
size and the VRAM fit, download; manage downloads and installed models; hub settings."""

from __future__ import annotations

import asyncio

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTableView,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..browser import BrowserController, Details, EntryRole, Filters, eta_text, size_text
from ..downloads import ACTIVE, Download
from ..fit import CpuFit, Fit, gib, largest_line
from ..gpu import GpuInfo
from ..hub import HubSettings
from .banner import ErrorBanner
from .colours import colour
from .screen import fit_to_screen

# under the fit on a GPU whose free memory cannot be read (app/gpu.py from_engine)
UNKNOWN_FREE = (
    "NVML cannot be read here, so the GPU's free memory is unknown: this fit is against its "
    "total, and other programs' use of it is not counted"
)


def verdict_html(verdict: str, widget: QWidget) -> str:
    """The verdict, capitalised and bold, in its colour for the widget's light or dark theme."""
    return f"<b style='color:{colour(verdict, widget)}'>{verdict.capitalize()}</b>"


def _table(model, name: str) -> QTableView:
    t = QTableView()
    t.setModel(model)
    t.setAccessibleName(name)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    # the arrow keys choose a row; Tab goes on to the next control (it went from cell to
    # cell: the keyboard could not leave the table)
    t.setTabKeyNavigation(False)
    t.verticalHeader().setVisible(False)
    # one line a model; a name too long for the column keeps its end (the scheme: v8-k65536-0)
    t.setWordWrap(False)
    t.setTextElideMode(Qt.TextElideMode.ElideMiddle)
    t.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    t.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
    return t


def _combo(name: str, items: list[tuple[str, object]]) -> QComboBox:
    c = QComboBox()
    c.setAccessibleName(name)
    # narrower than its longest item where the window is (six filters side by side took 820 px)
    c.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    c.setMinimumContentsLength(8)
    for text, value in items:
        c.addItem(text, value)
    return c


class BrowseTab(QWidget):
    def __init__(self, ctrl: BrowserController, spawn) -> None:
        super().__init__()
        self.ctrl, self.spawn = ctrl, spawn
        self.search = QLineEdit(
            placeholderText="Search VPTQ-community models, or owner/name for any Hub repo "
            "(GPTQ models too)"
        )
        self.search.setAccessibleName("Search models")
        self.search.setToolTip(
            "Words search the VPTQ-community models. 'owner/' lists that owner's models and "
            "'owner/words' searches them, e.g. hugging-quants/gptq for GPTQ checkpoints."
        )
        self.search.setClearButtonEnabled(True)
        self.sort = _combo(
            "Sort", [("Most downloaded", "downloads"), ("Recently updated", "recent")]
        )
        # beside the search field, which gives way: the whole item, "Most downloaded", shows
        self.sort.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        refresh = QPushButton("Refresh")
        refresh.setAccessibleName("Refresh the model list")
        self.note = QLabel(wordWrap=True, objectName="catalogueNote")
        self.family = _combo("Base model", [("Any base model", "")])
        self.family.setMinimumContentsLength(10)  # "Any base model" whole at the least width
        self.params = _combo(
            "Parameters",
            [("Any size", 0), ("≤ 8B", 8), ("≤ 14B", 14), ("≤ 32B", 32), ("≤ 72B", 72)],
        )
        self.bits = _combo("Bits", [("Any bits", 0), ("≤ 2 bits", 2), ("≤ 3 bits", 3), ("≤ 4", 4)])
        self.v = _combo(
            "Vector length", [("Any vector", 0), *[(f"v{n}", n) for n in (4, 6, 8, 12, 16)]]
        )
        self.k = _combo(
            "Codebook", [("Any codebook", 0), *[(f"k{n}", n) for n in (256, 4096, 65536)]]
        )
        self.kr = _combo(
            "Residual",
            [("Any residual", -1), ("No residual", 0), *[(f"r{n}", n) for n in (256, 4096, 65536)]],
        )
        self.table = _table(ctrl.filtered, "Catalogue")
        self.table.setSortingEnabled(True)
        self._hub_order()
        self.detail = DetailPane(ctrl, spawn)
        top = QHBoxLayout()
        for w in (self.search, self.sort, refresh):
            top.addWidget(w)
        filters = QHBoxLayout()
        for w in (self.family, self.params, self.bits, self.v, self.k, self.kr):
            filters.addWidget(w)
        # The details scroll rather than lose their last lines in a small window (a no-fit
        # breakdown runs to eight lines).
        detail_scroll = QScrollArea(widgetResizable=True)
        detail_scroll.setAccessibleName("Model details")
        detail_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        detail_scroll.setWidget(self.detail)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(detail_scroll)
        split.setSizes([220, 340])
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(filters)
        lay.addWidget(self.note)
        lay.addWidget(split, 1)
        self.debounce = QTimer(self, singleShot=True, interval=400)
        self.debounce.timeout.connect(self.refresh)
        self.search.textChanged.connect(lambda _: self.debounce.start())
        self.sort.currentIndexChanged.connect(lambda _: (self._hub_order(), self.refresh()))
        refresh.clicked.connect(self.refresh)
        for c in (self.family, self.params, self.bits, self.v, self.k, self.kr):
            c.currentIndexChanged.connect(self._filter)
        self.table.selectionModel().currentRowChanged.connect(self._selected)
        ctrl.catalogue_note.connect(self.note.setText)
        ctrl.catalogue.modelReset.connect(self._families)

    def _hub_order(self) -> None:
        """The list in the order the sort menu asked the hub for, until a column's header is
        clicked (enabling sorting sorted it by name, Z to A, whatever the menu said)."""
        self.table.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.ctrl.filtered.sort(-1)

    def refresh(self) -> None:
        self.spawn(self.ctrl.refresh(self.search.text().strip(), self.sort.currentData()))

    def _families(self) -> None:
        current = self.family.currentData()
        self.family.blockSignals(True)
        self.family.clear()
        self.family.addItem("Any base model", "")
        for f in self.ctrl.families():
            self.family.addItem(f, f)
        self.family.setCurrentIndex(max(0, self.family.findData(current)))
        self.family.blockSignals(False)

    def _filter(self) -> None:
        self.ctrl.filtered.set_filters(
            Filters(
                self.family.currentData(),
                self.params.currentData(),
                self.bits.currentData(),
                self.v.currentData(),
                self.k.currentData(),
                self.kr.currentData(),
            )
        )

    def _selected(self, index) -> None:
        entry = index.data(EntryRole)
        if entry is not None:
            self.detail.show_loading(entry.id)
            self.spawn(self.ctrl.select(entry.id))


def offer_context(lines: list[str], verdict: str | None, largest: int) -> list[str]:
    """Where the model does not fit at the chosen context but would at a smaller one, its
    "Largest context that fits" line offers that context as a link (the spin box takes it)."""
    if verdict != "does not fit" or largest <= 0:
        return lines
    head = largest_line(largest)
    return [f"{ln} (<a href='{largest}'>use it</a>)" if ln == head else ln for ln in lines]


class DetailPane(QWidget):
    """The selected model: exact size, on disk, fit breakdown and the download controls."""

    def __init__(self, ctrl: BrowserController, spawn) -> None:
        super().__init__()
        self.ctrl, self.spawn = ctrl, spawn
        self.repo: str | None = None
        # Load in chat: the model is installed, and fits at the chosen context (one that does
        # not is refused by the engine after it has let the loaded model go)
        self.installed = False
        self.fits = True
        self.title = QLabel(objectName="detailTitle", wordWrap=True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.size = QLabel(wordWrap=True)
        self.gpu = QComboBox()
        self.gpu.setAccessibleName("GPU or CPU for the fit check")
        self.context = QSpinBox(minimum=256, maximum=1 << 20, singleStep=1024, value=ctrl.context)
        self.context.setAccessibleName("Context length: for the fit check and Load in chat")
        self.context.setToolTip("The fit is checked at this context; Load in chat loads with it")
        self.verdict = QLabel(objectName="fitVerdict", wordWrap=True)  # the CPU's is a sentence
        self.verdict.setAccessibleName("Fit verdict")
        self.breakdown = QLabel(wordWrap=True)
        self.breakdown.setAccessibleName("Fit breakdown")
        self.breakdown.linkActivated.connect(lambda tokens: self.context.setValue(int(tokens)))
        self.download = QPushButton("Download")
        self.pause = QPushButton("Pause")
        self.cancel = QPushButton("Cancel")
        self.load = QPushButton("Load in chat")
        for b in (self.download, self.pause, self.cancel, self.load):
            b.setAccessibleName(b.text())
        self.progress = QProgressBar()
        self.progress.setAccessibleName("Download progress")
        self.state = QLabel(wordWrap=True)
        self.state.setAccessibleName("Download state")
        form = QFormLayout()
        form.addRow("Fit on", self.gpu)
        form.addRow("Context (tokens)", self.context)
        buttons = QHBoxLayout()
        for b in (self.download, self.pause, self.cancel, self.load):
            buttons.addWidget(b)
        buttons.addStretch(1)
        left = QVBoxLayout()
        for w in (self.title, self.size):
            left.addWidget(w)
        left.addLayout(buttons)
        left.addWidget(self.progress)
        left.addWidget(self.state)
        left.addStretch(1)
        right = QVBoxLayout()
        right.addLayout(form)
        right.addWidget(self.verdict)
        right.addWidget(self.breakdown)
        right.addStretch(1)
        lay = QHBoxLayout(self)
        lay.addLayout(left, 3)
        lay.addLayout(right, 2)
        self.download.clicked.connect(self._download)
        self.pause.clicked.connect(lambda: self.repo and ctrl.pause(self.repo))
        self.cancel.clicked.connect(lambda: self.repo and spawn(ctrl.cancel(self.repo)))
        self.load.clicked.connect(self._load)
        self.context.valueChanged.connect(self._context_changed)
        self.gpu.currentIndexChanged.connect(lambda _: self.update_fit())
        self.gpu.currentTextChanged.connect(self.gpu.setToolTip)  # the whole name, where cut
        ctrl.details_ready.connect(self.show_details)
        ctrl.context_changed.connect(self.context.setValue)
        ctrl.download_changed.connect(self.show_download)
        self.show_loading(None)

    def show_loading(self, repo: str | None) -> None:
        self.repo = repo
        self.title.setText(f"<b>{repo}</b>" if repo else "Select a model to see its size and fit.")
        self.size.setText("reading its files…" if repo else "")
        self.verdict.setText("")
        self.breakdown.setText("")
        for b in (self.download, self.pause, self.cancel, self.load):
            b.setEnabled(False)
        self.installed, self.fits = False, True
        self.progress.setVisible(False)
        self.state.setText("")

    def show_details(self, d: Details) -> None:
        if d.repo != self.repo:
            return
        self.title.setText(f"<b>{d.repo}</b><br>{d.scheme.describe()}")
        self._show_size(d, d.on_disk)
        self.fill_devices()
        if d.shape is not None:
            self.context.setMaximum(d.shape.max_context)
        self.update_fit()
        self.show_download(self.ctrl.manager.downloads.get(d.repo))

    def showEvent(self, event) -> None:  # Qt's name
        """Fit on lists the devices as the window opens, before a model is chosen (it stood
        empty until then)."""
        super().showEvent(event)
        if self.repo is None:
            self.fill_devices()

    def fill_devices(self) -> None:
        """Fit on's list: the GPUs now (one NVML read), then the CPU; the choice starts where
        loads go."""
        gpus = self.ctrl.gpus_now()
        usable = [not self.ctrl.load_device(g)[1] for g in gpus]  # Load in chat can load there
        self.gpu.blockSignals(True)
        self.gpu.clear()
        for g, ok in zip(gpus, usable, strict=True):
            mark = "" if ok else ", not usable"  # why: under the fit
            # the free memory before the name: a narrow box cuts the end of a long name
            # ("NVIDIA GeForce RTX 4090 Laptop GPU"), where it cut the free memory
            free = f"{gib(g.free)} free" if g.free_known else f"{gib(g.total)} total"
            self.gpu.addItem(f"GPU {g.index} ({free}{mark}): {g.name}", g)
        self.gpu.addItem("CPU (slow)", None)  # last: a GPU, where there is one, first
        self.gpu.setCurrentIndex(self._where_loads_go(gpus, usable))
        self.gpu.blockSignals(False)
        self.gpu.setToolTip(self.gpu.currentText())

    def _where_loads_go(self, gpus: list, usable: list[bool]) -> int:
        """Fit on starts at the device loads go to now (the last load's GPU, or the CPU), else
        the first GPU the engine can use, else the CPU (the last item)."""
        if self.ctrl.device() == "cpu":
            return len(gpus)
        target = self.ctrl.engine_gpu(gpus)
        for i, g in enumerate(gpus):
            if target is not None and g.uuid == target.uuid:
                return i
        return next((i for i, ok in enumerate(usable) if ok), len(gpus))

    def _show_size(self, d: Details, on_disk: int) -> None:
        self.size.setText(
            f"Download size {size_text(d.files.total)} in {len(d.files.files)} files "
            f"(weights {size_text(d.files.weight_bytes)}); already on disk {size_text(on_disk)}."
        )

    def _context_changed(self, tokens: int) -> None:
        self.ctrl.context = tokens
        self.update_fit()

    def update_fit(self) -> None:
        d = self.ctrl.details
        if d is None or d.repo != self.repo:
            return
        self.fits = self._show_fit(d) != "does not fit"
        self._enable_load()

    def _enable_load(self) -> None:
        """Load in chat loads on the device of the fit (Fit on), where the engine sees it."""
        _, unseen = self.ctrl.load_device(self.gpu.currentData())
        self.load.setEnabled(self.installed and self.fits and not unseen)
        self.load.setToolTip(
            unseen
            or (
                "Loads on the device of the fit, at this context"
                if self.fits
                else "It does not fit at this context: choose a smaller one (the fit says which)"
            )
        )

    def _load(self) -> None:
        device, _ = self.ctrl.load_device(self.gpu.currentData())
        if self.repo:
            self.ctrl.load(self.repo, device)

    def _show_fit(self, d) -> str | None:
        """Shows the fit on the chosen GPU or the CPU; returns its verdict (None: none)."""
        gpu = self.gpu.currentData()
        if gpu is None:
            return self._show_cpu_fit(d)
        f = self.ctrl.fit(self.context.value(), gpu)
        if f is None:
            self.verdict.setText("")
            self.breakdown.setText(d.note)
            return None
        self.verdict.setText(verdict_html(f.verdict, self))
        lines = f.lines()
        if f.verdict != "fits":
            room = self.ctrl.make_room(gpu)
            if room:
                lines.append("To make room, close: " + "; ".join(room))
        if f.verdict == "does not fit":
            lines += self._fits_elsewhere(gpu)
        if not f.free_known:
            lines.append(UNKNOWN_FREE)
        lines = offer_context(lines, f.verdict, f.max_context)
        _, unseen = self.ctrl.load_device(gpu)
        if unseen:  # why Load in chat cannot load it there (not only in its tooltip), first:
            lines.insert(0, f"<b>{unseen}</b>")  # below the breakdown, a small window hid it
        self.breakdown.setText("<br>".join(lines))
        return f.verdict

    def _fits_elsewhere(self, gpu) -> list[str]:
        """The other GPUs (of Fit on, that the engine can use) that hold the model at this
        context: one that does not fit here may on the next card."""
        out = []
        for i in range(self.gpu.count() - 1):  # the CPU is last
            other = self.gpu.itemData(i)
            if other.uuid == gpu.uuid or self.ctrl.load_device(other)[1]:
                continue
            f = self.ctrl.fit(self.context.value(), other)
            if f is not None and f.verdict != "does not fit":
                out.append(
                    f"It fits on GPU {other.index} ({other.name}) at this context: choose it "
                    "under Fit on"
                )
        return out

    def _show_cpu_fit(self, d) -> str | None:
        head = (
            "On the CPU it runs slowly."
            if self.gpu.count() > 1
            else "No NVIDIA GPU: this model would run on the CPU (slow)."
        )
        f = self.ctrl.cpu_fit(self.context.value())
        if f is None or f.verdict is None:
            self.verdict.setText(head)
            lines = [] if f is None else f.lines()
        else:
            self.verdict.setText(f"{verdict_html(f.verdict, self)} in memory. {head}")
            lines = f.lines()
        lines += [why for why in (self.ctrl.gpus.error, d.note) if why]
        verdict, largest = (f.verdict, f.max_context) if f is not None else (None, 0)
        self.breakdown.setText("<br>".join(offer_context(lines, verdict, largest)))
        return verdict

    def _download(self) -> None:
        if self.repo:
            d = self.ctrl.manager.downloads.get(self.repo)
            (self.ctrl.resume if d else self.ctrl.start)(self.repo)

    def show_download(self, d: Download | None) -> None:
        if self.repo is None or (d is not None and d.repo != self.repo):
            return
        details = (
            self.ctrl.details if self.ctrl.details and self.ctrl.details.repo == self.repo else None
        )
        installed = (d is not None and d.state == "installed") or (
            d is None and details is not None and details.installed
        )
        active = d is not None and d.active
        resumable = d is not None and d.state in ("paused", "failed")
        self.download.setText("Resume" if resumable else "Download")
        self.download.setEnabled(not active and not installed)
        self.pause.setEnabled(active)
        self.cancel.setEnabled(d is not None and not installed and d.state != "cancelled")
        self.installed = installed
        self._enable_load()
        self.progress.setVisible(d is not None)
        if d is None:
            self.state.setText("Installed." if installed else "")
            return
        self.progress.setValue(int(100 * (1.0 if d.state == "installed" else d.fraction)))
        if details is not None and d.files:  # what is on disk follows the download
            self._show_size(details, d.done)
        parts = [d.state.capitalize()]
        if d.files:
            parts.append(f"{size_text(d.done)} of {size_text(d.total)}")
            file = f"file {d.file_index + 1} of {len(d.files.files)}"
            if d.active and d.file_size:
                file += f": {size_text(d.file_done)} of {size_text(d.file_size)}"
            parts.append(file)
        if d.state in ("downloading", "stalled"):
            parts.append(f"{size_text(d.speed)}/s, ETA {eta_text(d.eta)}")
        if d.message:
            parts.append(d.message)
        self.state.setText(" · ".join(parts))


class LocalTab(QWidget):
    """Downloads in progress and installed models, with disk use and delete."""

    def __init__(self, ctrl: BrowserController, spawn) -> None:
        super().__init__()
        self.ctrl, self.spawn = ctrl, spawn
        self.table = _table(ctrl.local, "Downloads and installed models")
        self.total = QLabel(wordWrap=True)  # the empty line is long
        self.total.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        buttons = QHBoxLayout()
        self.buttons = {}
        for text in ("Load in chat", "Pause", "Resume", "Cancel", "Delete…"):
            b = QPushButton(text)
            b.setAccessibleName(text.rstrip("…"))
            self.buttons[text] = b
            buttons.addWidget(b)
        buttons.addWidget(self.total, 1)  # the room beside the buttons (it wrapped in a corner)
        # the selected installed model's fit where Load in chat loads it
        self.fit = QLabel(wordWrap=True, objectName="installedFit")
        self.fit.setAccessibleName("Fit of the selected model")
        self._fit_key: tuple | None = None  # what the fit shown is for, and its verdict
        self._verdict: str | None = None
        self.fit.linkActivated.connect(
            lambda tokens: self._on(lambda repo: ctrl.load(repo, context=int(tokens)))
        )
        lay = QVBoxLayout(self)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.fit)
        lay.addLayout(buttons)
        b = self.buttons
        b["Load in chat"].clicked.connect(lambda: self._on(ctrl.load))
        b["Pause"].clicked.connect(lambda: self._on(ctrl.pause))
        b["Resume"].clicked.connect(lambda: self._on(ctrl.resume))
        b["Cancel"].clicked.connect(lambda: self._on(lambda r: spawn(ctrl.cancel(r))))
        b["Delete…"].clicked.connect(lambda: self._on(self._delete))
        for signal in (ctrl.local.dataChanged, ctrl.local.rowsInserted, ctrl.local.rowsRemoved):
            signal.connect(self._totals)
            signal.connect(self._buttons_for_selection)
        self.table.selectionModel().currentChanged.connect(self._buttons_for_selection)
        self._totals()
        self._buttons_for_selection()

    def selected(self) -> str | None:
        idx = self.table.currentIndex()
        return idx.data(EntryRole) if idx.isValid() else None

    def _buttons_for_selection(self, *_) -> None:
        """Only what applies to the selected row: load an installed model, pause a running
        download, resume a paused, failed or partial one, cancel a download (not an installed
        model: that is Delete), delete anything on disk."""
        repo = self.selected()
        row = next((r for r in self.ctrl.local.rows if r["repo"] == repo), None)
        state = row["state"] if row else None
        b = self.buttons
        verdict = self.show_fit(repo if state == "installed" else None)
        b["Load in chat"].setEnabled(state == "installed" and verdict != "does not fit")
        b["Pause"].setEnabled(state in ACTIVE)  # what DownloadManager.pause stops
        b["Resume"].setEnabled(state in ("paused", "failed", "partial"))
        b["Cancel"].setEnabled(state in (*ACTIVE, "queued", "paused", "failed"))
        b["Delete…"].setEnabled(row is not None)

    def show_fit(self, repo: str | None) -> str | None:
        """The installed model's fit at the context of the fit check, on the device a load goes
        to; returns its verdict (None: no verdict: none selected, an unknown shape, or the CPU
        with its memory unknown). Worked out again for another model, context or device, or
        after refresh_fit; not for each progress step of a download in another row."""
        self.fit.setVisible(repo is not None)
        if repo is None:
            return None
        key = (repo, self.ctrl.context, self.ctrl.device())
        if key != self._fit_key:
            gpu, f = self.ctrl.installed_fit(repo, key[1])
            self.fit.setText(installed_fit_text(gpu, f, key[1], self))
            self._fit_key, self._verdict = key, f.verdict if f is not None else None
        return self._verdict

    def refresh_fit(self) -> None:
        """The fit again (the free memory may have changed)."""
        self._fit_key = None
        self._buttons_for_selection()

    def _on(self, fn) -> None:
        repo = self.selected()
        if repo:
            fn(repo)

    def _delete(self, repo: str) -> None:
        row = next(r for r in self.ctrl.local.rows if r["repo"] == repo)
        text = f"Delete {repo} ({size_text(row['disk'])} on disk)?"
        state = self.ctrl.model_state(repo)
        if state == "loaded":
            text += (
                "\n\nIt is the model loaded now: it stays loaded until you load another or "
                "quit, and the next start has no model to load until you choose one."
            )
        elif state == "loading":  # its files are being read: the load may fail
            text += (
                "\n\nIt is being loaded now: its load may fail for want of its files, and the "
                "next start has no model to load until you choose one."
            )
        answer = QMessageBox.question(self, "Delete model", text)
        if answer == QMessageBox.StandardButton.Yes:
            self.spawn(self.ctrl.delete(repo))

    def _totals(self, *_) -> None:
        disk = sum(r["disk"] for r in self.ctrl.local.rows)
        n = len(self.ctrl.local.rows)
        if n == 0:  # an empty table says where models come from
            self.total.setText("No models yet: pick one in Browse and press Download.")
            return
        self.total.setText(f"{n} model{'s' * (n != 1)}, {size_text(disk)} on disk")


def installed_fit_text(
    gpu: GpuInfo | None, f: Fit | CpuFit | None, context: int, widget: QWidget
) -> str:
    """One sentence: the verdict, where and at what context, the memory; where it does not fit,
    the largest context that does, as a link that loads with it. widget: whose theme."""
    if f is None:
        return "No fit check: its config.json does not say its shape (loading says why)."
    where = f"on GPU {gpu.index} ({gpu.name})" if gpu is not None else "on the CPU (slow)"
    if f.verdict is None:  # the CPU's memory unknown
        return f"Loads {where}; it takes about {f.need.describe()}."
    if isinstance(f, Fit) and not f.free_known:
        need = f"{gib(f.needed)} of its {gib(f.free)} (its free memory is unknown)"
    elif isinstance(f, Fit):
        need = f"{gib(f.needed)} of {gib(f.free)} free"
    else:
        need = f"{gib(f.need.total)} of {gib(f.available or 0)} available"
    text = (
        f"{verdict_html(f.verdict, widget)} {where} at {context} tokens of context: needs {need}."
    )
    if f.verdict != "does not fit":
        return text
    if not f.max_context:
        return f"{text} The weights alone do not fit."
    tokens = f.max_context
    return f"{text} {largest_line(tokens)} (<a href='{tokens}'>load with it</a>)."


class HubSettingsTab(QWidget):
    """Mirror endpoint, proxy, token (kept in huggingface_hub's store), offline mode."""

    def __init__(self, ctrl: BrowserController, on_saved) -> None:
        super().__init__()
        self.ctrl, self.on_saved = ctrl, on_saved
        s = ctrl.hub.settings
        # empty: $HF_ENDPOINT where set, else huggingface.co (what HubSettings.url takes)
        self.endpoint = QLineEdit(s.endpoint, placeholderText=HubSettings().url)
        self.proxy = QLineEdit(s.proxy, placeholderText="http://proxy.example:3128")
        self.token = QLineEdit(placeholderText="hf_…", echoMode=QLineEdit.EchoMode.Password)
        self.offline = QCheckBox("Offline: use the cached list, download nothing")
        self.offline.setChecked(s.offline)
        self.status = QLabel(wordWrap=True)
        for w, name in (
            (self.endpoint, "Mirror endpoint"),
            (self.proxy, "Proxy"),
            (self.token, "Access token"),
            (self.offline, "Offline mode"),
        ):
            w.setAccessibleName(name)
        save = QPushButton("Save")
        self.forget_button = forget = QPushButton("Forget token")
        form = QFormLayout(self)
        form.addRow("Mirror endpoint (HF_ENDPOINT)", self.endpoint)
        form.addRow("Proxy", self.proxy)
        form.addRow("Access token", self.token)
        form.addRow("", self.offline)
        row = QHBoxLayout()
        row.addWidget(save)
        row.addWidget(forget)
        row.addStretch(1)
        form.addRow("", row)
        form.addRow("", self.status)
        save.clicked.connect(self.save)
        forget.clicked.connect(self.forget)
        self._token_status()

    def _token_status(self) -> None:
        from ..hub import token

        stored = bool(token())
        self.status.setText("A token is stored." if stored else "No token stored.")
        self.forget_button.setEnabled(stored)

    def save(self) -> None:
        from ..hub import HubError, save_token

        s = self.ctrl.hub.settings
        s.endpoint, s.proxy = self.endpoint.text().strip(), self.proxy.text().strip()
        s.offline = self.offline.isChecked()
        self.ctrl.hub.apply()
        self.on_saved()
        if self.token.text().strip():
            try:
                user = save_token(self.token.text(), None if s.offline else s.url)
            except HubError as e:
                self.status.setText(str(e))
                return
            self.token.clear()
            self.status.setText(f"Saved; the token belongs to {user}." if user else "Saved.")
            self.forget_button.setEnabled(True)
            return
        self.status.setText("Saved.")

    def forget(self) -> None:
        from ..hub import clear_token

        clear_token()
        self._token_status()


class ModelsWindow(QDialog):
    def __init__(self, parent, ctrl: BrowserController, on_settings_saved) -> None:
        super().__init__(parent)
        self.setWindowTitle("Models")
        fit_to_screen(self, 1000, 680)
        self.ctrl = ctrl
        self.tasks: set[asyncio.Task] = set()
        self.tabs = QTabWidget()
        self.browse = BrowseTab(ctrl, self.spawn)
        self.local = LocalTab(ctrl, self.spawn)
        self.hub_settings = HubSettingsTab(ctrl, on_settings_saved)
        self.tabs.addTab(self.browse, "Browse")
        self.tabs.addTab(self.local, "Downloads && installed")
        self.tabs.addTab(self.hub_settings, "Hub settings")
        self.error = ErrorBanner()
        lay = QVBoxLayout(self)
        lay.addWidget(self.error)
        lay.addWidget(self.tabs)
        ctrl.error.connect(self.show_error)
        self.tabs.currentChanged.connect(
            lambda i: self.tabs.widget(i) is self.local and self.local.refresh_fit()
        )
        self.loaded_once = False

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if not self.loaded_once:
            self.loaded_once = True
            self.browse.refresh()

    def show_error(self, message: str) -> None:
        self.error.show_message(f"⚠ {message}")

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
