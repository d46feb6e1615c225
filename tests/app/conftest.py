"""GUI fixtures: offscreen Qt, one qasync loop, the real App wired to the fake engine."""

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
import pytestqt.plugin

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")


@pytest.fixture(scope="session")
def qloop(qapp):
    from app.event_loop import QtAsyncLoop

    loop = QtAsyncLoop(qapp)
    asyncio.set_event_loop(loop)
    # pytest-qt processes Qt's events after each test and around its teardown, outside the
    # loop: a chat's task resumed there by the engine's events (a test that ends mid-answer)
    # died with "Queue ... is bound to a different event loop". Its passes run as the loop's.
    plain = pytestqt.plugin._process_events
    pytestqt.plugin._process_events = loop.process_events
    yield loop
    pytestqt.plugin._process_events = plain
    loop.close()  # before Qt goes away, not in a finalizer at exit


def wait_until(loop, predicate, timeout=20.0, what="condition"):
    """Run the Qt + asyncio loop until ``predicate()`` holds."""

    async def poll():
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    loop.run_until_complete(poll())


def last_request(log, type_: str) -> dict:
    """The last request of ``type_`` the fake engine logged ($FAKE_ENGINE_LOG): the live panel
    asks for stats every second, so the log's last line can be one of those (a loaded CI run
    read a stats request where it expected the continuation's generate)."""
    requests = [json.loads(line) for line in Path(log).read_text().splitlines()]
    return [r for r in requests if r["type"] == type_][-1]


def make_app(tmp_path, loop, monkeypatch, engine=FAKE_ENGINE, theme="light", model="demo"):
    from app.__main__ import App

    if engine is not None:
        monkeypatch.setenv("VPTQ_CHAT_ENGINE_CMD", f"{sys.executable} {engine}")
    else:
        monkeypatch.delenv("VPTQ_CHAT_ENGINE_CMD", raising=False)
    monkeypatch.setenv("VPTQ_CHAT_MODELS", str(tmp_path / "models"))
    app = App(tmp_path, model=model, theme=theme, loop=loop)
    app.window.resize(1100, 760)
    app.window.show()
    loop.run_until_complete(app.ctrl.start_engine())
    return app


@pytest.fixture
def gui(tmp_path, qloop, monkeypatch):
    app = make_app(tmp_path, qloop, monkeypatch)
    yield app
    qloop.run_until_complete(app.close())
    app.window.close()
