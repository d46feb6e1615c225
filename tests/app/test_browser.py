"""The Models window on the real App against the fake hub: browse, filter, fit, download,
load; and a model downloaded from the fake hub answering in the real engine."""

import asyncio
import json
import os
import subprocess
import sys

import pytest
from PySide6.QtCore import Qt

from app.browser import EntryRole
from app.fit import gib
from app.gpu import GpuInfo
from app.settings import Settings
from engine.paths import INSTALLED_MARKER

from .conftest import make_app, wait_until
from .fake_hub import FakeHub, Repo
from .test_hub import payload

GiB = 1 << 30
LLAMA_8B = {  # the fields of Meta-Llama-3.1-8B-Instruct's config.json that decide memory
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "max_position_embeddings": 131072, "torch_dtype": "float16",
}  # fmt: skip
SMALL = "VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-0-woft"


class FakeGpus:
    """One 24 GB GPU with 16 GiB free, and another process holding 3 GiB."""

    error = None
    available = True

    def read(self, engine_pid=None):
        return [GpuInfo(0, "GPU-1234", "Test GPU 24GB", 24 * GiB, 8 * GiB, 16 * GiB, 3, 40)]

    def processes(self, index):
        return [(4242, "blender", 3 * GiB)]


def catalogue_hub() -> FakeHub:
    hub = FakeHub()
    files = {
        "config.json": json.dumps(LLAMA_8B).encode(),
        "model-00001-of-00001.safetensors": payload(400_000, 7),
        "tokenizer.json": b"{}",
    }
    hub.add(Repo(SMALL, files, downloads=900))
    hub.add(Repo("VPTQ-community/Meta-Llama-3.1-70B-Instruct-v8-k65536-256-woft", {}, 800))
    hub.add(Repo("VPTQ-community/Qwen2.5-7B-Instruct-v16-k65536-65536-woft", {}, 700))
    return hub


@pytest.fixture
def browser_app(tmp_path, qloop, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    with catalogue_hub() as hub:
        hub.stall_seconds = 1.0
        Settings(hub_endpoint=hub.url).save(tmp_path / "settings.json")
        # the engine sees FakeGpus' GPU (torch's UUIDs lack NVML's "GPU-")
        cuda = [{"index": 0, "name": "Test GPU 24GB", "uuid": "1234"}]
        monkeypatch.setenv("FAKE_ENGINE_CUDA", json.dumps(cuda))
        theme = os.environ.get("VPTQ_CHAT_SCREENSHOT_THEME", "light")  # for looking at both
        app = make_app(tmp_path, qloop, monkeypatch, theme=theme)
        app.browser.gpus = FakeGpus()
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)  # progress in small steps
        try:
            yield app, hub
        finally:
            qloop.run_until_complete(app.close())
            app.window.close()


def save_shots(window, qloop, name):
    """With VPTQ_CHAT_SCREENSHOTS=DIR, the window at 1100 x 720 and 780 x 420 as DIR/name-W.png,
    for looking at."""
    if shots := os.environ.get("VPTQ_CHAT_SCREENSHOTS"):
        for size in ((1100, 720), (780, 420)):
            window.resize(*size)
            qloop.run_until_complete(asyncio.sleep(0.2))
            window.grab().save(os.path.join(shots, f"{name}-{size[0]}.png"))


def open_models(app, qloop):
    """The Models window at 1100 x 720 once the fake hub's three models are listed."""
    app.show_models()
    w = app.models_window
    w.resize(1100, 720)
    wait_until(qloop, lambda: app.browser.catalogue.rowCount() == 3, what="the catalogue")
    return w, w.browse


