"""The app as a process: killed mid-answer it loses nothing; with the real engine it answers;
and what a user sees, in light and dark themes."""

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from app.store import Store

from .conftest import FAKE_ENGINE, make_app, wait_until

KILLED_APP = """
import asyncio, sys
from pathlib import Path
from app.__main__ import App
app = App(Path(sys.argv[1]), model="demo", theme="light")
app.window.show()
async def go():
    await app.ctrl.start_engine()
    app.window.chat.input.setPlainText("slow")
    app.window.chat._send()
    app.window.chat.input.setPlainText("an unsent draft")
    while app.ctrl.messages.rows[-1].content.count("word") < 30:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.7)  # past the draft's debounce and a save of the partial answer
    print("STREAMING", flush=True)
    await asyncio.sleep(60)
app.loop.run_until_complete(go())
"""


def test_history_survives_a_killed_app(tmp_path):
    env = dict(
        os.environ,
        QT_QPA_PLATFORM="offscreen",
        VPTQ_CHAT_ENGINE_CMD=f"{sys.executable} {FAKE_ENGINE}",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_APP, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "STREAMING"
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(10)
    finally:
        proc.kill()
    store = Store(tmp_path / "history.sqlite3")
    conv = store.conversations()[0]
    msgs = store.messages(conv.id)
    assert [m.role for m in msgs] == ["user", "assistant"]
    assert msgs[1].content.count("word") >= 30 and msgs[1].status == "stopped"
    assert conv.draft == "an unsent draft"


QUIT_WHILE_THE_HUB_WAITS = """
import asyncio, sys
from pathlib import Path
from app.__main__ import App
app = App(Path(sys.argv[1]), model="demo", theme="light")
app.window.show()
async def go():
    await app.ctrl.start_engine()
    app.show_models()  # the catalogue's request, to a hub that never answers
    await asyncio.sleep(1.0)
    await app.close()
app.loop.run_until_complete(go())
print("CLOSED", flush=True)
"""


def test_quitting_while_the_hub_has_not_answered_ends_the_app_cleanly(tmp_path):
    """The Models window asks the hub for its catalogue in a thread; quitting before the hub
    answers (an unreachable mirror takes its timeout) made Qt abort the app at exit (its
    QThread destroyed while running), a crash at every such quit."""
    import socket

    from app.settings import Settings

    silent = socket.socket()  # takes connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    Settings(hub_endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}").save(
        tmp_path / "settings.json"
    )
    env = dict(
        os.environ,
        QT_QPA_PLATFORM="offscreen",
        VPTQ_CHAT_ENGINE_CMD=f"{sys.executable} {FAKE_ENGINE}",
        VPTQ_CHAT_MODELS=str(tmp_path / "models"),
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", QUIT_WHILE_THE_HUB_WAITS, str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        silent.close()
    assert done.stdout.strip() == "CLOSED"
    assert done.returncode == 0 and "QThread" not in done.stderr, done.stderr[-2000:]


QUIT_WHILE_DOWNLOADING = """
import asyncio, sys
from pathlib import Path
from app.__main__ import App
app = App(Path(sys.argv[1]), model="demo", theme="light")
app.window.show()
async def go():
    await app.ctrl.start_engine()
    app.browser.start(sys.argv[2])
    while app.downloads.downloads[sys.argv[2]].state != "downloading":
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # into the file's body, which stalls
    await app.close()
app.loop.run_until_complete(go())
print("CLOSED", flush=True)
"""


def test_quitting_during_a_stalled_download_ends_the_app_and_keeps_the_part(tmp_path):
    """A download waits on a silent connection until its read timeout (30 s) and then retries;
    quitting meanwhile left the process running that long after its window closed (the exit
    joined the download's thread). It ends at once; the part downloaded stays for the next
    start."""
    from .fake_hub import FakeHub, Repo
    from .test_hub import payload

    repo = "VPTQ-community/Meta-Llama-3.1-8B-Instruct-v8-k65536-0-woft"
    with FakeHub() as hub:
        hub.stall_seconds = 120
        hub.add(Repo(repo, {"config.json": b"{}", "model.safetensors": payload(4_000_000, 3)}))
        hub.fail(repo, "model.safetensors", "stall")
        from app.settings import Settings

        Settings(hub_endpoint=hub.url).save(tmp_path / "settings.json")
        env = dict(
            os.environ,
            QT_QPA_PLATFORM="offscreen",
            VPTQ_CHAT_ENGINE_CMD=f"{sys.executable} {FAKE_ENGINE}",
            VPTQ_CHAT_MODELS=str(tmp_path / "models"),
        )
        done = subprocess.run(
            [sys.executable, "-c", QUIT_WHILE_DOWNLOADING, str(tmp_path), repo],
            env=env,
            capture_output=True,
            text=True,
            timeout=25,
        )  # fmt: skip (25 s: under the read timeout, so a wait for the thread fails here)
    assert done.stdout.strip() == "CLOSED" and done.returncode == 0, done.stderr[-2000:]
    parts = list((tmp_path / "models" / repo).rglob("*.part"))
    assert [p.name for p in parts] == ["model.safetensors.part"] and parts[0].stat().st_size > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_closes_the_app_as_quit_does_and_a_load_is_saved_at_once(tmp_path, sig):
    """`python -m app` as a user starts it. The model a load chose was saved only at quit, and
    a SIGTERM (logout, `kill`), Ctrl+C or a closed terminal ended the app at once: the next
    start loaded the model before. Now the load is saved when it is done, and the signal closes
    the window as Quit does: the engine is stopped, the window's place saved, exit status 0."""
    import json
    import time

    data, model = tmp_path / "data", str(tmp_path / "chosen-model")
    env = dict(
        os.environ,
        QT_QPA_PLATFORM="offscreen",
        VPTQ_CHAT_DATA=str(data),
        VPTQ_CHAT_ENGINE_CMD=f"{sys.executable} {FAKE_ENGINE}",
        VPTQ_CHAT_MODELS=str(tmp_path / "models"),
        FAKE_ENGINE_PIDS=str(tmp_path / "engine.pids"),
    )
    from app.settings import Settings

    settings = data / "settings.json"
    Settings(first_run_done=True).save(settings)  # no save at the first run's check
    proc = subprocess.Popen([sys.executable, "-m", "app", "--model", model], env=env, text=True)

    def saved() -> dict:
        try:
            return json.loads(settings.read_text())
        except (OSError, ValueError):
            return {}

    try:
        deadline = time.monotonic() + 60
        while saved().get("model") != model:  # saved once the engine loaded it
            assert proc.poll() is None and time.monotonic() < deadline, saved()
            time.sleep(0.1)
        settings.unlink()  # written again by the shutdown, not by the load
        (engine,) = map(int, (tmp_path / "engine.pids").read_text().split())
        proc.send_signal(sig)
        assert proc.wait(30) == 0  # killed by the signal: -15, -2 or -1
    finally:
        proc.kill()
    assert saved()["model"] == model and saved()["window"]  # the window's place, at the close
    with pytest.raises(ProcessLookupError):  # the engine was stopped, not left running
        for _ in range(50):
            os.kill(engine, 0)
            time.sleep(0.1)


@pytest.mark.e2e
def test_real_engine_with_the_demo_model(tmp_path, qloop, monkeypatch, demo_path):
    app = make_app(tmp_path, qloop, monkeypatch, engine=None)
    try:
        app.ctrl.store.update_conversation(
            app.ctrl.new_conversation(), sampling={"temperature": 0, "max_new_tokens": 30}
        )
        app.ctrl.open(app.ctrl.current)
        app.window.chat.input.setPlainText("What is the capital of France?")
        app.window.chat._send()
        wait_until(
            qloop,
            lambda: app.ctrl.messages.rows[-1].status == "done",
            timeout=120,
            what="the demo model's answer",
        )
        assert "Paris" in app.ctrl.messages.rows[-1].content
        assert app.client.loaded["kernels"] == "reference"
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def luminance(c) -> float:
    """WCAG relative luminance of a QColor."""

    def lin(v: float) -> float:
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    return 0.2126 * lin(c.redF()) + 0.7152 * lin(c.greenF()) + 0.0722 * lin(c.blueF())


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_screenshot_in_both_themes(tmp_path, qloop, monkeypatch, theme):
    """The window with a streamed answer, as a PNG (kept in $VPTQ_CHAT_SCREENSHOTS if set)."""
    app = make_app(tmp_path, qloop, monkeypatch, theme=theme)
    try:
        app.window.chat.input.setPlainText(
            "Show me **bold** text; type ``` to open a block:\n```python\nx = 1\n```\n"
            "1. In a list:\n   ```bash\n   ls -l\n   ```\n2. Done."
        )
        app.window.chat._send()
        wait_until(qloop, lambda: app.ctrl.messages.rows[-1].status == "done")
        qloop.run_until_complete(asyncio.sleep(0.2))  # the last repaint lands
        image = app.window.grab().toImage()
        out = os.environ.get("VPTQ_CHAT_SCREENSHOTS")
        if out:
            image.save(os.path.join(out, f"window-{theme}.png"))
        # the theme is real: the window background is light or dark
        bg = image.pixelColor(5, image.height() // 2).lightness()
        assert (bg > 160) if theme == "light" else (bg < 90)
        # links stand out from the background (the default blue on the dark theme did not):
        # WCAG's contrast ratio of at least 4.5
        from PySide6.QtGui import QPalette

        link = app.window.palette().color(QPalette.ColorRole.Link)
        back = image.pixelColor(5, image.height() // 2)
        bright = sorted((luminance(link), luminance(back)))
        assert (bright[1] + 0.05) / (bright[0] + 0.05) >= 4.5
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()
