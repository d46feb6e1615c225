"""The model browser's logic between hub.py, downloads.py, fit.py and the widgets: Qt item
models for the catalogue and the local models, and the async calls behind each button."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    Signal,
)

from engine.memory import gptq_zero_bytes, host_available
from engine.sliced_plan import model_layout_bytes

from .downloads import ACTIVE, Download, DownloadManager
from .fit import CpuFit, Fit, Shape, cpu_fit, fit
from .gpu import GpuInfo, Gpus, cuda_index, device_index, from_engine, same_device
from .hub import (
    INSTALLED,
    WEIGHT_SUFFIXES,
    Entry,
    Hub,
    HubError,
    RepoFiles,
    Scheme,
    bytes_on_disk,
    folder_of,
    local_models,
    parse_name,
    scheme_from_config,
)

log = logging.getLogger("app.browser")
Index = QModelIndex | QPersistentModelIndex
EntryRole = Qt.ItemDataRole.UserRole + 10
SortRole = Qt.ItemDataRole.UserRole + 11


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        # as it will print: 999,999 bytes are "1.0 MB", not "1000.0 KB"
        if round(abs(n), 0 if unit == "B" else 1) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class _Table(QAbstractTableModel):
    """A flat table with fixed column titles in COLUMNS and its data in ``rows``."""

    COLUMNS: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.rows: list = []

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return len(self.COLUMNS)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.COLUMNS[section]
        return None


class CatalogueModel(_Table):
    # No base-model column: the name starts with it (and the tooltip and the filter give it).
    COLUMNS = ("Model", "Params", "Bits", "Vector", "Codebook", "Residual", "Downloads")

    rows: list[tuple[Entry, Scheme]]

    def set_entries(self, entries: list[Entry]) -> None:
        self.beginResetModel()
        self.rows = [(e, e.scheme) for e in entries]
        self.endResetModel()

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        e, s = self.rows[index.row()]
        if role == EntryRole:
            return e
        values = (
            e.id.split("/", 1)[-1],
            s.params_b,
            s.bits,
            s.v,
            s.k,
            s.kr,
            e.downloads,
        )
        value = values[index.column()]
        if role == SortRole:
            return -1 if value is None else value
        if role == Qt.ItemDataRole.DisplayRole:
            if s.gptq and index.column() in (3, 4, 5):  # no vectors or codebooks
                return "GPTQ" if index.column() == 3 else "–"
            if value is None:
                return "?"
            if index.column() == 1:  # SmolLM2's 0.135 as 135M
                return f"{value * 1000:g}M" if value < 0.5 else f"{value:g}B"
            if index.column() == 2:
                return f"{value:.2f}"
            return str(value)
        if role == Qt.ItemDataRole.ToolTipRole:
            updated = e.modified[:10] if e.modified else "unknown"
            return f"{e.id}\nbase model {s.base or 'unknown'}\n{s.describe()}\nupdated {updated}"
        return None


@dataclass
class Filters:
    family: str = ""  # "" = any
    max_params: float = 0  # 0 = any
    max_bits: float = 0
    v: int = 0
    k: int = 0
    kr: int = -1  # -1 = any


class CatalogueFilter(QSortFilterProxyModel):
    """The scheme filters of the Browse tab."""

    def __init__(self) -> None:
        super().__init__()
        self.filters = Filters()
        self.setSortRole(SortRole)

    def set_filters(self, f: Filters) -> None:
        self.beginFilterChange()
        self.filters = f
        self.endFilterChange()

    def filterAcceptsRow(self, row: int, parent: Index) -> bool:
        _, s = self.sourceModel().rows[row]
        f = self.filters
        checks = (
            not f.family or s.family == f.family,
            not f.max_params or (s.params_b is not None and s.params_b <= f.max_params),
            not f.max_bits or (s.bits is not None and s.bits <= f.max_bits + 1e-9),
            not f.v or s.v == f.v,
            not f.k or s.k == f.k,
            f.kr < 0 or s.kr == f.kr,
        )
        return all(checks)


class LocalModel(_Table):
    """Downloads and installed models, one row per repo; a download's change touches its row."""

    COLUMNS = ("Model", "State", "Progress", "Speed", "ETA", "On disk")

    rows: list[dict]  # repo, state, message, fraction, speed, eta, disk

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid():
            return None
        r = self.rows[index.row()]
        if role == EntryRole:
            return r["repo"]
        if role == Qt.ItemDataRole.ToolTipRole:
            return r.get("message") or r["repo"]
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        active = r["state"] in ACTIVE
        return (
            r["repo"].split("/", 1)[-1],
            r["state"],
            f"{r['fraction']:.0%}",
            f"{size_text(r['speed'])}/s" if active else "",
            eta_text(r["eta"]) if active else "",
            size_text(r["disk"]),
        )[index.column()]

    def upsert(self, row: dict) -> None:
        for i, r in enumerate(self.rows):
            if r["repo"] == row["repo"]:
                self.rows[i] = row
                self.dataChanged.emit(self.index(i, 0), self.index(i, len(self.COLUMNS) - 1))
                return
        self.beginInsertRows(QModelIndex(), len(self.rows), len(self.rows))
        self.rows.append(row)
        self.endInsertRows()

    def remove(self, repo: str) -> None:
        for i, r in enumerate(self.rows):
            if r["repo"] == repo:
                self.beginRemoveRows(QModelIndex(), i, i)
                del self.rows[i]
                self.endRemoveRows()
                return