def test_browse_filter_fit_download_and_load(browser_app, qloop, tmp_path, monkeypatch):
    app, hub = browser_app
    app.browser.host_available = lambda: 64 * GiB
    w, browse = open_models(app, qloop)
    assert "3 models from http://127.0.0.1" in browse.note.text()
    assert [browse.family.itemText(i) for i in range(browse.family.count())] == [
        "Any base model", "Llama 3.1", "Qwen 2.5"
    ]  # fmt: skip
    browse.bits.setCurrentIndex(browse.bits.findData(2))  # <= 2 bits: the 3-bit 70B goes
    assert app.browser.filtered.rowCount() == 2
    browse.family.setCurrentIndex(browse.family.findData("Qwen 2.5"))
    assert app.browser.filtered.rowCount() == 1
    browse.family.setCurrentIndex(0)

    row = next(
        r for r in range(app.browser.filtered.rowCount())
        if app.browser.filtered.index(r, 0).data().startswith("Meta-Llama-3.1-8B")
    )  # fmt: skip
    browse.table.setCurrentIndex(app.browser.filtered.index(row, 0))
    # one line a model, long names elided in the middle; the base model in the tooltip
    heads = [app.browser.filtered.headerData(c, Qt.Orientation.Horizontal) for c in range(7)]
    assert heads == ["Model", "Params", "Bits", "Vector", "Codebook", "Residual", "Downloads"]
    assert not browse.table.wordWrap()
    assert browse.table.textElideMode() == Qt.TextElideMode.ElideMiddle
    tip = app.browser.filtered.index(row, 0).data(Qt.ItemDataRole.ToolTipRole)
    assert "base model Meta-Llama-3.1-8B-Instruct" in tip
    assert [app.browser.filtered.index(row, c).data() for c in (1, 2, 3)] == ["8B", "2.00", "8"]
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    total = sum(len(b) for b in hub.repos[SMALL].files.values())
    assert f"Download size {total / 1000:.1f} KB in 3 files" in detail.size.text()
    assert "already on disk 0 B" in detail.size.text()
    assert "Fits" in detail.verdict.text()
    text = detail.breakdown.text()
    assert "Weights 391 KiB" in text and "KV cache at 4096 tokens 0.50 GiB" in text
    assert "Largest context that fits: 123392 tokens" in text  # (16 GiB - overhead) / 128 KiB
    assert "Fast decode layout 3.46 GiB: fits too" in text  # v8-k65536-0 (test_fit.py by hand)
    detail.context.setValue(131072)  # 16 GiB of KV cache alone
    assert "Does not fit" in detail.verdict.text()
    assert "Fast decode layout 3.46 GiB: no room at this context" in (detail.breakdown.text())
    assert "To make room, close: blender (pid 4242): 3.2 GB" in detail.breakdown.text()
    # the CPU is a choice too, last
    assert [detail.gpu.itemText(i) for i in range(detail.gpu.count())] == [
        "GPU 0 (16.00 GiB free): Test GPU 24GB",
        "CPU (slow)",
    ]
    detail.gpu.setCurrentIndex(1)
    # float32: 29.92 GiB of weights, 32 GiB of KV cache, 0.22 of workspace: 62.14 of 64 GiB
    assert detail.verdict.text().endswith("Tight</b> in memory. On the CPU it runs slowly.")
    assert "a KV cache of 131072 tokens 32.00 GiB" in detail.breakdown.text()
    detail.context.setValue(4096)
    assert "Fits</b> in memory" in detail.verdict.text()
    detail.gpu.setCurrentIndex(0)
    detail.context.setValue(131072)
    assert "Does not fit</b>" in detail.verdict.text()
    # in a small window the eight lines scroll instead of losing the last ones
    w.resize(780, 420)
    qloop.run_until_complete(asyncio.sleep(0.2))
    label = detail.breakdown
    assert label.height() >= label.heightForWidth(label.width()) > 0
    w.resize(1100, 720)

    detail.download.click()
    wait_until(qloop, lambda: "Installed" in detail.state.text(), what="the download")
    assert detail.progress.value() == 100
    assert f"already on disk {total / 1000:.1f} KB." in detail.size.text()  # (it kept 0 B)
    # installed, but Load in chat waits for a context that fits (the engine would refuse
    # 131072 tokens after letting the loaded model go)
    assert not detail.load.isEnabled() and "does not fit" in detail.load.toolTip()
    folder = tmp_path / "models" / SMALL
    assert (folder / "model-00001-of-00001.safetensors").read_bytes() == payload(400_000, 7)
    rows = app.browser.local.rows
    assert [(r["repo"], r["state"]) for r in rows] == [(SMALL, "installed")]
    w.tabs.setCurrentIndex(1)
    local = w.local
    assert enabled_buttons(local) == []  # nothing selected yet
    local.table.setCurrentIndex(app.browser.local.index(0, 0))
    # here too the load waits for a context that fits (on the GPU the engine loads on)
    assert enabled_buttons(local) == ["Delete…"]
    assert "Does not fit</b> on GPU 0 (Test GPU 24GB) at 131072 tokens" in local.fit.text()
    # the total takes the room beside the buttons: one line, not wrapped into a corner
    qloop.run_until_complete(asyncio.sleep(0.1))
    assert local.total.text() == "1 model, 400.2 KB on disk"
    total = local.total
    assert total.heightForWidth(total.width()) < 2 * total.fontMetrics().lineSpacing()
    shots = os.environ.get("VPTQ_CHAT_SCREENSHOTS")
    if shots:
        w.tabs.setCurrentIndex(0)
        qloop.run_until_complete(__import__("asyncio").sleep(0.1))
        w.grab().save(os.path.join(shots, "models-browse.png"))
        w.tabs.setCurrentIndex(1)
        qloop.run_until_complete(__import__("asyncio").sleep(0.1))
        w.grab().save(os.path.join(shots, "models-installed.png"))
        w.resize(780, 420)
        qloop.run_until_complete(__import__("asyncio").sleep(0.1))
        w.grab().save(os.path.join(shots, "models-installed-small.png"))
        w.resize(1100, 720)
    # Load in chat loads with the context the fit was checked at, and keeps it
    sent = []
    real_load = app.ctrl.client.load

    async def load(path, **kw):
        sent.append((path, kw["max_seq_len"]))
        return await real_load(path, **kw)

    monkeypatch.setattr(app.ctrl.client, "load", load)
    assert app.settings.context == 4096
    detail.context.setValue(8192)
    assert detail.load.isEnabled()
    assert detail.load.toolTip() == "Loads on the device of the fit, at this context"
    detail.load.click()
    wait_until(qloop, lambda: app.settings.model == str(folder), what="the load")
    assert sent == [(str(folder), 8192)] and app.settings.context == 8192
    # named by its repo id, not its folder's path under the models folder
    assert app.window.statusBar().currentMessage() == f"{SMALL} ready: 2048 tokens of context"
    assert app.window.panel.engine.text().startswith(f"{SMALL} (vptq) on ")
    app.window._load(str(folder))  # a later load (Model menu, the next start) takes it too
    wait_until(qloop, lambda: len(sent) == 2, what="the second load")
    assert sent[1] == (str(folder), 8192)


class GpusWithTheEngine(FakeGpus):
    """8 GiB free; the app's engine (pid 4343) holds 6 GiB of it with the model loaded now."""

    def read(self, engine_pid=None):
        held = 6 * GiB if engine_pid == 4343 else None
        return [GpuInfo(0, "GPU-1234", "Test GPU 24GB", 24 * GiB, 16 * GiB, 8 * GiB, 3, 40, held)]

    def processes(self, index):
        return [(4343, "python3", 6 * GiB), (4242, "blender", 3 * GiB)]


def test_the_fit_counts_the_loaded_model_as_room(browser_app, qloop):
    """The engine unloads its model before it loads another, so what it holds is room for the
    next one; it is not among what to close. (It took only NVML's free memory: a model that
    would fit once the loaded one is gone read "does not fit".)"""
    app, _ = browser_app
    assert app.client.proc and app.browser.engine_pid() == app.client.proc.pid  # the app's wiring
    app.browser.gpus = GpusWithTheEngine()
    app.browser.engine_pid = lambda: 4343
    w, browse = open_models(app, qloop)
    browse.table.setCurrentIndex(app.browser.filtered.index(0, 0))  # the 8B
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    detail.context.setValue(65536)  # 8 GiB of KV cache: more than NVML's 8 GiB free alone
    assert "Fits" in detail.verdict.text()
    lines = detail.breakdown.text().split("<br>")
    assert lines[3] == (
        "Needed 8.92 GiB of 14.00 GiB free (with the 6.00 GiB of the model loaded now, which is "
        "unloaded first)"
    )  # 391 KiB of weights, 8 GiB of KV cache, 0.75 GiB of CUDA context, 179,283,968 bytes
    # of workspace (as in the CPU test below): 8.917 GiB; the rest of 14 GiB over 128 KiB a
    # token is 107,173 tokens, in steps of 256:
    assert lines[4] == "Largest context that fits: 107008 tokens"
    detail.context.setValue(131072)
    assert "Does not fit" in detail.verdict.text()
    assert "To make room, close: blender (pid 4242): 3.2 GB" in detail.breakdown.text()
    assert "python3" not in detail.breakdown.text()  # not the app's own engine
    # the largest context that fits is offered as a link, which sets the context
    offer = "Largest context that fits: 107008 tokens (<a href='107008'>use it</a>)"
    assert offer in detail.breakdown.text().split("<br>")
    save_shots(w, qloop, "models-room")
    detail.breakdown.linkActivated.emit("107008")
    assert detail.context.value() == 107008 and app.browser.context == 107008
    assert "Tight" in detail.verdict.text()  # 13.98 of 14 GiB
    assert "use it" not in detail.breakdown.text()
    alone = app.browser.fit(65536, GpusWithTheEngine().read(None)[0])  # no engine running
    assert (alone.verdict, alone.free, alone.reclaimed) == ("does not fit", 8 * GiB, 0)
    assert "Needed 8.92 GiB of 8.00 GiB free" in alone.lines()


class ThreeGpus(FakeGpus):
    """NVML's order: a 24 GB card (the engine's CUDA device 1), an 8 GB one with 1 GiB free
    (CUDA 0), and one the engine does not see (CUDA_VISIBLE_DEVICES)."""

    def read(self, engine_pid=None):
        return [
            GpuInfo(0, "GPU-AAAA", "Big GPU 24GB", 24 * GiB, 8 * GiB, 16 * GiB, 3, 40),
            GpuInfo(1, "GPU-BBBB", "Small GPU 8GB", 8 * GiB, 7 * GiB, 1 * GiB, 3, 40),
            GpuInfo(2, "GPU-CCCC", "Hidden GPU", 8 * GiB, 0, 8 * GiB, 0, 30),
        ]

    def processes(self, index):
        return []


ENGINE_CUDA = [  # as the engine's hello lists them: torch's UUIDs have no "GPU-", lower case
    {"index": 0, "name": "Small GPU 8GB", "uuid": "bbbb"},
    {"index": 1, "name": "Big GPU 24GB", "uuid": "aaaa"},
]


class LongNamedGpus(FakeGpus):
    def read(self, engine_pid=None):
        name = "NVIDIA GeForce RTX 4090 Laptop GPU"
        return [GpuInfo(0, "GPU-1234", name, 16 * GiB, 8 * GiB, 8 * GiB, 3, 40)]


def test_fit_on_shows_the_free_memory_of_a_gpu_with_a_long_name(browser_app, qloop):
    """Fit on's box cut a long GPU name's end, and with it the free memory the choice is
    about ("GPU 0: NVIDIA GeForce R", the Models window at 780 px): the free memory comes
    first and stays in view."""
    app, _ = browser_app
    app.browser.gpus = LongNamedGpus()
    w, browse = open_models(app, qloop)
    w.resize(780, 420)
    browse.table.setCurrentIndex(app.browser.filtered.index(0, 0))
    box = browse.detail.gpu
    wait_until(qloop, lambda: "Download size" in browse.detail.size.text(), what="the details")
    qloop.run_until_complete(asyncio.sleep(0.2))  # layouts settle
    text = box.currentText()
    assert text == "GPU 0 (8.00 GiB free): NVIDIA GeForce RTX 4090 Laptop GPU"
    seen = text[: text.index("free") + len("free")]
    arrow = 30  # the drop-down's arrow and margins
    assert box.fontMetrics().horizontalAdvance(seen) <= box.width() - arrow, (box.width(), seen)


def test_fit_on_lists_the_devices_before_a_model_is_chosen(browser_app, qloop):
    """Fit on stood empty until a model was selected: it lists the GPUs and the CPU as the
    window opens, starting where loads go, and the CPU alone where NVML shows no GPU."""
    app, _ = browser_app
    _, browse = open_models(app, qloop)
    box = browse.detail.gpu
    assert browse.detail.repo is None
    assert [box.itemText(i) for i in range(box.count())] == [
        "GPU 0 (16.00 GiB free): Test GPU 24GB",
        "CPU (slow)",
    ]
    assert box.currentIndex() == 0
    app.models_window.hide()
    app.browser.gpus = NoGpus()
    app.show_models()
    assert [box.itemText(i) for i in range(box.count())] == ["CPU (slow)"]


def test_details_read_the_gpus_once(browser_app, qloop):
    """A model's details read NVML once: Fit on's list and where loads go came from two reads
    (each a call per GPU, and the two could disagree)."""
    app, _ = browser_app
    reads = []

    class Counted(FakeGpus):
        def read(self, engine_pid=None):
            reads.append(engine_pid)
            return super().read(engine_pid)

    app.browser.gpus = Counted()
    _, browse = open_models(app, qloop)
    browse.table.setCurrentIndex(app.browser.filtered.index(0, 0))
    wait_until(qloop, lambda: "Download size" in browse.detail.size.text(), what="the details")
    reads.clear()
    browse.detail.show_details(app.browser.details)
    assert len(reads) == 1
    assert browse.detail.gpu.currentText() == "GPU 0 (16.00 GiB free): Test GPU 24GB"


def loads(requests) -> list[dict]:
    """The load requests the fake engine received: (path, device, context) each."""
    lines = [json.loads(x) for x in requests.read_text().splitlines()] if requests.exists() else []
    return [(r["path"], r.get("device"), r["max_seq_len"]) for r in lines if r["type"] == "load"]