@dataclass
class Details:
    """What the detail pane shows for the selected catalogue entry."""

    repo: str
    scheme: Scheme
    files: RepoFiles
    on_disk: int
    shape: Shape | None
    installed: bool = False
    note: str = ""


class BrowserController(QObject):
    catalogue_note = Signal(str)
    details_ready = Signal(object)  # Details
    download_changed = Signal(object)  # Download
    error = Signal(str)
    # a model folder, the context to load it with, the device ("": the one the settings name)
    load_requested = Signal(str, int, str)
    context_changed = Signal(int)  # the fit's context, set by a load with another

    def __init__(self, hub: Hub, manager: DownloadManager, gpus: Gpus, models_dir: Path):
        super().__init__()
        self.hub, self.manager, self.gpus, self.models_dir = hub, manager, gpus, models_dir
        self.catalogue = CatalogueModel()
        self.filtered = CatalogueFilter()
        self.filtered.setSourceModel(self.catalogue)
        self.local = LocalModel()
        self.details: Details | None = None
        self.host_available = host_available  # the memory the CPU path may take (None: unknown)
        self.context = 4096  # tokens: the fit check's context, which "Load in chat" loads with
        # the engine process (None: not running): what it holds on a GPU is room for a load
        self.engine_pid: Callable[[], int | None] = lambda: None
        # the engine's CUDA devices (its hello: index, name, uuid; None before its hello) and the
        # device the next load goes to where none is chosen (the settings': auto, cpu, cuda:N)
        self.engine_devices: Callable[[], list[dict] | None] = lambda: None
        self.device: Callable[[], str] = lambda: "auto"
        # the engine's model: ("loaded" or "loading", its folder); None where it has none
        self.engine_model: Callable[[], tuple[str, str] | None] = lambda: None
        self._refreshes = 0  # refresh() calls so far: only the last one's answer is shown
        manager.on_change = self._changed
        self.refresh_local()

    # -- catalogue ---------------------------------------------------------------------------------
    async def refresh(self, search: str = "", sort: str = "downloads") -> None:
        """The model list: at once the one cached on disk (where there is one) and a note that
        the hub is being asked (a slow hub left the list empty meanwhile), then the hub's
        answer, or the cached list with the reason. Only the last of overlapping refreshes (a
        search typed on) shows its answer."""
        self._refreshes += 1
        mine = self._refreshes
        hub = self.hub
        if not hub.settings.offline:
            cached = hub.cached_catalogue(search, sort)
            asking = f"Asking {hub.settings.url} for the model list"
            if cached is not None:
                self.catalogue.set_entries(cached[0])
                asking += f"; meanwhile, the list cached on {cached[1]}"
            self.catalogue_note.emit(asking + "…")
        try:
            entries, note = await asyncio.to_thread(hub.catalogue, search, sort)
        except HubError as e:
            entries, note = None, str(e)
        if mine != self._refreshes:  # a later refresh is under way: its answer counts
            return
        if entries is not None:
            self.catalogue.set_entries(entries)
        self.catalogue_note.emit(note)

    def families(self) -> list[str]:
        return sorted({s.family for _, s in self.catalogue.rows})

    async def select(self, repo: str) -> None:
        try:
            files = await asyncio.to_thread(self.hub.files, repo)
        except HubError as e:
            self.error.emit(str(e))
            return
        scheme, shape, note = parse_name(repo), None, ""
        try:
            cfg = await asyncio.to_thread(self.hub.config, repo, files.revision)
            scheme, shape = scheme_from_config(repo, cfg), Shape.from_config(cfg)
        except (HubError, ValueError) as e:
            note = f"No fit check: {e}"
        folder = folder_of(self.models_dir, repo)
        on_disk = bytes_on_disk(folder, files)
        installed = (folder / INSTALLED).exists()
        self.details = Details(repo, scheme, files, on_disk, shape, installed, note)
        self.details_ready.emit(self.details)

    def gpus_now(self) -> list[GpuInfo]:
        """The GPUs now, each with what this app's engine holds on it (engine_bytes). Where
        NVML cannot be read but the engine's CUDA works, the engine's GPUs (gpu.from_engine:
        the fit checked against their total), so that the fit and Load in chat are for the
        GPU the engine uses (they were for the CPU, and Load in chat loaded there)."""
        gpus = self.gpus.read(self.engine_pid())
        if gpus or self.gpus.available:
            return gpus
        return from_engine(self.engine_devices() or [])

    def fit(self, context: int, gpu: GpuInfo | None) -> Fit | None:
        d = self.details
        if d is None or d.shape is None or gpu is None:
            return None
        return _gpu_fit(d.shape, d.scheme, d.files.weight_bytes, gpu, context)

    def cpu_fit(self, context: int) -> CpuFit | None:
        """Without a GPU: what the CPU path takes against the memory available now."""
        d = self.details
        if d is None or d.shape is None:
            return None
        return _cpu_fit(d.shape, d.scheme, d.files.weight_bytes, context, self.host_available())

    def load_device(self, gpu: GpuInfo | None) -> tuple[str, str]:
        """The device a load on ``gpu`` (None: the CPU) asks the engine for, as the engine
        numbers its GPUs (matched by UUID: NVML's order can differ from CUDA's), and why it
        cannot where it cannot: ("cuda:1", "") or ("", "The engine does not see this GPU...").
        Before the engine has said which GPUs it sees, the settings' device."""
        if gpu is None:
            return "cpu", ""
        devices = self.engine_devices()
        if devices is None:
            return "", ""
        n = cuda_index(gpu.uuid, devices)
        if n is not None:
            return f"cuda:{n}", ""
        if not devices:
            return "", (
                "The engine's PyTorch sees no CUDA GPU (a CPU build of PyTorch, or a driver it "
                "cannot use): choose CPU (slow); Help > Check this computer says why"
            )
        seen = ", ".join(f"{d['index']}: {d.get('name', '?')}" for d in devices)
        return "", (
            f"The engine does not see GPU {gpu.index} ({gpu.name}): it sees CUDA device "
            f"{seen} (CUDA_VISIBLE_DEVICES chooses them). Choose another."
        )

    def engine_gpu(self, gpus: list[GpuInfo] | None = None) -> GpuInfo | None:
        """The GPU a load without a chosen device goes to (the settings' device; auto and cuda
        are the engine's device 0), from NVML by UUID (``gpus``: NVML's read the caller has
        just made); None: the CPU, or none NVML shows."""
        n, devices = device_index(self.device()), self.engine_devices()
        if n is None or not devices:
            return None
        uuid = next((str(d.get("uuid", "")) for d in devices if d["index"] == n), None)
        if uuid is None:
            return None
        gpus = self.gpus_now() if gpus is None else gpus
        return next((g for g in gpus if same_device(g.uuid, uuid)), None)

    def installed_fit(self, repo: str, context: int) -> tuple[GpuInfo | None, Fit | CpuFit | None]:
        """The fit of an installed model (its config.json and the weights on disk) on the GPU a
        load from the installed list goes to (engine_gpu; None: the CPU's fit). The fit is None
        where the config does not say the shape: the engine then says what is wrong."""
        folder = folder_of(self.models_dir, repo)
        try:
            cfg = json.loads((folder / "config.json").read_text())
            shape = Shape.from_config(cfg)
            scheme = scheme_from_config(repo, cfg)
        except (OSError, ValueError, TypeError, AttributeError, ArithmeticError) as e:
            log.info("%s: no fit check (%s)", repo, e)
            return None, None
        weights = sum(
            p.stat().st_size
            for p in folder.rglob("*")
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
        )
        gpu = self.engine_gpu()
        if gpu is None:
            return None, _cpu_fit(shape, scheme, weights, context, self.host_available())
        return gpu, _gpu_fit(shape, scheme, weights, gpu, context)

    def make_room(self, gpu: GpuInfo, limit: int = 3) -> list[str]:
        """The biggest other users of the GPU: what to close to make room (not this app's
        engine: the fit counts what it holds as free)."""
        engine = self.engine_pid()
        procs = [p for p in self.gpus.processes(gpu.index) if p[0] != engine]
        return [f"{name} (pid {pid}): {size_text(b)}" for pid, name, b in procs[:limit]]

    # -- downloads ---------------------------------------------------------------------------------
    def start(self, repo: str) -> None:
        self._guard(lambda: self.manager.start(repo))

    def pause(self, repo: str) -> None:
        self.manager.pause(repo)

    def resume(self, repo: str) -> None:
        self._guard(lambda: self.manager.resume(repo))

    async def cancel(self, repo: str) -> None:
        await self.manager.cancel(repo)
        self.refresh_local()

    async def delete(self, repo: str) -> None:
        await self.manager.delete(repo)
        self.local.remove(repo)
        self.refresh_local()

    def model_state(self, repo: str) -> str | None:
        """ "loaded" or "loading" where the engine has this downloaded model loaded or is loading
        it now, else None."""
        now = self.engine_model()
        return now[0] if now and now[1] == str(folder_of(self.models_dir, repo)) else None

    def load(self, repo: str, device: str = "", context: int | None = None) -> None:
        """Load the model in the chat with the context its fit was checked at (or ``context``,
        which becomes the fit's from then on), on ``device`` ("": the settings')."""
        if context is not None and context != self.context:
            self.context = context
            self.context_changed.emit(context)
        self.load_requested.emit(str(folder_of(self.models_dir, repo)), self.context, device)

    def _guard(self, fn) -> None:
        try:
            fn()
        except HubError as e:
            self.error.emit(str(e))

    def _changed(self, d: Download) -> None:
        if d.state == "cancelled":
            self.local.remove(d.repo)
        else:
            self.local.upsert(
                {
                    "repo": d.repo,
                    "state": d.state,
                    "message": d.message,
                    "fraction": 1.0 if d.state == "installed" else d.fraction,
                    "speed": d.speed,
                    "eta": d.eta,
                    "disk": d.done,
                }
            )
        self.download_changed.emit(d)

    def refresh_local(self) -> None:
        for m in local_models(self.models_dir):
            d = self.manager.downloads.get(m.repo)
            if d is not None and d.state != "installed":
                self._changed(d)
                continue
            self.local.upsert(
                {
                    "repo": m.repo,
                    "state": "installed" if m.installed else "partial",
                    "message": str(m.folder),
                    "fraction": 1.0 if m.installed else 0.0,
                    "speed": 0.0,
                    "eta": None,
                    "disk": m.disk_bytes,
                }
            )


def _gptq_packing(s: Scheme) -> tuple[int, int] | None:
    """A GPTQ model's (bits, group size) where the listing knows both, else None."""
    if s.gptq and s.gptq_bits and s.gptq_group is not None:
        return s.gptq_bits, s.gptq_group
    return None


def _gpu_fit(shape: Shape, s: Scheme, weight_bytes: int, gpu: GpuInfo, context: int) -> Fit:
    layout = model_layout_bytes(shape, s.v, s.k, s.kr or 0, gpu.plan_gpu) if s.v and s.k else 0
    gptq = _gptq_packing(s)
    unpacked = gptq_zero_bytes(shape, *gptq) if gptq else 0  # zero points unpacked at load
    held = gpu.engine_bytes or 0  # the engine unloads its model before loading another
    return fit(shape, weight_bytes, gpu.free, context, layout, unpacked, held, gpu.free_known)


def _cpu_fit(
    shape: Shape, s: Scheme, weight_bytes: int, context: int, available: int | None
) -> CpuFit:
    quantized = bool(s.gptq or (s.v and s.k))
    return cpu_fit(shape, weight_bytes, quantized, context, available, _gptq_packing(s))