def test_load_goes_to_the_gpu_of_the_fit_and_the_installed_list_checks_the_fit(
    browser_app, qloop, tmp_path, monkeypatch
):
    """Load in chat loads on the GPU the fit was checked on, numbered as the engine numbers
    it (matched by UUID: NVML's order differs from CUDA's); one the engine does not see cannot
    be chosen. The installed list shows the fit where its loads go (the last load's GPU), and
    where the model does not fit it loads only at a context that does."""
    app, _ = browser_app
    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    monkeypatch.setenv("FAKE_ENGINE_CUDA", json.dumps(ENGINE_CUDA))
    qloop.run_until_complete(app.ctrl.restart_engine())  # the engine with the two GPUs
    assert app.client.hello["cuda_devices"] == ENGINE_CUDA
    app.browser.gpus = ThreeGpus()
    w, browse = open_models(app, qloop)
    browse.table.setCurrentIndex(app.browser.filtered.index(0, 0))  # the 8B
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    assert [detail.gpu.itemText(i) for i in range(detail.gpu.count())] == [
        "GPU 0 (16.00 GiB free): Big GPU 24GB",
        "GPU 1 (1.00 GiB free): Small GPU 8GB",
        "GPU 2 (8.00 GiB free, not usable): Hidden GPU",
        "CPU (slow)",
    ]
    # Fit on starts where loads go now: auto is the engine's cuda:0, NVML's GPU 1
    assert detail.gpu.currentText() == "GPU 1 (1.00 GiB free): Small GPU 8GB"
    lines = detail.breakdown.text().split("<br>")
    assert "Does not fit" in detail.verdict.text()  # 1.42 GiB of 1 GiB; the big one holds it
    assert "It fits on GPU 0 (Big GPU 24GB) at this context: choose it under Fit on" in lines
    assert not any("Hidden GPU" in ln for ln in lines)  # not one the engine cannot use
    save_shots(w, qloop, "models-fit-default")
    detail.gpu.setCurrentIndex(0)  # the big one
    detail.download.click()
    wait_until(qloop, lambda: "Installed" in detail.state.text(), what="the download")
    folder = str(tmp_path / "models" / SMALL)
    assert detail.load.isEnabled()
    detail.load.click()
    wait_until(qloop, lambda: app.settings.model == folder, what="the load")
    assert loads(requests)[-1] == (folder, "cuda:1", 4096)  # NVML's GPU 0 is CUDA's 1
    assert app.settings.device == "cuda:1"
    detail.gpu.setCurrentIndex(2)  # the GPU the engine does not see
    assert not detail.load.isEnabled()
    unseen = (
        "The engine does not see GPU 2 (Hidden GPU): it sees CUDA device 0: Small GPU 8GB, "
        "1: Big GPU 24GB (CUDA_VISIBLE_DEVICES chooses them). Choose another."
    )
    assert detail.load.toolTip() == unseen
    # said, not only hovered, and first: under the breakdown it was out of view at 780 x 420
    assert detail.breakdown.text().startswith(f"<b>{unseen}</b><br>")
    save_shots(w, qloop, "models-unseen-gpu")
    detail.gpu.setCurrentIndex(3)  # the CPU
    assert detail.load.isEnabled()
    detail.gpu.setCurrentIndex(0)
    # and after a load, at the last load's GPU (the engine's cuda:0 is NVML's GPU 1)
    app.settings.device = "cuda:0"
    detail.show_details(app.browser.details)
    assert detail.gpu.currentText() == "GPU 1 (1.00 GiB free): Small GPU 8GB"
    app.settings.device = "cpu"
    detail.show_details(app.browser.details)
    assert detail.gpu.currentText() == "CPU (slow)"
    app.settings.device = "cuda:1"
    detail.show_details(app.browser.details)
    assert detail.gpu.currentIndex() == 0

    # the installed list: the fit on the last load's GPU (NVML's 0, the engine's cuda:1)
    w.tabs.setCurrentIndex(1)
    local = w.local
    local.table.setCurrentIndex(app.browser.local.index(0, 0))
    assert local.fit.isVisibleTo(w)
    assert local.fit.text().endswith(
        "Fits</b> on GPU 0 (Big GPU 24GB) at 4096 tokens of context: needs 1.42 GiB of "
        "16.00 GiB free."
    )  # 391 KiB of weights, 0.5 GiB of KV cache, 0.75 GiB + 179,283,968 bytes of overhead
    assert enabled_buttons(local) == ["Load in chat", "Delete…"]
    # deleting the model loaded now says what that means
    from PySide6.QtWidgets import QMessageBox

    asked = []
    monkeypatch.setattr(
        QMessageBox, "question", lambda *a: asked.append(a[2]) or QMessageBox.StandardButton.No
    )
    local.buttons["Delete…"].click()
    assert asked[0].startswith(f"Delete {SMALL} (400.2 KB on disk)?")
    assert "It is the model loaded now: it stays loaded until you load another" in asked[0]
    assert (tmp_path / "models" / SMALL).is_dir()  # answered No
    # one being loaded now (deleting it took its files from under the load, unsaid)
    state, last = app.client.state, app.client.last_load
    app.client.state, app.client.last_load = "loading", {"path": folder}
    local.buttons["Delete…"].click()
    assert "It is being loaded now: its load may fail for want of its files" in asked[1]
    assert "It is the model loaded now" not in asked[1]
    app.client.state, app.client.last_load = state, last
    w.tabs.setCurrentIndex(0)
    detail.context.setValue(131072)  # 16 GiB of KV cache alone
    w.tabs.setCurrentIndex(1)  # the tab shows the fit again at the new context
    text = local.fit.text()
    assert "Does not fit</b> on GPU 0 (Big GPU 24GB) at 131072 tokens of context" in text
    assert text.endswith(
        "needs 16.92 GiB of 16.00 GiB free. Largest context that fits: 123392 tokens "
        "(<a href='123392'>load with it</a>)."
    )
    assert enabled_buttons(local) == ["Delete…"]
    save_shots(w, qloop, "models-installed-fit")
    local.fit.linkActivated.emit("123392")  # loads with the context that fits
    wait_until(qloop, lambda: app.settings.context == 123392, what="the load at 123392")
    assert loads(requests)[-1] == (folder, "cuda:1", 123392)
    assert detail.context.value() == 123392  # the Browse tab's fit follows
    local.refresh_fit()
    assert "Tight</b> on GPU 0" in local.fit.text()
    assert enabled_buttons(local) == ["Load in chat", "Delete…"]

    # a saved GPU the engine no longer lists: the model loads on the engine's first one
    app.settings.device = "cuda:7"
    n = len(loads(requests))
    app.window._load(folder)
    wait_until(qloop, lambda: len(loads(requests)) > n, what="the load without cuda:7")
    assert loads(requests)[-1] == (folder, None, 123392)
    wait_until(qloop, lambda: app.client.state == "loaded", what="the model")
    assert app.settings.device == "auto"

    # an engine whose PyTorch sees no CUDA GPU (a CPU build): a GPU cannot be chosen, and the
    # installed list shows the CPU's fit, where its loads go
    monkeypatch.setenv("FAKE_ENGINE_CUDA", "[]")
    qloop.run_until_complete(app.ctrl.restart_engine())
    assert app.client.hello["cuda_devices"] == []
    w.tabs.setCurrentIndex(0)
    detail.show_details(app.browser.details)  # no GPU usable: Fit on starts at the CPU
    assert detail.gpu.currentText() == "CPU (slow)"
    assert detail.gpu.itemText(0).startswith("GPU 0 (16.00 GiB free, not usable): ")
    detail.gpu.setCurrentIndex(0)
    detail.context.setValue(4096)
    assert "Fits" in detail.verdict.text() and not detail.load.isEnabled()
    assert detail.load.toolTip().startswith("The engine's PyTorch sees no CUDA GPU")
    detail.gpu.setCurrentIndex(3)
    assert detail.load.isEnabled()
    w.tabs.setCurrentIndex(1)
    assert "on the CPU (slow) at 4096 tokens of context" in local.fit.text()


@pytest.mark.parametrize("dark", [False, True])
def test_the_verdicts_are_readable_in_both_themes(qapp, dark):
    """Each verdict's colour against the window of its theme: WCAG contrast of at least 4.5
    (the light theme's red and green were hard to read on the dark window)."""
    from PySide6.QtGui import QColor, QPalette
    from PySide6.QtWidgets import QLabel

    from app.__main__ import apply_theme
    from app.ui.browser import verdict_html

    from .test_app_process import luminance

    apply_theme(qapp, dark)
    try:
        label = QLabel()
        back = label.palette().color(QPalette.ColorRole.Window)
        for verdict in ("fits", "tight", "does not fit"):
            html = verdict_html(verdict, label)
            colour = QColor(html.split("color:")[1].split("'")[0])
            lo, hi = sorted((luminance(colour), luminance(back)))
            assert (hi + 0.05) / (lo + 0.05) >= 4.5, (verdict, colour.name(), back.name())
    finally:
        apply_theme(qapp, False)


class NoGpus:
    """A machine without an NVIDIA driver, as app/gpu.py reports it."""

    error = (
        "No NVIDIA GPU driver found (NVML Shared Library Not Found); the engine runs on the CPU."
    )
    available = False

    def read(self, engine_pid=None):
        return []

    def processes(self, index):
        return []


def test_without_a_gpu_the_fit_is_the_cpu_paths_memory_against_what_is_available(
    browser_app, qloop
):
    """The engine chooses and refuses with the same numbers (test_loader.py); float32
    Llama-3.1-8B: 29.92 GiB, with a 4096-token KV cache and the workspace 31.14 GiB (test_fit.py
    by hand; this fake's 400 KB of weights hold no packed layers beyond the two tables)."""
    app, _ = browser_app
    app.browser.gpus = NoGpus()
    app.browser.host_available = lambda: 12 * GiB
    w, browse = open_models(app, qloop)
    browse.table.setCurrentIndex(app.browser.filtered.index(0, 0))  # the 8B, most downloaded
    assert app.browser.filtered.index(0, 0).data().startswith("Meta-Llama-3.1-8B")
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    assert [detail.gpu.itemText(i) for i in range(detail.gpu.count())] == ["CPU (slow)"]
    assert detail.verdict.text().endswith(
        "Does not fit</b> in memory. No NVIDIA GPU: this model would run on the CPU (slow)."
    )
    # not even in bfloat16 (half of float32's bytes a value): 14.96 GiB of weights, a 0.50 GiB
    # KV cache and a workspace of 117,440,512 + 512 x (4 x 4096 + 3 x 14336) x 2 + 1,026,048
    lines = detail.breakdown.text().split("<br>")
    assert lines == [
        "On the CPU it takes about 15.62 GiB of memory (the weights as bfloat16 14.96 GiB, a KV "
        "cache of 4096 tokens 0.50 GiB, workspace 0.17 GiB)",
        "In bfloat16: in float32 it would take 31.14 GiB (bfloat16 prompts are slower on CPUs "
        "without AVX-512 BF16)",
        "Needed 15.62 GiB of 12.00 GiB available",
        "The weights alone do not fit",  # no smaller context to offer
        NoGpus.error,
    ]
    app.browser.host_available = lambda: 16 * GiB  # in bfloat16, tightly
    detail.context.setValue(4097)
    assert "Tight</b> in memory" in detail.verdict.text()
    assert "Largest context that fits: 7168 tokens" in detail.breakdown.text()
    app.browser.host_available = lambda: 64 * GiB
    detail.context.setValue(8192)  # 2 GiB of float32 KV cache
    assert "Fits</b> in memory" in detail.verdict.text()
    text = detail.breakdown.text()
    assert "as float32" in text and "In bfloat16" not in text
    assert "Needed 32.14 GiB of 64.00 GiB available" in text
    assert "Largest context that fits: 131072 tokens" in text  # the model's own limit
    # in a small window the lines wrap: the details scroll down, never sideways
    w.resize(780, 420)
    qloop.run_until_complete(asyncio.sleep(0.2))
    scroll = detail.parentWidget().parentWidget()  # the QScrollArea's viewport's parent
    assert scroll.horizontalScrollBar().maximum() == 0
    assert detail.verdict.height() >= detail.verdict.heightForWidth(detail.verdict.width()) > 0
    save_shots(w, qloop, "models-cpu")


def test_where_nvml_cannot_be_read_the_fit_and_load_are_for_the_engines_gpu(browser_app, qloop):
    """A container without NVML whose CUDA works: Fit on listed only the CPU, the fit was the
    CPU's, and Load in chat loaded on the CPU. Now the GPUs are the engine's (its hello), the
    fit against the card's total, said so; a device the hello gives no size is left out."""
    from app.ui.browser import UNKNOWN_FREE, installed_fit_text

    app, _ = browser_app
    app.browser.gpus = NoGpus()
    app.client.hello["cuda_devices"] = [
        {"index": 0, "name": "NVIDIA H100", "uuid": "abcd", "total_bytes": 80 * GiB},
        {"index": 1, "name": "No size", "uuid": "ef01"},
    ]
    _, browse = open_models(app, qloop)
    browse.table.setCurrentIndex(app.browser.filtered.index(0, 0))  # the 8B
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    items = [detail.gpu.itemText(i) for i in range(detail.gpu.count())]
    assert items == ["GPU 0 (80.00 GiB total): NVIDIA H100", "CPU (slow)"]
    assert detail.gpu.currentIndex() == 0  # where loads go
    assert detail.gpu.toolTip() == items[0]  # a narrow box cuts the name: the whole in the tip
    detail.gpu.setCurrentIndex(1)
    assert detail.gpu.toolTip() == "CPU (slow)"
    detail.gpu.setCurrentIndex(0)
    assert "Fits" in detail.verdict.text()
    lines = detail.breakdown.text().split("<br>")
    assert "Needed 1.42 GiB of 80.00 GiB (the GPU's total)" in lines and lines[-1] == UNKNOWN_FREE
    gpu = detail.gpu.currentData()
    assert app.browser.load_device(gpu) == ("cuda:0", "")
    assert app.browser.engine_gpu() == gpu
    f = app.browser.fit(4096, gpu)
    assert f.free == 80 * GiB
    assert "needs" in (text := installed_fit_text(gpu, f, 4096, detail))
    assert "of its 80.00 GiB (its free memory is unknown)" in text
    app.browser.gpus = FakeGpus()  # NVML's list wins where it has one
    assert [g.name for g in app.browser.gpus_now()] == ["Test GPU 24GB"]

    class NoneListed(FakeGpus):  # NVML works and lists none: as it says (the check says why)
        def read(self, engine_pid=None):
            return []

    app.browser.gpus = NoneListed()
    assert app.browser.gpus_now() == []


GPTQ = "hugging-quants/Meta-Llama-3.1-8B-Instruct-GPTQ-INT4"


def test_owner_slash_words_finds_a_gptq_repo_that_downloads_without_unread_weights(
    browser_app, qloop, tmp_path
):
    app, hub = browser_app
    config = {**LLAMA_8B, "quantization_config": {"quant_method": "gptq", "bits": 4,
                                                  "group_size": 128}}  # fmt: skip
    files = {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": payload(300_000, 8),
        "pytorch_model.bin": payload(500_000, 9),  # the same weights again, for other tools
        "quantize_config.json": b'{"bits": 4}',
    }
    hub.add(Repo(GPTQ, files, downloads=50))
    hub.add(Repo("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4", {}, 40))
    app.show_models()
    browse = app.models_window.browse
    wait_until(qloop, lambda: app.browser.catalogue.rowCount() == 3, what="the catalogue")
    browse.search.setText("hugging-quants/gptq")  # typed: asked once typing pauses
    shown = app.browser.filtered
    wait_until(qloop, lambda: shown.rowCount() == 1 and "1 model from" in browse.note.text(),
               what="the owner's GPTQ repo")  # fmt: skip
    cells = [shown.index(0, c).data() for c in range(7)]
    assert cells == ["Meta-Llama-3.1-8B-Instruct-GPTQ-INT4", "8B", "4.00", "GPTQ", "–", "–", "50"]
    assert "GPTQ, 4 bits/weight" in shown.index(0, 0).data(Qt.ItemDataRole.ToolTipRole)
    browse.table.setCurrentIndex(shown.index(0, 0))
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    assert "GPTQ, 4 bits/weight" in detail.title.text()
    total = sum(len(b) for p, b in files.items() if not p.endswith(".bin"))
    assert f"Download size {total / 1000:.1f} KB in 3 files" in detail.size.text()
    assert "Fits" in detail.verdict.text()
    # the weights: the files plus the zero points unpacked at load, 3.5 bytes more a group and
    # column: 32 layers x 3.5 x (32 x (4096 + 1024 + 1024 + 4096 + 2 x 14336) + 112 x 4096)
    zeros = 32 * 7 * (32 * (4096 + 1024 + 1024 + 4096 + 2 * 14336) + 112 * 4096) // 2
    want = f"Weights {gib(300_000 + zeros)} (with {gib(zeros)} of zero points unpacked at load)"
    assert want in detail.breakdown.text()
    save_shots(app.models_window, qloop, "models-gptq")
    # on the CPU its packed tensors are what a load holds: the files (here smaller than the
    # two fp16 tables they would hold, so none of them counted), the zero points as above and
    # the fp16 scales as float32, 2 bytes more each of the same 54,525,952
    app.browser.host_available = lambda: 64 * GiB  # room for float32
    detail.gpu.setCurrentIndex(detail.gpu.count() - 1)  # CPU (slow), the last item
    packed = zeros + 2 * 32 * (32 * (4096 + 1024 + 1024 + 4096 + 2 * 14336) + 112 * 4096)
    wait_until(qloop, lambda: "On the CPU it runs slowly" in detail.verdict.text(),
               what="the CPU fit")  # fmt: skip
    assert f"their packed form up to {gib(packed)}" in detail.breakdown.text()
    save_shots(app.models_window, qloop, "models-gptq-cpu")
    detail.gpu.setCurrentIndex(0)
    detail.download.click()
    wait_until(qloop, lambda: detail.load.isEnabled(), what=f"the download {detail.state.text()}")
    folder = tmp_path / "models" / GPTQ
    assert (folder / "model.safetensors").read_bytes() == payload(300_000, 8)
    assert not (folder / "pytorch_model.bin").exists() and not hub.gets("pytorch_model.bin")


def enabled_buttons(local) -> list[str]:
    """The Downloads & installed tab's buttons that can be clicked now, in their order."""
    return [text for text, b in local.buttons.items() if b.isEnabled()]


def test_the_list_in_the_hub_order_cached_while_asked_and_the_last_search_wins(browser_app, qloop):
    app, hub = browser_app
    app.show_models()
    browse, rows = app.models_window.browse, app.browser.catalogue.rowCount
    wait_until(qloop, lambda: rows() == 3, what="the first list, which is cached")
    shown = app.browser.filtered

    def downloads():
        return [shown.index(r, 6).data() for r in range(shown.rowCount())]

    assert downloads() == ["900", "800", "700"]  # "Most downloaded": the hub's order
    browse.table.sortByColumn(6, Qt.SortOrder.AscendingOrder)  # a click on the header
    assert downloads() == ["700", "800", "900"]
    asked = len(hub.gets("/api/models"))
    browse.sort.setCurrentIndex(browse.sort.findData("recent"))  # asks the hub again
    assert downloads() == ["900", "800", "700"]  # the hub's order until its answer comes
    wait_until(qloop, lambda: len(hub.gets("/api/models")) > asked, what="the recent list")
    wait_until(qloop, lambda: "3 models from" in browse.note.text(), what="its answer")
    browse.sort.setCurrentIndex(browse.sort.findData("downloads"))
    hub.add(Repo("VPTQ-community/Qwen2.5-72B-Instruct-v8-k65536-0-woft", {}, 600))
    hub.list_delays[""] = 1.0  # a slow hub
    browse.refresh()
    wait_until(qloop, lambda: "Asking" in browse.note.text(), what="the note")
    assert rows() == 3 and "meanwhile, the list cached on" in browse.note.text()
    wait_until(qloop, lambda: rows() == 4, what="the hub's answer")
    assert "4 models from http://127.0.0.1" in browse.note.text()
    # a search answered after the one typed next is not shown over it
    hub.list_delays.update({"": 0.0, "qwen": 1.0})
    qloop.run_until_complete(asyncio.gather(
        app.browser.refresh("qwen"), app.browser.refresh(""),
    ))  # fmt: skip
    assert rows() == 4 and "4 models from" in browse.note.text()


def test_pause_and_resume_from_the_window(browser_app, qloop):
    app, hub = browser_app
    hub.fail(SMALL, "model-00001-of-00001.safetensors", "trickle")
    app.show_models()
    detail, local = app.models_window.browse.detail, app.models_window.local
    assert local.total.text() == "No models yet: pick one in Browse and press Download."
    wait_until(qloop, lambda: app.browser.catalogue.rowCount() == 3)
    rows = range(app.browser.filtered.rowCount())
    row = next(r for r in rows if app.browser.filtered.index(r, 0).data(EntryRole).id == SMALL)
    app.models_window.browse.table.setCurrentIndex(app.browser.filtered.index(row, 0))
    wait_until(qloop, lambda: detail.download.isEnabled(), what="the details")
    detail.download.click()
    d = None
    wait_until(
        qloop,
        lambda: (d := app.downloads.downloads.get(SMALL)) is not None and d.done > 20_000,
        what="some bytes",
    )
    assert local.total.text().startswith("1 model, ")
    local.table.setCurrentIndex(app.browser.local.index(0, 0))
    assert enabled_buttons(local) == ["Pause", "Cancel", "Delete…"]
    detail.pause.click()
    d = app.downloads.downloads[SMALL]
    assert d.state == "paused" and detail.download.text() == "Resume"
    assert enabled_buttons(local) == ["Resume", "Cancel", "Delete…"]
    wait_until(qloop, lambda: d.task.done(), what="the worker to stop")
    detail.download.click()
    wait_until(qloop, lambda: d.state == "installed", what="the resumed download")
    assert (hub.gets("model-00001")[-1][2] or "").startswith("bytes="), hub.requests


def test_cancel_from_the_list_takes_the_download_off_it(browser_app, qloop, tmp_path):
    """Cancel deletes the partial files, and its row leaves the Downloads & installed list."""
    app, hub = browser_app
    hub.fail(SMALL, "model-00001-of-00001.safetensors", "trickle")
    app.browser.start(SMALL)
    app.show_models()
    local = app.models_window.local
    wait_until(
        qloop,
        lambda: (d := app.downloads.downloads.get(SMALL)) is not None and d.done > 20_000,
        what="some bytes",
    )
    app.browser.refresh_local()  # as opening the window does: the download's own state
    [row] = app.browser.local.rows
    d = app.downloads.downloads[SMALL]
    assert (row["repo"], row["state"], row["fraction"]) == (SMALL, d.state, d.fraction)
    assert d.state == "downloading" and 0 < d.fraction < 1  # not a "partial" folder's 0
    local.table.setCurrentIndex(app.browser.local.index(0, 0))
    local.buttons["Cancel"].click()
    wait_until(qloop, lambda: app.downloads.downloads[SMALL].state == "cancelled", what="cancel")
    assert app.browser.local.rows == [] and not (tmp_path / "models" / SMALL).exists()
    assert local.total.text() == "No models yet: pick one in Browse and press Download."


def test_the_models_window_fits_the_screen(browser_app):
    from PySide6.QtGui import QGuiApplication

    app, _ = browser_app
    free = QGuiApplication.primaryScreen().availableGeometry()
    if free.width() >= 1000:  # a screenshot run under a wider Xvfb screen
        pytest.skip("needs a screen narrower than the window's 1000 px (offscreen: 800)")
    app.show_models()
    w = app.models_window
    assert free.contains(w.frameGeometry()), (free, w.frameGeometry())
    assert w.height() == 680 and w.width() >= free.width() * 0.9


def test_the_menus_show_their_whole_text_in_a_small_window(browser_app, qloop):
    """The text area of each menu (the style's edit field, arrow and frame excluded) holds what it
    shows at the smallest size the screenshots check: every item of the sort menu (it read "Most
    downloac"), and each filter's "Any ..." (it read "Any base mode")."""
    from PySide6.QtWidgets import QComboBox, QStyle, QStyleOptionComboBox

    app, _ = browser_app
    app.show_models()
    app.models_window.resize(780, 420)
    qloop.run_until_complete(asyncio.sleep(0.1))
    menus = {c.accessibleName(): c for c in app.models_window.findChildren(QComboBox)}

    def room(menu: QComboBox) -> int:
        opt = QStyleOptionComboBox()
        menu.initStyleOption(opt)
        field = menu.style().subControlRect(
            QStyle.ComplexControl.CC_ComboBox, opt, QStyle.SubControl.SC_ComboBoxEditField, menu
        )
        return field.width()

    sort = menus["Sort"]
    shown = [(sort, sort.itemText(i)) for i in range(sort.count())]
    names = ("Base model", "Parameters", "Bits", "Vector length", "Codebook", "Residual")
    shown += [(menus[n], menus[n].currentText()) for n in names]
    for menu, text in shown:
        assert room(menu) >= menu.fontMetrics().horizontalAdvance(text), (text, room(menu))


def test_download_buttons_follow_the_rows_state(browser_app):
    """Pause only where the manager can stop a transfer (not a queued one, which Cancel
    removes), Resume where there is something to resume."""
    app, _ = browser_app
    app.show_models()
    local, rows = app.models_window.local, app.browser.local
    row = dict(repo=SMALL, message="", fraction=0.0, speed=0.0, eta=None, disk=0)
    want = {
        "queued": ["Cancel", "Delete…"],
        "stalled": ["Pause", "Cancel", "Delete…"],
        "failed": ["Resume", "Cancel", "Delete…"],
        "partial": ["Resume", "Delete…"],
        "installed": ["Load in chat", "Delete…"],
    }
    for state, buttons in want.items():
        rows.upsert({**row, "state": state})
        local.table.setCurrentIndex(rows.index(0, 0))
        assert enabled_buttons(local) == buttons, state


def test_hub_settings_are_saved(browser_app, qloop, tmp_path, monkeypatch):
    app, _ = browser_app
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example")
    app.show_models()
    tab = app.models_window.hub_settings
    assert not tab.forget_button.isEnabled() and tab.status.text() == "No token stored."
    assert tab.endpoint.placeholderText() == "http://mirror.example"  # what an empty box means
    tab.proxy.setText("http://127.0.0.1:3128")
    tab.offline.setChecked(True)
    tab.token.setText("hf_abc")
    tab.save()
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["hub_proxy"] == "http://127.0.0.1:3128" and saved["hub_offline"] is True
    assert os.environ["HTTPS_PROXY"] == "http://127.0.0.1:3128"
    from huggingface_hub import get_token

    assert get_token() == "hf_abc" and tab.forget_button.isEnabled()
    tab.forget_button.click()
    assert get_token() is None and not tab.forget_button.isEnabled()
    tab.proxy.setText("")
    tab.offline.setChecked(False)
    tab.save()
    assert "HTTPS_PROXY" not in os.environ


@pytest.mark.e2e
def test_downloaded_model_answers_in_the_real_engine(tmp_path, demo_path, monkeypatch):
    """A VPTQ model (the demo, 8-bit rtn) served by the fake hub, downloaded by the manager,
    then run by `python -m engine generate` under its repo id."""
    import asyncio

    from app.downloads import DownloadManager
    from app.hub import Hub, HubSettings
    from engine.quantize import Recipe, quantize

    quantize(demo_path, tmp_path / "q", Recipe(2, 65536, 0, "rtn"), log=lambda m: None)
    repo = "VPTQ-community/SmolLM2-135M-Instruct-v2-k65536-0-rtn"
    with FakeHub() as hub:
        hub.add_folder(repo, tmp_path / "q")
        hub.fail(repo, "model-00001-of-00001.safetensors", "drop")

        async def download():
            m = DownloadManager(Hub(HubSettings(hub.url), tmp_path / "c"), tmp_path / "models")
            m.start(repo)
            d = await m.wait(repo)
            m.close()
            return d

        d = asyncio.run(download())
    assert d.state == "installed", d.message
    env = dict(os.environ, VPTQ_CHAT_MODELS=str(tmp_path / "models"))
    out = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", repo, "--chat", "--temperature",
         "0", "--max-new-tokens", "20", "--prompt", "What is the capital of France?"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_a_hub_error_shows_in_the_models_window_until_dismissed(browser_app, qloop):
    app, _ = browser_app
    w, _ = open_models(app, qloop)
    banner = w.error
    assert not banner.isVisibleTo(w)
    qloop.run_until_complete(app.browser.select("VPTQ-community/not-there"))
    assert banner.isVisibleTo(w)
    assert banner.text().startswith("⚠ ") and "VPTQ-community/not-there" in banner.text()
    save_shots(w, qloop, "models-error")
    banner.close_button.click()
    assert not banner.isVisibleTo(w)


def test_a_model_whose_config_gives_no_shape_says_why_and_still_loads(browser_app, qloop, tmp_path):
    """No config.json on the Hub (the fake hub's 70B), or an installed one without a field of
    the model's shape: no fit check, the reason said for the GPU and for the CPU, and Load in
    chat still possible once installed (the engine then says what is wrong)."""
    app, _ = browser_app
    w, browse = open_models(app, qloop)
    big = "VPTQ-community/Meta-Llama-3.1-70B-Instruct-v8-k65536-256-woft"
    shown = app.browser.filtered
    row = next(r for r in range(3) if shown.index(r, 0).data().startswith("Meta-Llama-3.1-70B"))
    browse.table.setCurrentIndex(shown.index(row, 0))
    detail = browse.detail
    wait_until(qloop, lambda: "Download size" in detail.size.text(), what="the details")
    why = f"No fit check: {big}: it has no config.json on the hub"
    assert (detail.verdict.text(), detail.breakdown.text()) == ("", why)
    detail.gpu.setCurrentIndex(detail.gpu.count() - 1)  # CPU (slow)
    assert (detail.verdict.text(), detail.breakdown.text()) == ("On the CPU it runs slowly.", why)
    save_shots(w, qloop, "models-no-config")
    # installed, with a config.json that lacks the number of layers
    folder = tmp_path / "models" / big
    folder.mkdir(parents=True)
    cfg = {k: v for k, v in LLAMA_8B.items() if k != "num_hidden_layers"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / INSTALLED_MARKER).write_text("{}")
    app.browser.refresh_local()
    w.tabs.setCurrentIndex(1)
    local = w.local
    local.table.setCurrentIndex(app.browser.local.index(0, 0))
    assert local.fit.text() == (
        "No fit check: its config.json does not say its shape (loading says why)."
    )
    assert enabled_buttons(local) == ["Load in chat", "Delete…"]


def test_before_the_engine_says_which_gpus_it_sees_no_gpu_is_refused(browser_app):
    """Until the engine's hello (while it starts or restarts) its GPUs are unknown: a load on a
    GPU goes to the settings' device (no device named), not refused as one it cannot see."""
    app, _ = browser_app
    gpu = FakeGpus().read()[0]
    assert app.browser.load_device(gpu) == ("cuda:0", "")  # the engine's hello: UUID 1234
    saved, app.client.hello = app.client.hello, {}
    try:
        assert app.browser.engine_devices() is None
        assert app.browser.load_device(gpu) == ("", "")
        assert app.browser.load_device(None) == ("cpu", "")
        assert app.browser.engine_gpu([gpu]) is None
    finally:
        app.client.hello = saved


def test_an_installed_models_fit_counts_only_its_weight_files(browser_app, tmp_path):
    """The installed list's fit: the weights are the safetensors on disk, not the tokenizer or
    the other files beside them."""
    app, _ = browser_app
    folder = tmp_path / "models" / SMALL
    (folder / "shards").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"w" * 1000)
    (folder / "shards" / "model-00002-of-00002.safetensors").write_bytes(b"w" * 24)
    (folder / "tokenizer.json").write_bytes(b"t" * 5000)
    (folder / INSTALLED_MARKER).write_text("{}")
    gpu, f = app.browser.installed_fit(SMALL, 4096)
    assert gpu is not None and gpu.uuid == "GPU-1234"  # the engine's cuda:0
    assert f.weights + f.host == 1024


def test_the_scroll_areas_tab_reaches_are_named_and_tab_leaves_the_catalogue(browser_app, qloop):
    """The scroll areas the keyboard reaches with Tab (the chat settings, a model's details) have
    names a screen reader says (they had none); Tab goes on from the catalogue (it went from
    cell to cell, and the keyboard could not leave a table of hundreds of models). (A walk of
    every window's Tab chain here made a later test crash at garbage collection: PySide's
    wrappers of Qt's own inner widgets.)"""
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication, QScrollArea

    app, _ = browser_app
    assert app.window.chat_settings.area.accessibleName() == "Chat settings"
    w, _ = open_models(app, qloop)
    w.browse.table.selectRow(0)
    assert "Model details" in [a.accessibleName() for a in w.browse.findChildren(QScrollArea)]
    w.activateWindow()
    wait_until(qloop, lambda: QApplication.activeWindow() is w)
    w.browse.table.setFocus()
    QTest.keyClick(w.browse.table, Qt.Key.Key_Tab)  # on from the catalogue, not to its next cell
    focused = QApplication.focusWidget().accessibleName()
    assert focused == "Model details"
