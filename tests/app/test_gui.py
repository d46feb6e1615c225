"""The real main window driven against the scripted fake engine."""

import asyncio
import json
import time
from pathlib import Path

import pytest
from PySide6.QtCore import QEvent, QObject
from PySide6.QtGui import QFontMetrics, QGuiApplication, QTextCursor
from PySide6.QtWidgets import QAbstractSlider

from app.settings import Settings
from app.ui.chat_view import code_space_px

from .conftest import last_request, make_app, wait_until


def send(app, text):
    app.window.chat.input.setPlainText(text)
    app.window.chat._send()


def plain(label_text):
    """A message's stats line as words (it holds no-break spaces and word joiners)."""
    return label_text.replace("\u00a0", " ").replace("\u2060", "")


def answer_done(app):
    rows = app.ctrl.messages.rows
    return bool(rows) and rows[-1].role == "assistant" and rows[-1].status != "streaming"


def test_stream_an_answer(gui, qloop):
    send(gui, "hello world")
    assert gui.window.chat.input.toPlainText() == ""  # the composer was cleared
    wait_until(qloop, lambda: answer_done(gui), what="the answer")
    widgets = gui.window.chat.widgets
    assert [w.role for w in widgets] == ["user", "assistant"]
    assert widgets[1].body.toPlainText().strip() == "You said: hello world"
    assert "tok/s" in plain(widgets[1].meta.text())
    stored = gui.store.messages(gui.ctrl.current)
    assert [(m.role, m.content, m.status) for m in stored] == [
        ("user", "hello world", "done"),
        ("assistant", "You said: hello world", "done"),
    ]
    assert stored[1].stats["decode_tok_s"] == 50.0
    assert stored[1].stats["model"] == "demo"  # which model wrote it, kept and shown with it
    assert plain(widgets[1].meta.text()).endswith("· prompt 12 tokens · demo")
    # the context line: the 12-token prompt and the 4-token answer, kept with the chat
    assert gui.window.chat.context.text() == "Context: 16 / 2048 tokens"
    first = gui.ctrl.current
    gui.ctrl.new_conversation()
    assert gui.window.chat.context.text() == ""  # nothing asked yet
    gui.ctrl.open(first)
    assert gui.window.chat.context.text() == "Context: 16 / 2048 tokens"
    # titled from the message; the empty new chat, left unused, went from the list
    assert [c.title for c in gui.ctrl.conversations.rows] == ["hello world"]
    assert gui.window.panel.plot.values == [50.0]
    assert "Kernels: pure-PyTorch reference path (slow): fake engine" in (
        gui.window.panel.kernels.text()
    )
    assert (
        "Weights 1 MiB, fast decode layout 2 MiB, KV cache 48 MiB, workspace 20 MiB; "
        "up to 30720 tokens would fit. The embedding table (3 MiB) stays in host memory to "
        "leave the GPU room."
    ) in gui.window.panel.engine.text()
    # in the warning colour (it kept the text colour: the style sheet was not applied again)
    from PySide6.QtGui import QPalette

    from app.ui.colours import LIGHT

    def kernels_colour():
        return gui.window.panel.kernels.palette().color(QPalette.ColorRole.WindowText).name()

    assert kernels_colour() == LIGHT["warning"]
    gui.window.panel.set_engine("loaded", {"kernels": "cuda", "kernels_reason": "sm_90"})
    assert gui.window.panel.kernels.text() == "Kernels: CUDA (sm_90)"
    assert kernels_colour() == LIGHT["ok"]


def test_the_dropped_messages_warning_stays_with_the_chat(gui, qloop):
    """The warning that old messages no longer fit the context comes back with the chat: it
    went when the chat was opened again, though the answer's stats kept the count."""
    chat = gui.window.chat
    send(gui, "drop the old turns")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].status == "done")
    first = gui.ctrl.current

    def warning():
        return chat.dropped.text() if chat.dropped.isVisibleTo(gui.window) else ""

    assert warning().startswith("⚠ The 3 oldest messages no longer fit the context")
    gui.ctrl.new_conversation()
    assert warning() == ""  # a chat of its own
    gui.ctrl.open(first)
    assert warning().startswith("⚠ The 3 oldest messages no longer fit the context")
    assert chat.context.text() == "Context: 18 / 2048 tokens"
    send(gui, "and now all fits")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].status == "done")
    assert warning() == ""


def test_a_large_log_is_set_aside_at_the_start(tmp_path, qloop, monkeypatch):
    """The engine's log was appended to at every start and never shrank: past 5 MiB it becomes
    engine.log.1 (replacing an older one) and a new log starts; a small one is kept as it is."""
    from app.__main__ import LOG_LIMIT

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "engine.log").write_bytes(b"old line\n" * (LOG_LIMIT // 9 + 1))
    (logs / "engine.log.1").write_bytes(b"older\n")
    (logs / "app.log").write_text("a small app log\n")
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        wait_until(qloop, lambda: app.client.state == "loaded")
        assert (logs / "engine.log.1").stat().st_size > LOG_LIMIT  # the large one, set aside
        assert (logs / "engine.log").stat().st_size < 1 << 20  # this start's engine (quiet)
        assert (logs / "app.log").read_text().startswith("a small app log")
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_stop_keeps_the_partial_answer(gui, qloop):
    send(gui, "slow")
    wait_until(
        qloop,
        lambda: (
            len(gui.ctrl.messages.rows) == 2
            and gui.ctrl.messages.rows[1].content.count("word") >= 5
        ),
        what="some words",
    )
    assert gui.window.chat.stop_button.isEnabled()
    gui.window.chat.stop_button.click()
    wait_until(qloop, lambda: answer_done(gui), what="the stop")
    last = gui.store.messages(gui.ctrl.current)[-1]
    assert last.status == "stopped" and 5 <= last.content.count("word") < 400
    assert "stopped" in plain(gui.window.chat.widgets[-1].meta.text())
    assert gui.window.chat.send_button.isEnabled() and not gui.window.chat.stop_button.isEnabled()


def test_engine_crash_is_reported_and_survived(gui, qloop):
    send(gui, "crash")
    wait_until(qloop, lambda: answer_done(gui), what="the crash")
    last = gui.store.messages(gui.ctrl.current)[-1]
    assert last.status == "error" and last.content == "You said: crash"  # partial kept
    # the tokens of the three pieces that came before the crash (two a piece, as the engine
    # counted them with each) are its count: the engine sent no stats
    assert last.stats["completion_tokens"] == 6
    meta = plain(gui.window.chat.widgets[-1].meta.text())
    assert meta.startswith("6 tokens · ") and meta.endswith(" · ended by an error")
    banner = gui.window.banner.text()
    assert "stopped unexpectedly" in banner and str(gui.log_dir) in banner
    # the window's note on the restart stays: the answer's end does not repeat the crash over it
    assert "Restarting it; your conversation is kept." in banner
    # a new engine process and a model load: allow for a busy CI machine (it once took > 20 s)
    wait_until(qloop, lambda: gui.client.state == "loaded", timeout=60, what="the restart")
    assert gui.window.statusBar().currentMessage() == "demo ready: 2048 tokens of context"
    # the note says how the restart ended (it said "Restarting it" for good)
    banner = gui.window.banner.text()
    assert "stopped unexpectedly" in banner and "Restarting it" not in banner
    assert "It was restarted and demo loaded again; your conversation is kept." in banner
    # the answer the crash cut off can be written on, as a stopped one
    w = gui.window.chat.widgets[-1]
    assert w.more.isVisibleTo(gui.window)
    w.more.click()
    wait_until(qloop, lambda: answer_done(gui), what="the answer continued")
    last = gui.store.messages(gui.ctrl.current)[-1]
    assert last.status == "done" and last.content == "You said: crash and more."
    assert last.stats["completion_tokens"] == 8  # the crash's 6 and Continue's 2
    assert "ended by an error" not in plain(gui.window.chat.widgets[-1].meta.text())
    send(gui, "again")
    wait_until(
        qloop,
        lambda: gui.ctrl.messages.rows[-1].content == "You said: again" and answer_done(gui),
        what="an answer after the restart",
    )
    assert len(gui.store.messages(gui.ctrl.current)) == 4  # nothing lost


def test_the_crash_note_says_how_the_restart_ended(gui, monkeypatch):
    """Each way a restart after a crash ends, as the window hears it from the engine's states:
    the model loaded again, no model (its reload failed), the engine not started again (its own
    note), and a note the user closed meanwhile stays closed."""
    w, crash = gui.window, {"message": "the engine stopped unexpectedly (exit code 3)"}
    recovering = [True]
    monkeypatch.setattr(type(gui.client), "recovering", property(lambda c: recovering[0]))
    w.on_engine_state("crashed", crash)
    w.on_engine_state("ready", {})  # the new engine's hello, the reload still to come
    assert "Restarting it; your conversation is kept." in w.banner.text()
    recovering[0] = False
    w.on_engine_state("ready", {})  # the reload failed: no model
    assert w.banner.text().startswith(
        "⚠ the engine stopped unexpectedly (exit code 3). It was restarted (without a model: "
        "load one from the Model menu); your conversation is kept.\n"
    )
    w.on_engine_state("loaded", {"model": "demo", "n_ctx": 2048})  # a later load: no news
    assert "It was restarted (without a model" in w.banner.text()
    w.on_engine_state("crashed", crash)
    w.on_engine_state("failed", {"message": "it crashed twice"})
    assert w.banner.text().startswith("⚠ it crashed twice. Your conversation is kept;")
    w.on_engine_state("crashed", crash)
    w.banner.setVisible(False)  # closed by the user
    w.on_engine_state("loaded", {"model": "demo", "n_ctx": 2048})
    assert not w.banner.isVisibleTo(w)


def test_the_live_rate_goes_idle_when_a_crash_ends_the_answer(gui, qloop):
    """The panel's "Now" went on showing the rate of an answer a crash had ended (an answer
    without stats never reached the panel)."""
    last_answer = gui.window.panel.last.text()
    send(gui, "crash late")
    wait_until(qloop, lambda: gui.window.panel.rate.text().endswith("tok/s"), what="the rate")
    wait_until(qloop, lambda: answer_done(gui), what="the crash")
    assert gui.store.messages(gui.ctrl.current)[-1].status == "error"
    # its token count is kept with it (one a piece: the fake sends no counts here), but it has
    # no timings for the panel's last answer
    assert gui.store.messages(gui.ctrl.current)[-1].stats["completion_tokens"] == 21
    assert gui.window.panel.last.text() == last_answer
    assert gui.window.panel.rate.text() == "Now: idle"


def test_a_queued_message_is_answered_after_the_engine_crashed_on_the_one_before(gui, qloop):
    send(gui, "crash")
    crashed = gui.ctrl.current
    gui.ctrl.new_conversation()
    send(gui, "queued behind it")  # in the same turn of the event loop: before the crash
    queued = gui.ctrl.current
    assert gui.ctrl.waiting == [queued]
    wait_until(qloop, lambda: gui.store.messages(queued)[-1].role == "assistant", timeout=60,
               what="the queued answer to start")  # fmt: skip
    wait_until(qloop, lambda: answer_done(gui), timeout=60, what="the queued answer")
    assert gui.store.messages(crashed)[-1].status == "error"  # its partial answer kept
    rows = gui.store.messages(queued)
    assert (rows[-1].content, rows[-1].status) == ("You said: queued behind it", "done")
    assert not gui.ctrl.waiting and not gui.window.chat.queue_note.isVisibleTo(gui.window)


def test_a_message_sent_while_the_engine_restarts_is_answered_after(gui, qloop):
    send(gui, "crash")
    wait_until(qloop, lambda: answer_done(gui), what="the crash")
    assert gui.client.state != "loaded"  # the restart is under way
    send(gui, "while it restarts")
    wait_until(qloop, lambda: answer_done(gui), timeout=60, what="the answer after the restart")
    rows = gui.store.messages(gui.ctrl.current)
    assert (rows[-1].content, rows[-1].status) == ("You said: while it restarts", "done")
    assert "not running" not in gui.window.banner.text()


def menu_action(window, text):
    from PySide6.QtGui import QAction

    (action,) = [a for a in window.findChildren(QAction) if a.text() == text]
    return action


def test_unload_model_frees_it_and_messages_wait_for_the_next_load(gui, qloop):
    """Model > Unload model: the model goes (for the GPU's memory) and the engine stays. An
    answer being written stops and keeps its text; a message sent meanwhile waits and is
    answered after the next load. There was no way to let the model go but quitting."""
    from app.controller import LOAD_HINT

    unload = menu_action(gui.window, "&Unload model")
    assert unload.isEnabled()
    send(gui, "slow")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 3)
    unload.trigger()
    wait_until(qloop, lambda: gui.client.state == "ready" and not gui.ctrl.busy, what="unload")
    partial = gui.ctrl.messages.rows[-1]
    assert partial.status == "stopped" and partial.content.startswith("word word word")
    assert not unload.isEnabled()
    assert gui.window.statusBar().currentMessage() == "No model loaded"
    assert gui.window.panel.engine.text() == "Engine: ready, no model loaded"
    pid = gui.client.proc.pid
    send(gui, "are you there")
    qloop.run_until_complete(asyncio.sleep(0.3))
    assert gui.ctrl.messages.rows[-1].role == "user"  # waiting, not answered with an error
    assert gui.window.chat.queue_note.text() == LOAD_HINT
    menu_action(gui.window, "Load &demo model").trigger()
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content == "You said: are you there")
    assert gui.client.proc.pid == pid and unload.isEnabled()  # the same engine process


def test_a_load_shows_its_stage_and_bar_in_the_panel_until_it_ends(gui, qloop):
    """A load (minutes for a 70B model, more when the kernels build) shows the model's name,
    the engine's stage and a bar in the Model panel; they go once it has loaded, or failed."""
    panel = gui.window.panel
    assert not panel.load_bar.isVisibleTo(panel) and not panel.stage.isVisibleTo(panel)
    task = asyncio.ensure_future(gui.ctrl.load_model("/models/slowload"))
    wait_until(qloop, lambda: panel.load_bar.isVisibleTo(panel), what="the load's start")
    assert panel.load_bar.maximum() == 0  # busy until the engine tells a fraction
    wait_until(qloop, lambda: panel.stage.text() == "Reading weights", what="the first step")
    assert panel.engine.text() == "Loading /models/slowload…"
    assert panel.load_bar.isVisibleTo(panel) and panel.stage.isVisibleTo(panel)
    assert panel.load_bar.value() == 25 and panel.load_bar.text() == "25%"
    panel.set_progress(0.0, "building CUDA kernels, one time")
    assert panel.load_bar.maximum() == 0 and panel.stage.text().startswith("Building")
    panel.set_progress(0.25, "reading weights")
    qloop.run_until_complete(task)
    assert gui.client.state == "loaded" and panel.engine.text().startswith("/models/slowload")
    assert not panel.load_bar.isVisibleTo(panel) and not panel.stage.isVisibleTo(panel)
    panel.set_progress(0.9, "a late step")  # after the load: shown nowhere
    assert not panel.load_bar.isVisibleTo(panel) and panel.stage.text() != "A late step"
    # refused after the model was let go: the bar goes too (the app loads the last one again)
    qloop.run_until_complete(gui.ctrl.load_model("/models/bad"))
    assert "/models/bad: no such model" in gui.window.banner.text()
    assert gui.client.state == "loaded" and not panel.load_bar.isVisibleTo(panel)


def test_a_message_sent_during_a_load_says_its_answer_waits_for_it(gui, qloop):
    """Sent while a model loads (minutes for a large one), the answer's line says it waits for
    the load, not that the model is writing (also when its chat is opened again meanwhile);
    once the engine starts it, it says so."""
    task = asyncio.ensure_future(gui.ctrl.load_model("/models/slowload"))
    wait_until(qloop, lambda: gui.client.state == "loading", what="the load's start")
    send(gui, "hello")
    meta = gui.window.chat.widgets[-1].meta
    wait_until(qloop, lambda: plain(meta.text()) == "waiting for the model to load…")
    first = gui.ctrl.current
    gui.ctrl.open(gui.ctrl.new_conversation())  # another chat, then this one again: still so
    gui.ctrl.open(first)
    meta = gui.window.chat.widgets[-1].meta
    wait_until(qloop, lambda: plain(meta.text()) == "waiting for the model to load…")
    assert gui.client.state == "loading"
    qloop.run_until_complete(task)
    wait_until(qloop, lambda: answer_done(gui), what="the answer")
    assert "waiting" not in meta.text() and plain(meta.text()).startswith("3 tokens")
    assert "waiting" not in json.dumps(gui.store.messages(gui.ctrl.current)[-1].stats)
    send(gui, "slow")  # with the model loaded: writing, from the start
    meta = gui.window.chat.widgets[-1].meta
    wait_until(qloop, lambda: "writing…" in meta.text(), what="the second answer")
    gui.ctrl.stop()
    wait_until(qloop, lambda: answer_done(gui), what="the stop")


def test_an_unload_says_what_it_gave_back_as_nvml_sees_it(gui, qloop, monkeypatch):
    """Users check an unload in nvidia-smi: the status bar says what NVML saw the engine give
    back (its share on every GPU NVML reports it for, before and after), and what it keeps."""
    from app.gpu import GpuInfo

    gib = 1 << 30

    def read(engine_pid=None):
        assert engine_pid == gui.client.proc.pid
        held = 6.5 * gib if gui.client.state == "loaded" else 0.5 * gib
        return [
            GpuInfo(0, "GPU-a", "H200", 141 * gib, 20 * gib, 121 * gib, 3, 40, int(held)),
            GpuInfo(1, "GPU-b", "H200", 141 * gib, 1 * gib, 140 * gib, 0, 30, None),
        ]

    monkeypatch.setattr(gui.window.gpus, "read", read)
    menu_action(gui.window, "&Unload model").trigger()
    status = gui.window.statusBar()
    wait_until(qloop, lambda: status.currentMessage().startswith("Model unloaded"), what="unload")
    assert status.currentMessage() == (
        "Model unloaded: 6.0 GiB of GPU memory given back (NVML); the engine keeps 0.5 GiB for "
        "CUDA itself"
    )


def test_a_stuck_unload_restarts_the_engine_without_the_model(gui, qloop, monkeypatch):
    """An engine stuck when asked to let the model go is killed and started again without it:
    the memory is back for certain. Before, the window showed the model gone while the stuck
    engine still held the GPU, and the message said to quit the app."""
    import functools
    import os

    from app.controller import LOAD_HINT

    qloop.run_until_complete(gui.ctrl.load_model("stuck-model"))
    assert gui.client.state == "loaded"
    stuck_pid = gui.client.pid
    monkeypatch.setattr(gui.client, "unload", functools.partial(gui.client.unload, timeout=0.5))
    monkeypatch.setattr(gui.client, "shutdown", functools.partial(gui.client.shutdown, timeout=1))
    menu_action(gui.window, "&Unload model").trigger()
    wait_until(qloop, lambda: gui.window.banner.isVisibleTo(gui.window), what="the banner")
    assert gui.window.banner.text().startswith(
        "⚠ The engine did not let the model go within a minute, so it was stopped and started "
        "again without a model: the model's memory is free; Model > Load demo model, or Browse "
        "and download models, loads one."
    )
    assert gui.client.state == "ready" and gui.client.pid != stuck_pid
    with pytest.raises(ProcessLookupError):  # killed, not left holding the GPU
        os.kill(stuck_pid, 0)
    assert gui.window.panel.engine.text() == "Engine: ready, no model loaded"
    send(gui, "are you there")
    qloop.run_until_complete(asyncio.sleep(0.3))
    assert gui.window.chat.queue_note.text() == LOAD_HINT  # waits for a load, no error


def test_a_load_asked_for_during_a_stuck_unload_loads_after_the_restart(gui, qloop, monkeypatch):
    """Sent during the unload's minute, the load went to the stuck engine and ended with it,
    without a word: it now waits for the unload and loads on the engine started after it."""
    import functools

    qloop.run_until_complete(gui.ctrl.load_model("stuck-model"))
    stuck_pid = gui.client.pid
    monkeypatch.setattr(gui.client, "unload", functools.partial(gui.client.unload, timeout=0.5))
    monkeypatch.setattr(gui.client, "shutdown", functools.partial(gui.client.shutdown, timeout=1))
    menu_action(gui.window, "&Unload model").trigger()
    qloop.run_until_complete(asyncio.sleep(0.1))  # the engine is stuck on the unload now
    menu_action(gui.window, "Load &demo model").trigger()
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert gui.window.statusBar().currentMessage() == (
        "demo loads once the engine has let the model go…"
    )
    wait_until(
        qloop,
        lambda: gui.client.state == "loaded" and gui.client.pid != stuck_pid,
        what="the load on the restarted engine",
    )
    assert gui.client.loaded["model"] == "demo"
    assert gui.window.banner.text().startswith(
        "⚠ The engine did not let the model go within a minute, so it was stopped and started "
        "again without a model: the model's memory is free; the model asked for meanwhile "
        "loads now."
    )
    send(gui, "are you there")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content == "You said: are you there")


def test_engine_that_crashes_too_often_comes_back_from_the_menu(gui, qloop):
    gui.client.max_restarts = 0  # the first crash is one too many
    send(gui, "crash")
    wait_until(qloop, lambda: answer_done(gui) and gui.client.state == "failed", what="the crash")
    banner = gui.window.banner.text()
    assert "it crashed once in 5 minutes, so it was not restarted" in banner
    assert "Model > Restart engine starts it again" in banner
    assert gui.window.statusBar().currentMessage() == "The engine is not running"
    assert gui.store.messages(gui.ctrl.current)[-1].content.startswith("You said:")  # kept
    # a message to the dead engine waits, says how to bring it back, and is answered then
    send(gui, "anyone there?")
    assert gui.ctrl.waiting == [gui.ctrl.current]
    assert gui.window.chat.queue_note.text() == (
        "This chat waits for the engine, which is not running: Model > Restart engine starts it "
        "again."
    )  # (it was answered with an error)
    assert [m.role for m in gui.ctrl.messages.rows][-1] == "user"
    menu_action(gui.window, "&Restart engine").trigger()
    wait_until(qloop, lambda: gui.client.state == "loaded", timeout=60, what="the restart")
    wait_until(qloop, lambda: answer_done(gui), what="the waiting message's answer")
    assert gui.ctrl.messages.rows[-1].content == "You said: anyone there?"
    send(gui, "back")
    wait_until(qloop, lambda: answer_done(gui), what="an answer after the restart")
    assert gui.ctrl.messages.rows[-1].content == "You said: back"
    assert len(gui.store.messages(gui.ctrl.current)) == 6


def test_restart_engine_during_an_answer_keeps_it(gui, qloop):
    send(gui, "slow")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 3)
    old = gui.client.proc
    menu_action(gui.window, "&Restart engine").trigger()
    wait_until(qloop, lambda: answer_done(gui), what="the end of the answer")
    last = gui.store.messages(gui.ctrl.current)[-1]  # the engine cancels it on shutdown
    assert last.status == "stopped" and last.content.startswith("word word word")
    assert not gui.window.banner.isVisible()  # the user's own restart needs no warning
    wait_until(qloop, lambda: gui.client.proc is not old and gui.client.state == "loaded",
               timeout=60, what="the restart")  # fmt: skip
    assert old.returncode == 0  # it exited when asked
    send(gui, "after")
    wait_until(qloop, lambda: answer_done(gui) and gui.ctrl.messages.rows[-1].content
               == "You said: after", what="an answer after the restart")  # fmt: skip


def test_a_queued_message_waits_through_restart_engine_and_quitting(tmp_path, qloop, monkeypatch):
    """Restart engine (and quitting) stop the engine: the answer being written stops, and a
    message waiting behind it keeps waiting (it was sent to the engine going away, and got an
    error for an answer) and is answered once the model is back; one still waiting at quit
    stays unanswered."""
    from .conftest import make_app

    app = make_app(tmp_path, qloop, monkeypatch)
    ctrl = app.ctrl
    try:
        send(app, "slow")
        wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 3)
        ctrl.new_conversation()
        send(app, "behind it")
        queued = ctrl.current
        old = app.client.proc
        menu_action(app.window, "&Restart engine").trigger()
        wait_until(qloop, lambda: app.client.proc is not old and app.client.state == "loaded",
                   timeout=60, what="the restart")  # fmt: skip
        wait_until(qloop, lambda: answer_done(app), what="the queued answer after the restart")
        assert [(m.role, m.content, m.status) for m in app.store.messages(queued)] == [
            ("user", "behind it", "done"),
            ("assistant", "You said: behind it", "done"),
        ]
        send(app, "slow")  # and a message waiting when the app quits
        wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 2)
        ctrl.new_conversation()
        send(app, "at quit")
        last = ctrl.current
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()
    from app.store import Store

    store = Store(tmp_path / "history.sqlite3")
    assert [(m.role, m.content) for m in store.messages(last)] == [("user", "at quit")]
    store.close()


def test_a_message_waiting_for_a_stopped_engine_says_so_and_goes_after_a_load(gui, qloop):
    ctrl = gui.ctrl
    send(gui, "slow")
    wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 2)
    ctrl.new_conversation()
    send(gui, "waiting")
    gui.client.state = "failed"  # as after too many crashes: nothing can answer it now
    gui.window.chat.stop_button.click()
    wait_until(qloop, lambda: not ctrl.busy, what="the stop")
    assert ctrl.waiting == [ctrl.current] and [m.role for m in ctrl.messages.rows] == ["user"]
    assert gui.window.chat.queue_note.text() == (
        "This chat waits for the engine, which is not running: Model > Restart engine starts it "
        "again."
    )
    assert not gui.window.chat.send_button.isEnabled()
    gui.client.state = "ready"  # a load (here of the running engine) brings the model back
    qloop.run_until_complete(ctrl.load_model("demo"))
    wait_until(qloop, lambda: answer_done(gui), what="the waiting answer")
    assert ctrl.messages.rows[-1].content == "You said: waiting" and not ctrl.waiting


def test_a_message_without_a_model_waits_for_one(tmp_path, qloop, monkeypatch):
    """The model of the last session is gone (deleted, or on a drive not mounted): the engine
    runs without one. A message then waits and says what to do (it was answered with the
    engine's "no model is loaded" error), and is answered once a model is loaded; the status
    bar says no model is loaded (it kept "Loading ..." of the failed load)."""
    from app.controller import LOAD_HINT

    from .conftest import make_app

    app = make_app(tmp_path, qloop, monkeypatch, model="/models/bad-gone")
    try:
        assert app.client.state == "ready"
        assert "Could not load /models/bad-gone" in app.window.banner.text()
        assert app.window.statusBar().currentMessage() == "No model loaded"
        assert app.window.panel.engine.text() == "Engine: ready, no model loaded"
        send(app, "hello")
        assert app.ctrl.waiting == [app.ctrl.current]
        assert [m.role for m in app.ctrl.messages.rows] == ["user"]
        assert app.window.chat.queue_note.text() == LOAD_HINT
        assert LOAD_HINT.startswith("This chat waits for a model, and is answered once one")
        menu_action(app.window, "Load &demo model").trigger()
        wait_until(qloop, lambda: answer_done(app), what="the waiting message's answer")
        assert app.ctrl.messages.rows[-1].content == "You said: hello"
        assert not app.ctrl.waiting and app.window.chat.queue_note.text() == ""
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_restart_engine_during_a_stuck_load(gui, qloop, monkeypatch):
    import functools

    states = []
    on_state = gui.client.on_state
    gui.client.on_state = lambda state, info: (states.append(state), on_state(state, info))
    gui.window._load("/models/hang")  # the engine never finishes loading it
    wait_until(qloop, lambda: gui.client.state == "loading")
    old = gui.client.proc
    monkeypatch.setattr(gui.client, "shutdown", functools.partial(gui.client.shutdown, timeout=0.5))
    menu_action(gui.window, "&Restart engine").trigger()
    wait_until(qloop, lambda: gui.client.proc is not old and gui.client.state == "loaded",
               timeout=60, what="the restart")  # fmt: skip
    assert old.returncode is not None  # killed: it did not exit when asked
    # stopped, then started again with the chat's model: no failure, no banner on the way
    after = states[states.index("stopped") :]
    assert after == ["stopped", "starting", "ready", "loading", "loaded"]
    assert not gui.window.banner.isVisible()
    assert gui.window.statusBar().currentMessage() == "demo ready: 2048 tokens of context"


def test_engine_that_cannot_start_says_how_to_retry(tmp_path, qloop, monkeypatch):
    from .conftest import make_app

    script = tmp_path / "dead_engine.py"
    script.write_text("import sys\nsys.exit(3)\n")
    app = make_app(tmp_path, qloop, monkeypatch, engine=script)
    try:
        assert app.client.state == "failed"
        banner = app.window.banner.text()
        assert "the engine did not start" in banner and str(app.log_dir) in banner
        assert "Model > Restart engine starts it again" in banner
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_engine_error_shown_in_words(gui, qloop):
    send(gui, "fail")
    wait_until(qloop, lambda: answer_done(gui))
    assert "the fake engine refuses 'fail'" in gui.window.banner.text()
    assert gui.store.messages(gui.ctrl.current)[-1].status == "error"


def test_regenerate_and_edit_then_resend(gui, qloop):
    gui.ctrl.regenerate()  # a chat with nothing in it: nothing to answer again
    assert gui.ctrl.messages.rows == [] and not gui.ctrl.busy
    send(gui, "first")
    wait_until(qloop, lambda: answer_done(gui))
    assert gui.window.chat.widgets[-1].regen.isVisibleTo(gui.window)
    gui.window.chat.widgets[-1].regen.click()
    wait_until(qloop, lambda: answer_done(gui) and len(gui.ctrl.messages.rows) == 2)
    assert [m.content for m in gui.store.messages(gui.ctrl.current)] == ["first", "You said: first"]
    gui.window.chat.edit_requested.emit(0, "edited")
    wait_until(qloop, lambda: answer_done(gui) and gui.ctrl.messages.rows[0].content == "edited")
    assert [m.content for m in gui.store.messages(gui.ctrl.current)] == [
        "edited",
        "You said: edited",
    ]
    gui.window.chat.edit_requested.emit(0, " \n ")  # a blank edit loses nothing
    assert [m.content for m in gui.store.messages(gui.ctrl.current)] == [
        "edited",
        "You said: edited",
    ]
    assert len(gui.ctrl.messages.rows) == 2 and not gui.ctrl.busy
    # the chat was titled from its first message, so the title follows the edit
    assert gui.store.conversation(gui.ctrl.current).title == "edited"
    assert gui.ctrl.conversations.index(0).data() == "edited"
    # a title the user chose stays, whatever the first message becomes
    gui.ctrl.rename(gui.ctrl.current, "My dragon story")
    wait_until(qloop, lambda: answer_done(gui))
    gui.window.chat.edit_requested.emit(0, "edited again")
    wait_until(qloop, lambda: answer_done(gui) and gui.ctrl.messages.rows[0].content != "edited")
    assert gui.store.conversation(gui.ctrl.current).title == "My dragon story"
    # while its answer is written, the chat takes no regenerate: the answer goes on
    send(gui, "slow")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 3)
    answer = gui.ctrl.messages.rows[-1]
    gui.ctrl.regenerate()
    assert gui.ctrl.messages.rows[-1].id == answer.id and gui.ctrl.busy
    gui.ctrl.stop()
    wait_until(qloop, lambda: answer_done(gui))
    assert gui.store.messages(gui.ctrl.current)[-1].id == answer.id


def test_history_sent_to_the_engine(tmp_path, qloop, monkeypatch):
    """Per-chat system prompt and sampling reach the engine with the whole conversation:
    checked in the fake engine's own log of the requests it received."""
    from .conftest import make_app

    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    app = make_app(tmp_path / "data", qloop, monkeypatch)
    try:
        send(app, "one")
        wait_until(qloop, lambda: answer_done(app))
        app.window.chat_settings.system.setText("Be brief.")
        app.window.chat_settings.fields["temperature"].setValue(0.0)
        app.window.chat_settings.system.editingFinished.emit()
        send(app, "two")
        wait_until(qloop, lambda: answer_done(app) and len(app.ctrl.messages.rows) == 4)
        generates = [
            json.loads(line)
            for line in requests.read_text().splitlines()
            if json.loads(line)["type"] == "generate"
        ]
        assert generates[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "You said: one"},
            {"role": "user", "content": "two"},
        ]
        assert generates[-1]["sampling"]["temperature"] == 0.0
        assert generates[0]["sampling"]["temperature"] == 0.7  # the default, before the edit
        # a chat whose stored sampling is damaged sends only what the engine takes
        app.store.update_conversation(
            app.ctrl.current, sampling={"temperature": "hot", "top_k": 5, "temprature": 1}
        )
        send(app, "three")
        wait_until(qloop, lambda: answer_done(app) and len(app.ctrl.messages.rows) == 6)
        last = last_request(requests, "generate")
        assert last["sampling"] == {"top_k": 5}
        # an answer that failed ("⚠ ..." in the chat) and one stopped before its first word
        # are not sent as the model's turns
        send(app, "fail")
        wait_until(qloop, lambda: answer_done(app) and len(app.ctrl.messages.rows) == 8)
        assert app.ctrl.messages.rows[-1].status == "error"
        assert app.ctrl.messages.rows[-1].content.startswith("⚠ ")
        app.store.update_message(app.ctrl.messages.rows[5].id, content="")  # "three"'s answer
        app.ctrl.messages.update(5, content="")
        send(app, "four")
        wait_until(qloop, lambda: answer_done(app) and len(app.ctrl.messages.rows) == 10)
        last = last_request(requests, "generate")
        assert [m["content"] for m in last["messages"]] == [
            "Be brief.", "one", "You said: one", "two", "You said: two", "three", "fail", "four"
        ]  # fmt: skip
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_draft_is_saved(gui, qloop):
    send(gui, "hi")
    wait_until(qloop, lambda: answer_done(gui))
    gui.window.chat.input.setPlainText("half-written thought")
    wait_until(
        qloop,
        lambda: gui.store.conversation(gui.ctrl.current).draft == "half-written thought",
        what="the draft",
    )


def test_markdown_code_block_and_copy(gui, qloop):
    send(gui, "```python\nprint('hi')\n```")
    wait_until(qloop, lambda: answer_done(gui))
    w = gui.window.chat.widgets[-1]
    assert w.copy_code.isVisibleTo(gui.window)
    assert "color" in w.body.toHtml()  # Pygments colours reached the widget
    w.copy_code.click()
    assert QGuiApplication.clipboard().text() == "print('hi')"
    assert w.copy_code.text() == "Copied ✓"  # said, for a moment
    w.copy.click()
    assert w.copy.text() == "Copied ✓" and QGuiApplication.clipboard().text() == w.text
    qloop.run_until_complete(asyncio.sleep(0.05))
    x = w.copy.x()
    qloop.run_until_complete(asyncio.sleep(1.7))
    assert (w.copy_code.text(), w.copy.text()) == ("Copy code", "Copy")
    assert w.copy.x() == x  # the buttons did not move back and forth
    w.copy.click()
    gui.ctrl.new_conversation()  # the message goes before its button's timer fires
    qloop.run_until_complete(asyncio.sleep(1.7))


def click_link(body, href):
    """Click the link ``href`` in a message's text where it is drawn."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    doc = body.document()
    block = doc.begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            frag = it.fragment()
            if frag.charFormat().anchorHref() == href:
                cursor = QTextCursor(doc)
                cursor.setPosition(frag.position() + 1)
                rect = body.cursorRect(cursor)
                QTest.mouseClick(body.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
                return
            it += 1
        block = block.next()
    raise AssertionError(f"no link {href!r} in {body.toHtml()[:300]}")


def test_each_code_block_has_its_own_copy_link(gui, qloop, monkeypatch):
    """An answer with several code blocks: each block's Copy link copies that block alone (the
    message's Copy code gives them all), says "Copied ✓" for a moment; a web address still
    opens in the browser."""
    from PySide6.QtGui import QDesktopServices

    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toString()))
    send(gui, "See https://example.com/docs\n```python\nx = 1\n```\nthen\n```sh\nls -l\n```")
    wait_until(qloop, lambda: answer_done(gui))
    w = gui.window.chat.widgets[-1]
    text = w.body.toPlainText()
    assert text.count("Copy") == 2 and "python" in text  # each block: its language, Copy
    click_link(w.body, "copy-code:1")
    assert QGuiApplication.clipboard().text() == "ls -l"
    assert w.body.toPlainText().count("Copied ✓") == 1  # the second block's link
    assert "copy-code:1" not in w.body.toHtml() and "copy-code:0" in w.body.toHtml()
    qloop.run_until_complete(asyncio.sleep(0.8))
    click_link(w.body, "copy-code:0")
    assert QGuiApplication.clipboard().text() == "x = 1"
    qloop.run_until_complete(asyncio.sleep(0.9))  # past the first click's moment, not this one's
    assert w.body.toPlainText().count("Copied ✓") == 1 and "copy-code:1" in w.body.toHtml()
    qloop.run_until_complete(asyncio.sleep(0.8))
    assert "Copied" not in w.body.toPlainText() and w.body.toPlainText().count("Copy") == 2
    w.copy_code.click()
    assert QGuiApplication.clipboard().text() == "x = 1\n\nls -l"
    click_link(w.body, "https://example.com/docs")
    assert opened == ["https://example.com/docs"]
    assert w.body.toPlainText() == text  # the message stayed (no navigation away from it)


def test_a_long_code_line_wraps_inside_the_message(gui, qloop):
    """A code line wider than the message was cut off at its edge (no scroll bar in a
    message): it wraps, and Copy code still gives the line as written."""
    line = "total = " + " + ".join(f"value_{i}" for i in range(60))
    send(gui, f"```python\n{line}\n```")
    wait_until(qloop, lambda: answer_done(gui))
    w = gui.window.chat.widgets[-1]
    doc = w.body.document()
    assert doc.textWidth() == w.body.viewport().width() < 1000
    assert doc.size().width() <= doc.textWidth()  # 3000+ px before: the rest was hidden
    assert doc.size().height() > 3 * w.body.fontMetrics().height()  # on several lines
    w.copy_code.click()
    assert QGuiApplication.clipboard().text() == line
    assert gui.ctrl.conversations.rows[0].title.startswith("total = value_0 + value_1")


def wrap_offsets(body, text: str) -> list[float]:
    """How far right of the line's start (px) each wrapped piece of the code line that starts
    with ``text`` begins in a message's text."""
    doc = body.document()
    block = doc.find(text).block()
    layout = block.layout()
    assert block.isValid() and layout.lineCount() > 1, f"{text!r} did not wrap"

    def x(pos: int) -> float:
        cursor = QTextCursor(doc)
        cursor.setPosition(block.position() + pos)
        return body.cursorRect(cursor).x()

    return [x(layout.lineAt(i).textStart()) - x(0) for i in range(1, layout.lineCount())]


def test_a_wrapped_code_line_goes_on_under_its_own_indent(gui, qloop):
    """A wrapped code line went on at column 0, under the code around it: it goes on two
    columns right of its own indent, and blank lines stay."""
    call = "    result = compute(" + ", ".join(f"argument_{i}" for i in range(40)) + ")"
    top = "names = " + " + ".join(f"value_{i}" for i in range(40))
    code = f"def f():\n{call}\n\n    return result\n{top}"
    send(gui, f"```python\n{code}\n```")
    wait_until(qloop, lambda: answer_done(gui))
    w = gui.window.chat.widgets[-1]
    space = code_space_px(w.body.font())
    assert 3 < space < 20
    for offset in wrap_offsets(w.body, "    result = compute("):
        assert abs(offset - 6 * space) < 1.5, (offset, space)  # 4 columns of indent, then 2
    for offset in wrap_offsets(w.body, "names = "):
        assert abs(offset - 2 * space) < 1.5, (offset, space)
    assert "\n\n    return result" in w.body.toPlainText().replace("\n \n", "\n\n")
    w.copy_code.click()
    assert QGuiApplication.clipboard().text() == code


def test_a_long_chat_opens_with_each_message_laid_out_a_few_times(gui, qloop):
    """Opening a chat of 400 messages took 29 s (2.5 s for 100): each message was resized and
    its text laid out again some 180 times while the column took them in one by one. Each
    message is now resized a few times, whatever the chat's length."""
    long = gui.store.create_conversation("long")
    answer = "Like so:\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    for i in range(40):
        gui.store.add_message(long.id, "user", f"question {i}")
        gui.store.add_message(long.id, "assistant", f"{answer}\nanswer {i}")
    short = gui.store.create_conversation("short")
    gui.store.add_message(short.id, "user", "hello")
    gui.ctrl.open(short.id)
    qloop.run_until_complete(asyncio.sleep(0.1))

    class Resizes(QObject):
        n = 0

        def eventFilter(self, obj, event):
            if event.type() == QEvent.Type.Resize and obj.objectName() == "assistantMessage":
                self.n += 1
            return False

    resizes = Resizes()
    QGuiApplication.instance().installEventFilter(resizes)
    try:
        gui.ctrl.open(long.id)
        qloop.run_until_complete(asyncio.sleep(0.3))
    finally:
        QGuiApplication.instance().removeEventFilter(resizes)
    widgets = gui.window.chat.widgets
    assert len(widgets) == 80
    assert resizes.n <= 4 * 40, resizes.n  # 827 before (about 20 times each)
    last = widgets[-1]
    assert last.body.document().textWidth() == last.body.viewport().width()
    assert last.body.height() >= last.body.document().size().height()
    assert last.body.toPlainText().endswith("answer 39")


def test_regenerate_keeps_the_answers_it_replaces(gui, qloop):
    """Regenerate deleted the answer it replaced: a better first answer was gone. Each one is
    kept: ‹ 1/2 › beside the last answer shows the others in its place (in the chat, in the
    history the model reads next and in the store); an edit of the question ends them."""
    send(gui, "hello")
    wait_until(qloop, lambda: answer_done(gui))
    chat, ctrl = gui.window.chat, gui.ctrl
    w = chat.widgets[-1]
    assert not w.which.isVisibleTo(gui.window)  # one answer: nothing to choose
    first = ctrl.messages.rows[-1]
    gui.store.update_message(first.id, content="the first answer")  # as another answer would be
    ctrl.messages.update(1, content="the first answer")
    w.regen.click()
    wait_until(qloop, lambda: answer_done(gui) and len(ctrl.messages.rows) == 2)
    w = chat.widgets[-1]
    assert w.text == "You said: hello" and w.which.text() == "2/2"
    assert w.which.accessibleDescription() == "answer 2 of 2"  # read out by a screen reader
    assert w.older.isEnabled() and not w.newer.isEnabled() and w.which.isVisibleTo(gui.window)
    w.older.click()
    assert chat.widgets[-1].text == "the first answer" and chat.widgets[-1].which.text() == "1/2"
    assert [m.content for m in gui.store.messages(ctrl.current)] == ["hello", "the first answer"]
    assert ctrl.history()[-1] == {"role": "assistant", "content": "the first answer"}
    assert "tok/s" in plain(chat.widgets[-1].meta.text())  # its own stats came back with it
    assert not chat.widgets[-1].older.isEnabled() and chat.widgets[-1].newer.isEnabled()
    chat.widgets[-1].older.click()  # disabled: nothing before the first
    ctrl.show_answer_version(-1)  # nor from anywhere else
    assert chat.widgets[-1].which.text() == "1/2"
    assert gui.store.messages(ctrl.current)[-1].content == "the first answer"
    chat.widgets[-1].newer.click()
    assert chat.widgets[-1].text == "You said: hello" and chat.widgets[-1].which.text() == "2/2"
    ctrl.show_answer_version(1)  # nothing after the last
    assert chat.widgets[-1].which.text() == "2/2"
    chat.widgets[-1].regen.click()  # a third, kept after the two
    wait_until(qloop, lambda: answer_done(gui) and len(ctrl.messages.rows) == 2)
    assert chat.widgets[-1].which.text() == "3/3"
    # the versions come back with the chat; only the last answer has them
    ctrl.new_conversation()  # a chat of its own: the other's versions are not offered here
    assert not menu_action(gui.window, "&Earlier answer").isEnabled()
    ctrl.open(first.conversation_id)
    assert chat.widgets[-1].which.text() == "3/3" and not chat.widgets[0].which.isVisibleTo(
        gui.window
    )
    # while the chat's answer is written the choice is not offered (nor taken)
    chat.widgets[-1].regen.click()  # a fourth, written now
    wait_until(qloop, lambda: ctrl.messages.rows[-1].status == "streaming")
    assert not any(x.which.isVisibleTo(gui.window) for x in chat.widgets)
    ctrl.show_answer_version(-1)  # not taken either: the answer being written stays
    assert ctrl.messages.rows[-1].status == "streaming"
    wait_until(qloop, lambda: answer_done(gui))
    assert chat.widgets[-1].which.text() == "4/4"
    send(gui, "slow")
    wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 3)
    assert not any(x.which.isVisibleTo(gui.window) for x in chat.widgets)
    ctrl.stop()
    wait_until(qloop, lambda: answer_done(gui))
    # an answer the engine could not write at all is not kept
    send(gui, "fail")
    wait_until(qloop, lambda: answer_done(gui) and ctrl.messages.rows[-1].content.startswith("⚠"))
    kept = gui.store.db.execute("SELECT COUNT(*) FROM answer_versions").fetchone()[0]
    ctrl.regenerate()
    wait_until(qloop, lambda: answer_done(gui) and len(ctrl.messages.rows) == 6)
    assert gui.store.db.execute("SELECT COUNT(*) FROM answer_versions").fetchone()[0] == kept
    assert not chat.widgets[-1].which.isVisibleTo(gui.window)
    # an edit of the question replaces its answers, versions and all
    chat.widgets[0].edit.click()
    chat.widgets[0].editor.setPlainText("edited")
    chat.widgets[0].edit_send.click()
    wait_until(qloop, lambda: answer_done(gui) and ctrl.messages.rows[0].content == "edited")
    assert gui.store.db.execute("SELECT COUNT(*) FROM answer_versions").fetchone()[0] == 0
    assert not chat.widgets[-1].which.isVisibleTo(gui.window)


def test_the_chat_menu_does_what_the_last_answer_s_buttons_do(gui, qloop):
    """Regenerate, Continue, the earlier and later answers and a copy of the last answer from
    the Chat menu (and its shortcuts), each enabled only where it applies."""
    names = ["Re&generate answer", "C&ontinue answer", "&Earlier answer", "&Later answer"]
    actions = [menu_action(gui.window, n) for n in names]
    assert [a.shortcut().toString() for a in actions] == ["Ctrl+R", "", "Alt+Left", "Alt+Right"]
    assert not any(a.isEnabled() for a in actions)  # an empty chat: nothing to do
    send(gui, "hello")
    wait_until(qloop, lambda: answer_done(gui))
    assert [a.isEnabled() for a in actions] == [True, False, False, False]
    actions[0].trigger()
    wait_until(qloop, lambda: answer_done(gui) and len(gui.ctrl.messages.rows) == 2)
    assert [a.isEnabled() for a in actions] == [True, False, True, False]
    assert gui.window.chat.widgets[-1].which.text() == "2/2"
    actions[2].trigger()
    assert gui.window.chat.widgets[-1].which.text() == "1/2"
    assert [a.isEnabled() for a in actions] == [True, False, False, True]
    actions[3].trigger()
    assert gui.window.chat.widgets[-1].which.text() == "2/2"
    copy = menu_action(gui.window, "&Copy last answer")
    assert copy.shortcut().toString() == "Ctrl+Shift+C"
    copy.trigger()
    assert QGuiApplication.clipboard().text() == "You said: hello"
    send(gui, "slow")
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 3)
    assert not any(a.isEnabled() for a in actions)  # while the answer is written
    gui.ctrl.stop()
    wait_until(qloop, lambda: answer_done(gui))
    assert [a.isEnabled() for a in actions] == [True, True, False, False]  # stopped: Continue
    actions[1].trigger()
    wait_until(
        qloop, lambda: answer_done(gui) and gui.ctrl.messages.rows[-1].content.endswith("more.")
    )


def test_a_message_is_edited_in_place_and_sent_again(gui, qloop):
    """Edit turns the message into a text box holding it (a small dialog without word wrap
    showed one line of it): Shift+Enter adds a line, Esc gives the edit up without stopping the
    answer being written, Enter sends it again in place of the messages after it, and Send
    waits while the chat is busy."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    gui.window.resize(900, 600)
    text = "first line of a question " * 8 + "\nsecond line\n```\nls\n```"
    send(gui, text)
    wait_until(qloop, lambda: answer_done(gui))
    chat = gui.window.chat
    user = chat.widgets[0]
    assert user.copy_code.isVisibleTo(gui.window)  # the message holds a code block
    user.edit.click()
    assert not user.copy_code.isVisibleTo(gui.window)
    for button, name in [(user.edit_send, "Send"), (user.edit_cancel, "Cancel")]:
        assert button.isVisibleTo(gui.window) and button.text() == name
        assert user.rect().contains(button.geometry().translated(button.parentWidget().pos()))
    assert user.edit_send.accessibleName() == "Send the edited message"
    assert user.edit_cancel.accessibleName() == "Cancel the edit"
    assert user.editing() and user.focusWidget() is user.editor  # typed into at once
    assert user.editor.toPlainText() == text and not user.body.isVisibleTo(gui.window)
    assert not user.edit.isVisibleTo(gui.window) and not user.copy.isVisibleTo(gui.window)
    assert user.editor.lineWrapMode() == user.editor.LineWrapMode.WidgetWidth
    assert user.editor.height() >= 3 * user.editor.fontMetrics().lineSpacing()
    assert user.editor.accessibleName() == "Edited message"
    short = user.editor.height()
    user.editor.setPlainText(text + "\nmore" * 6)  # taller with its lines, up to twelve
    qloop.run_until_complete(asyncio.sleep(0.05))
    spacing = user.editor.fontMetrics().lineSpacing()
    assert user.editor.height() >= short + 3 * spacing
    user.editor.setPlainText(text + "\nmore" * 40)
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert 12 * spacing <= user.editor.height() < 12 * spacing + 20  # then it scrolls
    user.editor.setPlainText(text)
    user.editor.moveCursor(QTextCursor.MoveOperation.End)
    QTest.keyClick(user.editor, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    QTest.keyClicks(user.editor, "third")
    assert user.editor.toPlainText() == text + "\nthird"
    stops = []
    chat.stop_requested.connect(lambda: stops.append(1))
    gui.window.activateWindow()  # window shortcuts (Esc: stop) work in the active window
    assert QTest.qWaitForWindowActive(gui.window)
    QTest.keyClick(chat.input, Qt.Key.Key_Escape)
    assert stops == [1]  # Esc in the composer stops, as ever
    QTest.keyClick(user.editor, Qt.Key.Key_Escape)
    assert not user.editing() and user.body.isVisibleTo(gui.window) and stops == [1]
    assert user.copy_code.isVisibleTo(gui.window)  # back with the message
    editor = user.editor
    user.edit.click()  # the same box again, holding the message as sent
    assert user.editor is editor and user.editor.toPlainText() == text
    assert len(user.findChildren(type(editor))) == 1
    QTest.keyClick(user.editor, Qt.Key.Key_Escape)
    assert [m.content for m in gui.store.messages(gui.ctrl.current)] == [text, "You said: " + text]
    # while an answer is written the editor holds the text but does not send it
    user.edit.click()
    user.editor.setPlainText("shorter question")
    chat.set_send_allowed(False)  # what the controller does while the chat's answer is written
    assert not user.edit_send.isEnabled() and not user.edit.isEnabled()
    QTest.keyClick(user.editor, Qt.Key.Key_Return)
    assert len(gui.ctrl.messages.rows) == 2 and user.editing()
    chat.set_send_allowed(True)
    assert user.edit_send.isEnabled()
    QTest.keyClick(user.editor, Qt.Key.Key_Return)
    wait_until(qloop, lambda: answer_done(gui) and gui.ctrl.messages.rows[0].content != text)
    assert [m.content for m in gui.store.messages(gui.ctrl.current)] == [
        "shorter question",
        "You said: shorter question",
    ]
    assert [w.text for w in chat.widgets] == ["shorter question", "You said: shorter question"]
    assert not chat.widgets[0].editing()
    # a blank edit sends nothing; the Send button sends like Enter
    chat.widgets[0].edit.click()
    chat.widgets[0].editor.setPlainText("  \n ")
    chat.widgets[0].edit_send.click()
    assert chat.widgets[0].editing() and len(gui.ctrl.messages.rows) == 2
    chat.widgets[0].editor.setPlainText("by the button")
    chat.widgets[0].edit_send.click()
    wait_until(
        qloop, lambda: answer_done(gui) and gui.ctrl.messages.rows[0].content != "shorter question"
    )
    assert [w.text for w in chat.widgets] == ["by the button", "You said: by the button"]


def test_a_long_chat_shows_its_last_messages_and_earlier_ones_when_asked(gui, qloop, monkeypatch):
    """Every message is a widget: a chat of 1000 took 3 s to open. It opens with its last 100;
    "Show earlier messages" adds 100 more above without moving the view; an Edit there
    replaces what follows it, as anywhere."""
    from PySide6.QtCore import QPoint

    c = gui.store.create_conversation("long")
    for i in range(130):
        gui.store.add_message(c.id, "user", f"question {i}")
        gui.store.add_message(c.id, "assistant", f"answer {i}\n\nwith a second paragraph")
    gui.window.resize(900, 600)
    chat, bar = gui.window.chat, gui.window.chat.scroll.verticalScrollBar()
    settle = lambda: qloop.run_until_complete(asyncio.sleep(0.2))  # noqa: E731
    gui.ctrl.open(c.id)
    settle()
    assert len(chat.widgets) == 100 and chat.widgets[0].text == "question 80"
    assert chat.earlier.isVisible() and chat.earlier.text() == "Show 100 earlier messages (of 160)"
    assert bar.value() == bar.maximum() > 0
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMinimum)
    settle()
    top = chat.widgets[0]
    y = top.mapTo(chat.scroll.viewport(), QPoint(0, 0)).y()
    chat.earlier.click()
    settle()
    assert len(chat.widgets) == 200 and chat.widgets[0].text == "question 30"
    assert chat.earlier.text() == "Show 60 earlier messages (of 60)"
    assert abs(top.mapTo(chat.scroll.viewport(), QPoint(0, 0)).y() - y) <= 2  # it stayed
    chat.widgets[0].edit.click()  # row 60: question 30
    chat.widgets[0].editor.setPlainText("edited")
    chat.widgets[0].edit_send.click()
    wait_until(qloop, lambda: answer_done(gui), what="the answer to the edit")
    rows = gui.ctrl.messages.rows
    assert len(rows) == 62 and rows[60].content == "edited"
    assert [w.text for w in chat.widgets] == ["edited", "You said: edited"]
    assert [m.content for m in gui.store.messages(c.id)][59:] == [
        "answer 29\n\nwith a second paragraph", "edited", "You said: edited"
    ]  # fmt: skip
    chat.earlier.click()
    settle()
    assert len(chat.widgets) == 62 and chat.widgets[0].text == "question 0"
    assert not chat.earlier.isVisible()


def test_latest_shows_while_the_view_is_away_from_the_chat_s_end(gui, qloop):
    """Scrolled up to read, nothing said the chat went on below, nor took one back to its end
    but the scroll bar: "↓ Latest" shows in the view's corner, and brings the view back to the
    end, where it follows the answer being written again."""
    c = gui.store.create_conversation("long")
    for i in range(40):
        gui.store.add_message(c.id, "user" if i % 2 == 0 else "assistant", f"message {i}")
    gui.window.resize(900, 600)
    chat, bar = gui.window.chat, gui.window.chat.scroll.verticalScrollBar()
    settle = lambda: qloop.run_until_complete(asyncio.sleep(0.2))  # noqa: E731
    gui.ctrl.open(c.id)
    settle()
    assert bar.value() == bar.maximum() > 0 and not chat.to_end.isVisible()
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMinimum)
    settle()
    view = chat.scroll.viewport()
    assert chat.to_end.isVisible() and chat.to_end.text() == "↓ Latest"
    corner = chat.to_end.geometry()
    assert view.rect().contains(corner)
    assert view.width() - corner.right() < 40 and view.height() - corner.bottom() < 40
    send(gui, "slow")  # sending goes to the end; scrolled up again, the answer goes on below
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 3)
    assert not chat.to_end.isVisible()
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMinimum)
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 10)
    assert bar.value() == 0 and chat.to_end.isVisible()
    chat.to_end.click()
    wait_until(qloop, lambda: gui.ctrl.messages.rows[-1].content.count("word") >= 20)
    settle()
    assert bar.value() == bar.maximum() and not chat.to_end.isVisible()  # following it
    gui.ctrl.stop()


def test_rows_removed_before_or_across_the_first_shown_keep_the_widgets_on_their_rows(qapp):
    """The column mirrors rows first.. of the model: a removal before them shifts ``first``, one
    across it takes the widgets of the shown rows it covers (a slice that ran negative took
    all but the last few)."""
    from PySide6.QtCore import QModelIndex

    from app.store import Message
    from app.ui.chat_view import ChatView
    from app.ui.models import MessageListModel

    model = MessageListModel()
    view = ChatView(model)
    model.set_rows([Message(i, 1, "user", f"m{i}") for i in range(130)])

    def remove(lo, hi):
        model.beginRemoveRows(QModelIndex(), lo, hi)
        del model.rows[lo : hi + 1]
        model.endRemoveRows()

    def shown():
        assert [w.text for w in view.widgets] == [m.content for m in model.rows[view.first :]]
        return view.first, len(view.widgets)

    assert shown() == (30, 100)
    remove(2, 5)  # before the first shown
    assert shown() == (26, 100)
    remove(20, 40)  # across it: rows 26-40 were shown
    assert shown() == (20, 85) and view.widgets[0].text == "m45"
    model.update(view.first, content="changed")
    assert view.widgets[0].text == "changed"


def test_a_chat_opens_at_its_end_and_follows_the_answer_until_scrolled_away(gui, qloop):
    """A long chat opened at its top, or where the last chat had been scrolled to; and while
    an answer was written the view was pulled to its end on every word, even from a message
    the user had scrolled up to read."""
    ids = []
    for name in ("a", "b"):
        c = gui.store.create_conversation(name)
        for i in range(25):
            gui.store.add_message(c.id, "user", f"{name} question {i}")
            gui.store.add_message(c.id, "assistant", f"{name} answer {i}\n\nmore text " * 4)
        ids.append(c.id)
    gui.window.resize(900, 600)
    bar = gui.window.chat.scroll.verticalScrollBar()
    settle = lambda: qloop.run_until_complete(asyncio.sleep(0.2))  # noqa: E731
    gui.ctrl.open(ids[0])
    settle()
    assert 0 < bar.maximum() == bar.value()  # 0 before: the top
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMinimum)
    gui.ctrl.open(ids[1])
    settle()
    assert 0 < bar.maximum() == bar.value()
    send(gui, "slow")
    rows = gui.ctrl.messages.rows
    words = lambda: rows[-1].content.count("word")  # noqa: E731
    wait_until(qloop, lambda: len(rows) == 52 and words() >= 60, what="the answer")
    assert bar.value() == bar.maximum()  # following the answer
    bar.triggerAction(QAbstractSlider.SliderAction.SliderPageStepSub)  # up, to read
    kept, grown = bar.value(), bar.maximum()
    wait_until(qloop, lambda: bar.maximum() > grown + 40, what="the answer to grow")
    assert bar.value() == kept  # pulled to the end before
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMaximum)  # back down: follows again
    grown = bar.maximum()
    wait_until(qloop, lambda: bar.maximum() > grown + 40, what="the answer to grow")
    assert bar.value() == bar.maximum()
    gui.ctrl.stop()
    wait_until(qloop, lambda: not gui.ctrl.busy, what="the stop")
    bar.triggerAction(QAbstractSlider.SliderAction.SliderToMinimum)  # up; then Regenerate
    gui.window.chat.widgets[-1].regen.click()
    wait_until(qloop, lambda: gui.ctrl.busy and words() >= 60, what="the new answer")
    assert bar.value() == bar.maximum() > 0  # the answer asked for is followed
    gui.ctrl.stop()
    wait_until(qloop, lambda: not gui.ctrl.busy, what="the stop")


def test_new_chats_start_from_what_the_loaded_model_recommends(tmp_path, qloop, monkeypatch):
    """A model's generation_config.json recommends its sampling (Qwen2.5: top-k 20, top-p 0.8,
    ...): new chats start from it, over the app's defaults; a chat keeps its own; Defaults sets
    the open chat's to them; the chat settings say what the model recommends."""
    log = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        panel, ctrl = app.window.chat_settings, app.ctrl
        wait_until(qloop, lambda: app.client.state == "loaded", what="the demo")
        assert panel.recommended.text() == "The model recommends no settings."
        assert panel.values()[1]["top_k"] == 0 and panel.values()[1]["temperature"] == 0.7
        send(app, "first chat")
        wait_until(qloop, lambda: answer_done(app))
        first = ctrl.current
        qwen = tmp_path / "qwen"
        qwen.mkdir()
        recommended = {"temperature": 0.6, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
        (qwen / "generation_config.json").write_text(json.dumps({"do_sample": True, **recommended}))
        qloop.run_until_complete(ctrl.load_model(str(qwen)))
        assert panel.recommended.text() == (
            "The model recommends temperature 0.6, top-p 0.8, top-k 20, repetition penalty 1.05."
        )
        assert app.store.conversation(first).sampling["top_k"] == 0  # the chat keeps its own
        assert panel.values()[1]["top_k"] == 0
        ctrl.new_conversation()
        assert panel.values()[1] == {**app.settings.sampling, **recommended, "seed": None}
        send(app, "second chat")
        wait_until(qloop, lambda: answer_done(app))
        sent = [json.loads(line) for line in log.read_text().splitlines()]
        asked = [r["sampling"] for r in sent if r["type"] == "generate"]
        assert asked[0]["top_k"] == 0 and asked[-1] == {**app.settings.sampling, **recommended}
        ctrl.open(first)
        panel.defaults.click()  # the first chat's sampling as a new chat's
        assert app.store.conversation(first).sampling == {**panel.values()[1]}
        assert panel.values()[1]["top_k"] == 20 and panel.values()[1]["temperature"] == 0.6
        qloop.run_until_complete(ctrl.unload_model())
        assert panel.recommended.text() == ""  # no model: nothing recommended
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_search_new_chat_and_export(gui, qloop):
    send(gui, "apples are red")
    wait_until(qloop, lambda: answer_done(gui))
    first = gui.ctrl.current
    gui.ctrl.new_conversation()
    send(gui, "bananas are yellow")
    wait_until(qloop, lambda: answer_done(gui))
    assert gui.ctrl.conversations.rowCount() == 2
    gui.window.search.setText("banana")
    assert [c.title for c in gui.ctrl.conversations.rows] == ["bananas are yellow"]
    assert not gui.window.no_match.isVisibleTo(gui.window)
    gui.window.search.setText("cherries")  # nothing matches: said, not just an empty list
    assert gui.ctrl.conversations.rowCount() == 0
    assert gui.window.no_match.isVisibleTo(gui.window)
    assert gui.window.no_match.text() == "No chat contains “cherries”."
    gui.window.search.setText("")
    assert gui.ctrl.conversations.rowCount() == 2
    assert not gui.window.no_match.isVisibleTo(gui.window)
    data = json.loads(json.dumps(gui.store.export_json(first)))
    gui.ctrl.import_json(data, "x.json")
    assert gui.ctrl.conversations.rowCount() == 3
    assert [m.content for m in gui.ctrl.messages.rows] == [
        "apples are red",
        "You said: apples are red",
    ]


def test_a_search_shows_why_each_chat_matched_and_opens_it_at_the_match(gui, qloop):
    """The list showed the matching chats' titles alone, and opening one showed its end: in a
    long chat the match was a hunt. Each found chat now has a line of its best match under the
    title (the words in bold), and opening it shows that message near the top of the view,
    earlier messages shown as needed, the words marked."""
    from PySide6.QtCore import QPoint, Qt

    from app.ui.chat_view import MATCH_LIGHT
    from app.ui.main_window import snippet_parts
    from app.ui.models import SnippetRole

    long = gui.store.create_conversation("a long chat")
    for i in range(150):
        text = "the Zanzibar ferry leaves at noon" if i == 20 else f"filler message {i}"
        text = "un café crème, zanzibarien" if i == 21 else text  # not a match: no "ferr"
        gui.store.add_message(long.id, "user" if i % 2 == 0 else "assistant", text)
    other = gui.store.create_conversation("other")
    gui.store.add_message(other.id, "user", "nothing to see")
    gui.ctrl.conversations.set_rows(gui.store.conversations())
    gui.ctrl.open(other.id)
    gui.window.resize(900, 600)
    gui.window.search.setText("zanz ferr")  # prefixes, any case
    rows = gui.ctrl.conversations.rows
    assert [c.title for c in rows] == ["a long chat"]
    index = gui.ctrl.conversations.index(0)
    snippet = index.data(SnippetRole)
    assert snippet_parts(snippet) == [
        ("the ", False), ("Zanzibar", True), (" ", False), ("ferry", True),
        (" leaves at noon", False),
    ]  # fmt: skip
    tip = index.data(Qt.ItemDataRole.ToolTipRole)
    assert tip == "a long chat\nthe Zanzibar ferry leaves at noon"
    view = gui.window.list
    one_line = view.fontMetrics().lineSpacing()
    assert view.visualRect(index).height() >= 2 * one_line  # the title and the snippet
    # drawn: the title in the row's upper half, the snippet in its lower half
    rect = view.visualRect(index)
    image = view.viewport().grab(rect).toImage()
    background = image.pixelColor(1, 1)

    def ink(top: int, bottom: int) -> int:
        return sum(
            image.pixelColor(x, y) != background
            for x in range(8, image.width() - 8)
            for y in range(top, bottom)
        )

    half = image.height() // 2
    assert ink(2, half) > 30 and ink(half, image.height() - 2) > 30
    view.picked.emit(index)
    qloop.run_until_complete(asyncio.sleep(0.3))
    chat = gui.window.chat
    assert gui.ctrl.current == long.id
    assert chat.first <= 20 and chat.widgets[20 - chat.first].text.startswith("the Zanzibar")
    found = chat.widgets[20 - chat.first]
    top = found.mapTo(chat.scroll.viewport(), QPoint(0, 0)).y()
    assert 0 <= top <= 40, top  # near the top of the view, not at the chat's end
    marks = found.body.extraSelections()
    assert [m.cursor.selectedText() for m in marks] == ["Zanzibar", "ferry"]
    assert {m.format.background().color().name() for m in marks} == {MATCH_LIGHT[1]}
    assert {m.format.foreground().color().name() for m in marks} == {MATCH_LIGHT[0]}
    # letters beyond ASCII are part of the word marked; the marks follow a new search
    gui.window.search.setText("caf zanz")
    gui.ctrl.open(other.id)
    gui.ctrl.open(long.id)
    qloop.run_until_complete(asyncio.sleep(0.3))
    marks = chat.widgets[21 - chat.first].body.extraSelections()
    assert [m.cursor.selectedText() for m in marks] == ["café", "zanzibarien"]
    # an ended search lists every chat again, and opening a chat shows its end, unmarked
    gui.window.search.setText("")
    assert gui.ctrl.conversations.rowCount() == 2 and not index.data(SnippetRole)
    second = gui.ctrl.conversations.index(1)  # (the first has its time group's heading)
    assert view.visualRect(second).height() < 2 * one_line  # a title alone: one line again
    assert snippet_parts("\x02Jupiter\x03 is \x02big\x03") == [
        ("Jupiter", True), (" is ", False), ("big", True),
    ]  # fmt: skip
    gui.ctrl.open(other.id)
    gui.ctrl.open(long.id)
    qloop.run_until_complete(asyncio.sleep(0.3))
    bar = chat.scroll.verticalScrollBar()
    assert bar.value() == bar.maximum() and chat.first == 50
    assert all(not w.body.extraSelections() for w in chat.widgets)


def test_gpu_cards_match_nvml_to_cuda_by_uuid(gui):
    from app.gpu import GpuInfo

    panel = gui.window.panel
    panel.cuda_devices = [{"index": 0, "uuid": "bbbb-2"}, {"index": 1, "uuid": "aaaa-1"}]
    nvml = [
        GpuInfo(0, "GPU-aaaa-1", "A", 80 << 30, 10 << 30, 70 << 30, 5, 40, 3 << 30),
        GpuInfo(1, "GPU-bbbb-2", "B", 80 << 30, 1 << 30, 79 << 30, None, None, None),
    ]
    panel.set_gpus(nvml, None, None)
    assert [c.title.text() for c in panel.cards] == ["GPU 0 (cuda:1): A", "GPU 1 (cuda:0): B"]
    assert "This engine: 3.0 GiB" in panel.cards[0].detail.text()
    assert panel.cards[0].bar.format() == "10.0 / 80.0 GiB"
    panel.set_gpus([], "No NVIDIA GPU driver found (x).", 2 << 30)  # CUDA, but no NVML
    assert not panel.cards and panel.gpu_note.text() == (
        "The engine uses a GPU, a GPU (CUDA); its memory cannot be read here (NVML is not "
        "available)."
    )
    panel.cuda_devices = []  # no GPU at all: the CPU
    panel.set_gpus([], "No NVIDIA GPU driver found (x).", 2 << 30)
    assert not panel.cards and "Engine memory (CPU): 2.0 GiB" in panel.gpu_note.text()


def test_without_nvml_the_panel_says_what_the_engine_holds_on_the_gpu(tmp_path, qloop, monkeypatch):
    """Where NVML cannot be read but the engine runs on CUDA, the panel said only that the
    memory cannot be read: now what PyTorch holds in the engine, from its stats."""
    cuda = [{"index": 0, "name": "NVIDIA H100", "uuid": "abcd", "total_bytes": 80 << 30}]
    monkeypatch.setenv("FAKE_ENGINE_CUDA", json.dumps(cuda))
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        w = app.window

        class NoNvml:
            available, error, reason = False, "No NVIDIA GPU driver found (x).", "x"

            def read(self, engine_pid=None):
                return []

        w.gpus = NoNvml()
        qloop.run_until_complete(w._poll_async(app.client.pid))
        assert w.panel.gpu_note.text() == (
            "The engine uses NVIDIA H100 (CUDA) and holds 3.0 GiB there for PyTorch; the rest "
            "of the GPU's memory cannot be read here (NVML is not available)."
        )
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_failed_load_leaves_a_usable_engine_and_shows_kernel_state(tmp_path, qloop, monkeypatch):
    from .conftest import make_app

    app = make_app(tmp_path, qloop, monkeypatch, model="/models/bad-one")
    try:
        assert "Could not load /models/bad-one: /models/bad-one: no such model" in (
            app.window.banner.text()
        )
        assert str(app.log_dir) in app.window.banner.text()
        assert app.window.panel.kernels.text() == (
            "Kernels: pure-PyTorch reference path (slow): the fake engine has no GPU"
        )
        assert app.client.state == "ready"
        qloop.run_until_complete(app.ctrl.load_model("demo"))
        assert app.client.state == "loaded"
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_a_model_that_fails_to_load_leaves_the_one_loaded_before(tmp_path, qloop, monkeypatch):
    """The engine lets its model go before it loads another: a failed load (not found, damaged,
    too large) left the chat with no model at all. The app loads the previous one again."""
    from app.controller import LOAD_HINT

    from .conftest import make_app

    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    app = make_app(tmp_path / "data", qloop, monkeypatch)
    try:
        assert app.client.state == "loaded"
        qloop.run_until_complete(app.ctrl.load_model("/models/bad-one", 8192))
        assert app.client.state == "loaded"
        assert app.window.banner.text().startswith(
            "⚠ Could not load /models/bad-one: /models/bad-one: no such model. The model loaded "
            "before, demo, is loaded again (4096 tokens of context)."
        )
        loads = [
            (r["path"], r["max_seq_len"])
            for r in map(json.loads, requests.read_text().splitlines())
            if r["type"] == "load"
        ]
        assert loads == [("demo", 4096), ("/models/bad-one", 8192), ("demo", 4096)]
        assert (app.settings.model, app.settings.context) == ("demo", 4096)
        send(app, "still here")
        wait_until(qloop, lambda: answer_done(app))
        assert app.ctrl.messages.rows[-1].content == "You said: still here"
        # refused before the engine let its model go (no model there): nothing to reload
        qloop.run_until_complete(app.ctrl.load_model("/models/missing-one"))
        assert app.client.state == "loaded"
        assert app.window.banner.text().startswith(
            "⚠ Could not load /models/missing-one: /models/missing-one: not found. The model "
            "loaded now, demo, stays loaded."
        )
        loads = [r["path"] for r in map(json.loads, requests.read_text().splitlines())
                 if r["type"] == "load"]  # fmt: skip
        assert loads[3:] == ["/models/missing-one"]
        assert app.client.last_load["path"] == "demo"  # what a crash's restart reloads
        send(app, "and still")
        wait_until(qloop, lambda: answer_done(app))
        assert app.ctrl.messages.rows[-1].content == "You said: and still"
        # the model loaded before cannot be loaded again either (its folder deleted while it
        # was loaded): the banner says both, and a message waits for the next load
        qloop.run_until_complete(app.ctrl.load_model("/models/once-only"))
        qloop.run_until_complete(app.ctrl.load_model("/models/bad-two"))
        assert app.client.state == "ready"
        assert app.window.banner.text().startswith(
            "⚠ Could not load /models/bad-two: /models/bad-two: no such model. Loading "
            "/models/once-only again failed too: /models/once-only: no such folder\n"
        )
        assert app.window.panel.engine.text() == "Engine: ready, no model loaded"
        send(app, "hello")
        assert app.ctrl.waiting == [app.ctrl.current]
        assert app.window.chat.queue_note.text() == LOAD_HINT
        menu_action(app.window, "Load &demo model").trigger()
        wait_until(qloop, lambda: answer_done(app), what="the waiting message's answer")
        assert app.ctrl.messages.rows[-1].content == "You said: hello"
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_an_unload_that_fails_says_how_to_free_the_memory(gui, qloop, monkeypatch):
    """The engine let the model go but emptying PyTorch's cache failed (a CUDA error): the
    banner says so and what frees the memory for certain, the status bar does not say what
    the unload gave back (NVML reports the engine's share here), and the restart it names
    works."""
    from app.gpu import GpuInfo

    gib = 1 << 30
    monkeypatch.setattr(gui.window.gpus, "read", lambda engine_pid=None: [
        GpuInfo(0, "GPU-a", "H200", 141 * gib, 20 * gib, 121 * gib, 3, 40, 6 * gib)
    ])  # fmt: skip
    qloop.run_until_complete(gui.ctrl.load_model("/models/sticky-one"))
    assert gui.client.state == "loaded"
    pid = gui.client.pid
    menu_action(gui.window, "&Unload model").trigger()
    wait_until(qloop, lambda: gui.window.banner.isVisibleTo(gui.window), what="the banner")
    assert gui.window.banner.text().startswith(
        "⚠ Could not unload the model: CUDA error: unspecified launch failure. Model > Restart "
        "engine gives its memory back for certain.\n"
    )
    assert gui.client.state == "ready"
    wait_until(qloop, gui.ctrl.not_unloading.is_set, what="the unload's end")
    assert not gui.window.statusBar().currentMessage().startswith("Model unloaded")
    menu_action(gui.window, "&Restart engine").trigger()
    wait_until(qloop, lambda: gui.client.state == "loaded" and gui.client.pid != pid,
               what="the restarted engine")  # fmt: skip


def test_a_saved_cpu_or_listed_gpu_is_where_the_model_loads(tmp_path, qloop, monkeypatch):
    """The last load's device is where the next load goes while the engine lists it: the CPU
    whatever GPUs there are, a GPU the engine still sees by its number (a GPU it no longer
    lists goes to auto: test_browser)."""
    from .conftest import make_app

    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    gpus = [
        {"index": 0, "name": "GPU A", "uuid": "aaaa"},
        {"index": 1, "name": "GPU B", "uuid": "bbbb"},
    ]
    monkeypatch.setenv("FAKE_ENGINE_CUDA", json.dumps(gpus))
    app = make_app(tmp_path / "data", qloop, monkeypatch)
    try:
        for device in ("cpu", "cuda:1", "auto"):
            app.settings.device = device
            qloop.run_until_complete(app.ctrl.load_model("demo"))
            assert app.client.state == "loaded" and app.settings.device == device
            last = last_request(requests, "load")
            assert (last["type"], last.get("device")) == (
                "load",
                None if device == "auto" else device,
            )
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_the_error_banner_and_the_logs_menu_open_the_log_folder(gui, monkeypatch):
    import re

    from PySide6.QtGui import QDesktopServices
    from PySide6.QtWidgets import QMessageBox

    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url) or True)
    gui.window.show_error("it broke <b>here</b> & there")
    banner = gui.window.banner
    assert banner.text() == f"⚠ it broke <b>here</b> & there\nLogs: {gui.log_dir}"
    assert banner.label.text().startswith("⚠ it broke &lt;b&gt;here&lt;/b&gt; &amp; there<br>")
    (href,) = re.findall(r"<a href='([^']+)'", banner.label.text())
    banner.label.linkActivated.emit(href)
    assert [u.toLocalFile() for u in opened] == [str(gui.log_dir)]

    def click_open(box):
        next(b for b in box.buttons() if b.text() == "Open the folder").click()
        return 0

    monkeypatch.setattr(QMessageBox, "exec", click_open)
    menu_action(gui.window, "Where are the &logs?").trigger()
    assert [u.toLocalFile() for u in opened] == [str(gui.log_dir)] * 2


def test_throughput_line_stays_below_its_label(qapp):
    """The sparkline of answers' tokens/s: a steady rate draws at the top of the plot, under the
    scale's label, not through it; a slower answer draws lower."""
    from PySide6.QtGui import QColor

    from app.ui.live_panel import Sparkline

    s = Sparkline()
    s.resize(220, 60)
    for v in (50.0, 50.0, 25.0):
        s.add(v)
    image = s.grab().toImage()
    line = s.palette().highlight().color()

    def rows_with_line(x0: int, x1: int) -> list[int]:
        def near(c: QColor) -> bool:
            return abs(c.red() - line.red()) + abs(c.green() - line.green()) < 40 and (
                abs(c.blue() - line.blue()) < 40
            )

        return [y for y in range(image.height()) for x in range(x0, x1)
                if near(image.pixelColor(x, y))]  # fmt: skip

    label_bottom = 4 + 2 + s.fontMetrics().height()
    steady = rows_with_line(20, 60)  # the first two answers, 50 tok/s
    assert steady and min(steady) >= label_bottom - 1, (min(steady), label_bottom)
    slower = rows_with_line(190, 200)  # the last, 25 tok/s
    assert slower and min(slower) > max(steady)
    first = Sparkline()
    first.resize(220, 60)
    first.add(40.0)  # a first answer: a dot at the right, where the newest are
    image = first.grab().toImage()
    assert rows_with_line(200, 220) and not rows_with_line(0, 100)


def test_settings_before_the_first_chat_start_it(tmp_path, qloop, monkeypatch):
    """With no chat open the settings panel shows the defaults, not its fields' minimums, and
    what is set there before the first message is what that new chat starts with and sends."""
    from app.settings import DEFAULT_SAMPLING

    from .conftest import make_app

    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    app = make_app(tmp_path / "data", qloop, monkeypatch)
    try:
        panel = app.window.chat_settings
        assert app.ctrl.current is None
        shown = {k: box.value() for k, box in panel.fields.items()}
        assert shown == {**DEFAULT_SAMPLING, "seed": -1}
        panel.system.setText("Answer in French.")
        panel.system.editingFinished.emit()
        panel.fields["max_new_tokens"].setValue(64)
        send(app, "hello")
        wait_until(qloop, lambda: answer_done(app))
        conv = app.ctrl.store.conversation(app.ctrl.current)
        assert conv.system_prompt == "Answer in French."
        assert conv.sampling["max_new_tokens"] == 64
        generate = last_request(requests, "generate")
        assert generate["messages"][0] == {"role": "system", "content": "Answer in French."}
        assert generate["sampling"]["max_new_tokens"] == 64
        app.window.chat_settings.toggle.click()  # the next chat starts from the defaults again
        app.ctrl.new_conversation()
        assert app.ctrl.store.conversation(app.ctrl.current).system_prompt == ""
        assert panel.fields["max_new_tokens"].value() == DEFAULT_SAMPLING["max_new_tokens"]
        # set with no chat open, then a chat opened instead: not carried into a later new chat
        first, second = app.ctrl.conversations.rows[1].id, app.ctrl.current
        app.ctrl.delete(second)
        panel.system.setText("Talk like a pirate.")
        panel.system.editingFinished.emit()
        app.ctrl.open(first)
        assert app.ctrl.store.conversation(first).system_prompt == "Answer in French."
        app.ctrl.new_conversation()
        assert app.ctrl.store.conversation(app.ctrl.current).system_prompt == ""
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_small_window_gives_the_chat_most_of_the_width(gui, qloop):
    w = gui.window
    live = menu_action(w, "&Live panel")

    def resized(width):
        w.resize(width, 560)
        wait_until(qloop, lambda: sum(w.split.sizes()) > 0 and w.width() == width)
        return w.split.sizes()

    side, chat, panel = resized(820)
    assert chat >= 420 and side >= 150 and panel >= 180  # the chat was 332 px here
    assert resized(1400)[0::2] == [230, 250]  # full widths where there is room
    live.trigger()  # off
    assert not gui.settings.show_panel and w.split.sizes()[2] == 0
    assert Settings.load(gui.data / "settings.json").show_panel is False  # saved at once
    live.trigger()  # on again, at its width (a hidden pane's 0 is not kept)
    assert gui.settings.show_panel and w.split.sizes()[2] == 250
    # where the panes' floors would leave the chat under 300 px (200 in a 560 px window) the
    # panel folds away, and comes back as the window widens
    side, chat, panel = resized(560)
    assert (side, panel) == (160, 0) and chat >= 380 and gui.settings.show_panel
    assert not live.isChecked()  # folded: unchecked, so one click shows it
    live.trigger()  # asked for: shown, narrow or not
    assert w.split.sizes()[2] >= 190 and live.isChecked() and gui.settings.show_panel
    assert resized(540)[2] == 0 and not live.isChecked()
    side, chat, panel = resized(820)
    assert panel >= 180 and chat >= 420 and live.isChecked()
    w.split.setSizes([300, 850, 250])
    w.split.splitterMoved.emit(300, 1)  # the user dragged a handle: their widths stay
    assert resized(1200)[0] == 300


@pytest.mark.parametrize("dark", [False, True])
def test_the_apps_own_text_colours_are_readable_in_both_themes(qapp, dark):
    """Each style of text the app colours itself, on each background it is drawn on, as Qt
    resolves the style sheet: WCAG contrast of at least 4.5. The context warning's orange was
    2.6:1 on the light window, and the grey of answers' stats and hints 3.4-4.0:1."""
    from PySide6.QtGui import QPalette
    from PySide6.QtWidgets import QFrame, QLabel, QVBoxLayout

    from app.__main__ import apply_theme

    from .test_app_process import luminance

    def ratio(a, b) -> float:
        lo, hi = sorted((luminance(a), luminance(b)))
        return (hi + 0.05) / (lo + 0.05)

    apply_theme(qapp, dark)
    try:
        seen = []
        for text_style, backgrounds in {
            "warning": [None],  # the context warning, the live panel's kernel line
            "ok": [None],
            "emptyHint": [None],  # the empty chat's hint, the queue note, "no chat matches"
            "messageStats": ["assistantMessage", "userMessage"],
        }.items():
            for back in backgrounds:
                frame = QFrame(objectName=back or "")
                label = QLabel("text", objectName=text_style)
                QVBoxLayout(frame).addWidget(label)
                frame.ensurePolished(), label.ensurePolished()
                fg = label.palette().color(QPalette.ColorRole.WindowText)
                bg = frame.palette().color(QPalette.ColorRole.Window)
                seen.append((text_style, back, fg.name(), bg.name()))
                assert ratio(fg, bg) >= 4.5, seen[-1]
        default = qapp.palette().color(QPalette.ColorRole.WindowText).name()
        assert default not in {s[2] for s in seen}  # the style sheet reached every one
    finally:
        apply_theme(qapp, False)


def test_the_dropped_messages_warning_wraps_instead_of_widening_the_window(gui, qloop):
    """The warning under the chat when old turns no longer fit the context: on one line it
    made the main window's minimum 1019 px, and a 780 px window grew to that when it appeared
    (seen under Xvfb with the real engine at a 256-token context)."""
    w, chat = gui.window, gui.window.chat
    w.resize(780, 420)
    wait_until(qloop, lambda: w.width() == 780)
    chat.set_context(231, 256, 12)
    qloop.run_until_complete(asyncio.sleep(0.2))  # layouts settle
    assert chat.dropped.isVisible()
    assert chat.dropped.text().startswith("⚠ The 12 oldest messages no longer fit the context")
    assert w.minimumSizeHint().width() <= 780 and w.width() == 780
    assert chat.dropped.height() >= chat.dropped.heightForWidth(chat.dropped.width())
    chat.set_context(240, 256, 1)
    assert chat.dropped.text() == (
        "⚠ The oldest message no longer fits the context and was left out of this answer."
    )
    chat.set_context(20, 256, 0)
    assert not chat.dropped.isVisible()


def test_a_short_window_scrolls_the_live_panel_instead_of_cutting_its_lines(gui, qloop):
    """At 820 x 420 the panel's wrapped lines (the loaded model's long description) keep the
    height their text needs and the panel scrolls; a plain layout squeezed them, cutting off
    their first and last lines."""
    from PySide6.QtWidgets import QLabel

    w = gui.window
    w.resize(820, 420)
    wait_until(qloop, lambda: w.height() == 420 and w.panel.engine.text().startswith("demo"))
    qloop.run_until_complete(asyncio.sleep(0.2))  # layouts settle
    labels = [x for x in w.panel.findChildren(QLabel) if x.isVisible() and x.wordWrap()]
    assert w.panel.engine in labels and len(labels) >= 4
    for label in labels:
        assert label.height() >= label.heightForWidth(label.width()), label.text()
    assert w.panel.verticalScrollBar().maximum() > 0  # the rest is a scroll away


def test_a_gpu_with_a_long_name_does_not_widen_the_live_panel(gui, qloop):
    """A GPU card's bold title and its bar's text do not wrap: with a GeForce's name they made
    the panel's content wider than the panel at 1100 px, and every line of it was cut at the
    window's edge (Xvfb, session 35). They wrap and shrink now, at the panel's narrowest."""
    from app.gpu import GpuInfo

    w, gib = gui.window, 1 << 30
    w.resize(780, 420)
    wait_until(qloop, lambda: w.width() == 780)
    name = "NVIDIA GeForce RTX 4090 Laptop GPU"
    info = GpuInfo(0, "GPU-a", name, 24 * gib, 20 * gib, 4 * gib, 99, 83, 19 * gib)
    # the window's own poll (no GPU here) would put an empty list over this one meanwhile: a
    # CI run found no card after the sleep below
    w.gpu_timer.stop()
    w.panel.cuda_devices = [{"index": 1, "uuid": "GPU-a"}]
    w.panel.set_gpus([info], None, None)

    def settled() -> bool:  # the layouts, up to 5 s on a loaded machine
        t = w.panel.cards[0].title
        fits = w.panel.widget().width() <= w.panel.viewport().width()
        return w.panel.width() <= 200 and fits and t.height() >= t.heightForWidth(t.width())

    wait_until(qloop, settled, timeout=5, what="the panel's layout")
    title = w.panel.cards[0].title
    assert title.text() == f"GPU 0 (cuda:1): {name}"
    assert w.panel.width() <= 200  # the narrowest the window gives it
    assert w.panel.widget().width() <= w.panel.viewport().width()
    assert title.height() >= title.heightForWidth(title.width())  # wrapped, not cut
    bar = w.panel.cards[0].bar
    assert bar.format() == "20.0 / 24.0 GiB"
    assert bar.fontMetrics().horizontalAdvance(bar.format()) < bar.width() - 8  # one line


def test_the_window_fits_the_screen_and_reopens_where_it_was_left(tmp_path, qloop, monkeypatch):
    from PySide6.QtCore import QPoint, QSize
    from PySide6.QtGui import QGuiApplication

    from app.__main__ import App

    monkeypatch.setenv("VPTQ_CHAT_MODELS", str(tmp_path / "models"))
    free = QGuiApplication.primaryScreen().availableGeometry()
    assert free.width() < 1200  # the offscreen screen is smaller than the window's 1200 x 780

    def opened():
        app = App(tmp_path, model="demo", theme="light", loop=qloop)
        app.window.show()
        return app

    def closed(app):
        qloop.run_until_complete(app.close())
        app.window.close()

    app = opened()
    w = app.window
    assert free.contains(w.frameGeometry()), (free, w.frameGeometry())
    assert w.width() >= free.width() * 0.9 and w.height() >= free.height() * 0.85
    w.resize(640, 480)
    w.move(free.topLeft() + QPoint(30, 40))
    closed(app)
    app = opened()
    try:
        assert app.window.size() == QSize(640, 480)
        assert app.window.pos() == free.topLeft() + QPoint(30, 40)
    finally:
        closed(app)


def test_the_throughput_plot_shows_earlier_answers_after_a_restart(tmp_path, qloop, monkeypatch):
    """The live panel's plot and last-answer line come back from the history: a restart used
    to leave them empty although the chat showed each answer's speed."""
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        for text in ("one", "two"):
            send(app, text)
            wait_until(qloop, lambda: answer_done(app), what="the answer")
        assert app.window.panel.plot.values == [50.0, 50.0]
        last = app.window.panel.last.text()  # the fake engine's 12-token prompt: no rate
        assert last == "Last answer: first token 50 ms, prompt 12 tokens, writing 50.0 tok/s"
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        assert app.window.panel.plot.values == [50.0, 50.0]
        assert app.window.panel.last.text() == last
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_chat_settings_take_a_damaged_sampling_as_defaults(qapp):
    """Values of the wrong type (a hand-edited or damaged settings file or history) fall back
    to the defaults (setValue raised TypeError on a string, and the window did not open)."""
    from app.settings import DEFAULT_SAMPLING
    from app.ui.chat_settings import ChatSettings

    box = ChatSettings()
    box.load("Be brief.", {"temperature": "hot", "top_k": 2.7, "top_p": None, "seed": None,
                           "max_new_tokens": True, "min_p": 0.05})  # fmt: skip
    system, sampling = box.values()
    assert system == "Be brief."
    assert sampling == {**DEFAULT_SAMPLING, "min_p": 0.05, "seed": None}
    box.load("", {"seed": 42, "temperature": 0})
    assert box.values()[1] == {**DEFAULT_SAMPLING, "temperature": 0.0, "seed": 42}
    box.load("", {"seed": 2**40, "max_new_tokens": 10**6, "top_k": -3})  # beyond the boxes
    assert box.values()[1] == {**DEFAULT_SAMPLING, "seed": 2**31 - 1, "max_new_tokens": 32768}


def test_the_live_panel_says_what_the_load_chose(gui):
    """The engine's note (engine/loader.py: bfloat16 on the CPU where float32 does not fit)."""
    note = "running in bfloat16: in float32 the model would take 31.14 GiB of memory, ..."
    info = {"model": "m", "quant": "vptq", "device": "cpu", "n_ctx": 4096, "note": note}
    gui.window.panel.set_engine("loaded", info)
    assert gui.window.panel.engine.text() == (
        f"m (vptq) on cpu, 4096 tokens of context. Note: {note}"
    )
    gui.window.panel.set_engine("loaded", {**info, "note": ""})
    assert gui.window.panel.engine.text() == "m (vptq) on cpu, 4096 tokens of context"


def test_the_checks_window_keeps_its_lines_together_when_tall(qapp):
    """Spare height goes below the lines (it went between the summary and them)."""
    from app.first_run import Check
    from app.ui.first_run_dialog import FirstRunDialog

    checks = [
        Check("NVIDIA driver", False, "not found", "Install it."),
        Check("PyTorch with CUDA", False, "cannot use a GPU"),
        Check("CUDA kernels", None, "not needed on the CPU path"),
    ]
    d = FirstRunDialog(None, lambda: checks)
    d.resize(480, 700)
    d.show()
    qapp.processEvents()
    for label in [d.summary, *d.labels]:  # no taller than its text: no space inside it
        assert label.height() <= label.heightForWidth(label.width()) + 4, label.text()
    d.close()


def test_the_checks_scroll_where_the_window_is_shorter_than_they_are(qapp):
    """Squeezed, the lines keep the height their wrapped text takes and scroll (they were
    squashed into each other, their text clipped)."""
    from PySide6.QtWidgets import QScrollArea

    from app.first_run import Check
    from app.ui.first_run_dialog import FirstRunDialog

    long = "a reason long enough to wrap over several lines at this width " * 3
    checks = [Check(f"Check {i}", False, long, "What to do about it, also long. " * 3)
              for i in range(6)]  # fmt: skip
    checks += [Check("PyTorch with CUDA", False, "no"), Check("CUDA kernels", None, "-")]
    d = FirstRunDialog(None, lambda: checks)
    d.resize(480, 10)  # as small as it goes
    d.show()
    qapp.processEvents()
    for label in d.labels:
        assert label.height() >= label.heightForWidth(label.width()), label.text()
    (scroll,) = d.findChildren(QScrollArea)
    assert scroll.verticalScrollBar().maximum() > 0  # the rest is a scroll away
    assert scroll.accessibleName() == "Check results"  # (Tab reaches it: it had no name)
    d.close()


def test_the_disk_check_is_of_the_folder_downloads_go_to(gui, tmp_path, monkeypatch):
    """The first-run check measured the demo's folder under VPTQ_CHAT_HOME, not the models
    folder (VPTQ_CHAT_MODELS, here tmp_path/models: make_app sets it) that downloads fill,
    and its fix named the variable that does not move them."""
    from collections import namedtuple

    from app import first_run

    asked = []
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        asked.append(path)
        return usage(0, 0, first_run.MIN_FREE_DISK - 1)

    monkeypatch.setenv("VPTQ_CHAT_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(first_run.shutil, "disk_usage", disk_usage)
    (disk,) = [c for c in gui.run_checks() if c.name == "Disk space for models"]
    assert asked == [tmp_path / "models"] and disk.ok is False
    assert disk.detail.startswith(f"9.9 GiB free in {tmp_path / 'models'} ")
    assert "VPTQ_CHAT_MODELS set to a folder on a disk with room" in disk.fix


def test_help_check_this_computer_reuses_the_open_window(gui, qloop, monkeypatch):
    """Help > Check this computer opened a new checks window each time, the old ones left open
    behind it: where one is open it is checked again and raised; once closed, a new one."""
    from app.first_run import Check

    wait_until(qloop, lambda: gui.checks_dialog is not None and gui.checks_dialog.isVisible())
    first = gui.checks_dialog
    runs = iter(["1.0 GiB free", "12.0 GiB free", "13.0 GiB free"])
    real = gui.run_checks

    def run():
        return [*real(), Check("Marker", True, next(runs))]

    monkeypatch.setattr(gui, "run_checks", run)
    first.run = run  # the open window's own
    menu_action(gui.window, "&Check this computer…").trigger()
    assert gui.checks_dialog is first and first.isVisible()
    assert "1.0 GiB free" in first.labels[-1].text()
    menu_action(gui.window, "&Check this computer…").trigger()
    assert gui.checks_dialog is first and "12.0 GiB free" in first.labels[-1].text()
    first.accept()
    menu_action(gui.window, "&Check this computer…").trigger()
    assert gui.checks_dialog is not first and gui.checks_dialog.isVisible()
    assert "13.0 GiB free" in gui.checks_dialog.labels[-1].text()
    gui.checks_dialog.close()


def test_checking_again_replaces_the_lines(qapp):
    """ "Check again" shows the new checks in place of the old ones at once (the old lines
    stayed in the layout, shown, until the event loop came round to deleting them)."""
    from PySide6.QtWidgets import QLabel

    from app.first_run import Check
    from app.ui.first_run_dialog import FirstRunDialog

    cpu = [Check("PyTorch with CUDA", False, "no GPU"), Check("CUDA kernels", None, "-")]
    runs = iter([[*cpu, Check("Disk space for models", False, "1.0 GiB free")],
                 [*cpu, Check("Disk space for models", True, "12.0 GiB free")]])  # fmt: skip
    d = FirstRunDialog(None, lambda: next(runs))
    d.show()
    d.refresh()
    qapp.processEvents()
    shown = [w.accessibleName() for w in d.findChildren(QLabel) if w.isVisibleTo(d)]
    assert shown == [  # the summary, then the lines
        "",
        "PyTorch with CUDA: problem",
        "CUDA kernels: not needed",
        "Disk space for models: ok",
    ]
    assert d.items.count() == 3
    d.close()


def test_the_checks_show_a_build_failures_compiler_lines_and_colour_their_marks(qapp):
    """A failed kernel build's reason quotes compiler output ("#include <cuda_runtime.h>"):
    the dialog's rich text took it for a tag and dropped it. Marks take the theme's colours."""
    from PySide6.QtGui import QTextDocument

    from app.first_run import Check
    from app.ui.colours import LIGHT
    from app.ui.first_run_dialog import FirstRunDialog

    why = "vptq_ops.cpp:3: fatal error: <cuda_runtime.h>: No such file or directory & more"
    checks = [
        Check("CUDA kernels", False, why, "Install the CUDA toolkit (nvcc) <12.4 or later>."),
        Check("PyTorch with CUDA", True, "PyTorch 2.11.0+cu130 sees 1 GPU"),
        Check("Memory", None, "not needed"),
    ]
    d = FirstRunDialog(None, lambda: checks)
    shown = []
    for label in d.labels:
        doc = QTextDocument()
        doc.setHtml(label.text())
        shown.append(doc.toPlainText().replace("\u2028", "\n"))  # <br>: a line separator
    assert shown[0] == f"✖ CUDA kernels: {why}\nInstall the CUDA toolkit (nvcc) <12.4 or later>."
    assert f"color: {LIGHT['does not fit']};'>✖" in d.labels[0].text()
    assert f"color: {LIGHT['ok']};'>✔" in d.labels[1].text()
    d.close()


def test_the_first_status_message_does_not_move_the_window_contents(tmp_path, qloop, monkeypatch):
    """The status bar is there from the start: created by the first message ("demo ready"),
    it pushed the message box and the transcript up by its height as the engine came up."""
    import sys

    from app.__main__ import App

    from .conftest import FAKE_ENGINE

    monkeypatch.setenv("VPTQ_CHAT_ENGINE_CMD", f"{sys.executable} {FAKE_ENGINE}")
    monkeypatch.setenv("VPTQ_CHAT_MODELS", str(tmp_path / "models"))
    app = App(tmp_path, model="demo", theme="light", loop=qloop)
    app.window.resize(1100, 760)
    app.window.show()
    box = app.window.chat.input

    def top():
        qloop.run_until_complete(asyncio.sleep(0.05))  # the layout settles
        return box.mapTo(app.window, box.rect().topLeft()).y()

    try:
        before = top()
        qloop.run_until_complete(app.ctrl.start_engine())
        assert app.window.statusBar().currentMessage() == "demo ready: 2048 tokens of context"
        assert top() == before
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_an_unused_new_chat_goes_when_left_and_one_with_anything_of_the_users_stays(gui, qloop):
    """New chat twice, or New chat then another chat, leaves no empty chats in the list; a
    new chat with a draft (even one typed just before the click), its own settings or a title
    of the user's stays."""
    ctrl, chat = gui.ctrl, gui.window.chat
    send(gui, "hello")
    wait_until(qloop, lambda: answer_done(gui))
    first = ctrl.current
    titles = lambda: [c.title for c in ctrl.conversations.rows]  # noqa: E731
    ctrl.new_conversation()
    ctrl.new_conversation()
    assert titles() == ["New chat", "hello"]
    ctrl.open(first)
    assert titles() == ["hello"] and len(gui.store.conversations()) == 1
    # the settings panel writes its (unchanged) values back as it shows them: still unused
    ctrl.new_conversation()
    gui.window.chat_settings.system.editingFinished.emit()
    assert gui.store.conversation(ctrl.current).sampling["seed"] is None  # written back
    ctrl.open(first)
    assert titles() == ["hello"]
    # a draft typed a moment ago (its debounce not yet run) keeps the chat, and the draft
    draft_chat = ctrl.new_conversation()
    chat.input.setPlainText("half a thought")
    ctrl.open(first)
    assert gui.store.conversation(draft_chat).draft == "half a thought"
    # its own system prompt, or a title the user gave it
    own = ctrl.new_conversation()
    ctrl.update_settings("Answer in French.", dict(gui.settings.sampling))
    named = ctrl.new_conversation()
    ctrl.rename(named, "For later")
    ctrl.open(first)
    kept = {c.id for c in gui.store.conversations()}
    assert kept == {first, draft_chat, own, named}
    ctrl.open(draft_chat)
    assert chat.input.toPlainText() == "half a thought"


def test_export_and_import_through_the_file_menu(gui, qloop, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    from app.ui import main_window

    send(gui, "apples are red")
    wait_until(qloop, lambda: answer_done(gui))
    cid = gui.ctrl.current
    gui.ctrl.rename(cid, 'Q/A: what? <x> "y".')  # characters no file name may hold
    asked = []

    def save_as(target):
        def dialog(parent, caption, suggested, *rest):
            asked.append(suggested)
            return str(target), ""

        monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)

    save_as(tmp_path / "out.md")
    gui.window._export("md")
    assert asked[-1] == str(Path.home() / "Q A what x y.md")
    assert (tmp_path / "out.md").read_text(encoding="utf-8") == gui.store.export_markdown(cid)
    assert gui.window.file_dir == tmp_path  # the next dialog opens where this one saved
    save_as(tmp_path / "out.json")
    gui.window._export("json")
    assert asked[-1] == str(tmp_path / "Q A what x y.json")
    # a folder that is not there: said, with what to do, and nothing else changes
    save_as(tmp_path / "gone" / "out.md")
    gui.window._export("md")
    assert gui.window.banner.text().startswith(
        f"⚠ Could not export to {tmp_path / 'gone' / 'out.md'}: No such file or directory. "
        "Choose another folder."
    )
    gui.window.banner.close_button.click()  # the user closes it
    assert not gui.window.banner.isVisibleTo(gui.window)

    def import_(path):
        monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a: (str(path), ""))
        gui.window.banner.setVisible(False)
        gui.window._import()

    hint = "Choose a file saved by File > Export chat as JSON."
    bad = {
        "binary.json": (b"\xff\xd8\xff\xe0 a photo", "it is not a text file"),
        "cut.json": (
            (tmp_path / "out.json").read_bytes()[:40],
            "it is not valid JSON (line 3, column 1: Expecting property name enclosed in "
            "double quotes)",
        ),
        "list.json": (b"[1, 2]", "not a VPTQ Chat conversation export"),
        "newer.json": (
            json.dumps({**json.loads((tmp_path / "out.json").read_text()), "version": 2}).encode(),
            "exported by a newer VPTQ Chat (format version 2; this one reads version 1): update "
            "VPTQ Chat to import it",
        ),
    }
    for name, (data, reason) in bad.items():
        (tmp_path / name).write_bytes(data)
        import_(tmp_path / name)
        assert gui.window.banner.isVisibleTo(gui.window)
        assert gui.window.banner.text().startswith(
            f"⚠ Could not import {tmp_path / name}: {reason}. {hint}"
        ), gui.window.banner.text()
    monkeypatch.setattr(main_window, "MAX_IMPORT_BYTES", 1000)  # a file far too large
    (tmp_path / "big.json").write_bytes(b" " * 3000)
    import_(tmp_path / "big.json")
    assert f"{tmp_path / 'big.json'}: at 3.0 KB it is too large for a chat export. {hint}" in (
        gui.window.banner.text()
    )
    import_(tmp_path / "missing.json")
    assert "No such file or directory" in gui.window.banner.text()
    assert gui.ctrl.conversations.rowCount() == 1  # nothing was added by the refused files
    import_(tmp_path / "out.json")
    assert not gui.window.banner.isVisibleTo(gui.window)
    assert gui.ctrl.conversations.rowCount() == 2 and gui.ctrl.current != cid
    assert [m.content for m in gui.ctrl.messages.rows] == [
        "apples are red",
        "You said: apples are red",
    ]


def test_an_answer_names_the_model_that_wrote_it_by_its_own_name():
    from app.ui.chat_view import model_name

    long = "VPTQ-community/Meta-Llama-3.1-70B-Instruct-v8-k65536-0-woft"
    assert model_name(long) == "Meta-Llama-3.1-70B-Instruct-v8-k65536-0…"
    assert len(model_name(long)) == 40 and model_name(long[:55]) == long[15:55]
    assert model_name("/home/me/models/my-model/") == "my-model"
    assert model_name("C:\\models\\mine") == "mine"
    assert model_name("demo") == "demo"


def test_a_stats_line_breaks_only_between_its_parts(gui):
    from PySide6.QtGui import QFontMetrics, QTextLayout

    from app.ui.chat_view import stats_line

    stats = {"completion_tokens": 28, "decode_tok_s": 24.7, "ttft_s": 0.089, "prefill_tok_s": 369}
    line = stats_line(stats, "stopped")
    assert plain(line) == "28 tokens · 24.7 tok/s · first token 89 ms · prompt 369 tok/s · stopped"
    # a prompt of few new tokens says how many it read: their rate is mostly fixed cost
    few = {**stats, "prompt_tokens": 1237, "cached_tokens": 1200, "prefill_tok_s": 180.5}
    assert plain(stats_line(few, "done")).endswith("first token 89 ms · prompt 37 new tokens")
    assert plain(stats_line({**few, "cached_tokens": 0, "prompt_tokens": 40}, "done")).endswith(
        "· prompt 40 tokens"
    )
    one = {**few, "cached_tokens": 1236, "completion_tokens": 1}  # in the singular
    assert plain(stats_line(one, "done")).startswith("1 token · 24.7 tok/s")
    assert plain(stats_line(one, "done")).endswith("· prompt 1 new token")
    many = {**few, "cached_tokens": 1109}  # 128 new: enough for a rate
    assert plain(stats_line(many, "done")).endswith("· prompt 180 tok/s")
    font = gui.window.chat.font()
    widest = max(QFontMetrics(font).horizontalAdvance(p) for p in line.split(" · "))
    for width in range(widest + 1, 420, 5):  # a line breaks only at a separator's space
        layout = QTextLayout(line, font)
        layout.beginLayout()
        starts = []
        while (ln := layout.createLine()).isValid():
            ln.setLineWidth(width)
            starts.append(ln.textStart())
        layout.endLayout()
        assert len(starts) > 1 or width > 300
        assert all(line[s - 1] == " " for s in starts[1:]), (width, starts)


def test_the_composer_grows_with_its_text_up_to_a_share_of_the_view(gui, qloop):
    chat = gui.window.chat
    gui.window.resize(900, 600)
    qloop.run_until_complete(asyncio.sleep(0.05))
    empty = chat.input.height()
    buttons = chat.send_button.height() + chat.stop_button.height()
    assert buttons <= empty <= buttons + 20  # one line: as tall as Send and Stop, no more
    line = chat.input.fontMetrics().lineSpacing()
    heights = []
    for n in (3, 6):
        chat.input.setPlainText("\n".join(f"line {i}" for i in range(n)))
        heights.append(chat.input.height())
    assert heights[1] - heights[0] == 3 * line  # every line shows
    assert chat.input.verticalScrollBar().maximum() == 0
    chat.input.setPlainText("word " * 200)  # wrapped lines count too
    wrapped = chat.input.height()
    assert wrapped > heights[1]
    chat.input.setPlainText("\n".join(f"line {i}" for i in range(100)))
    assert chat.input.height() == int(chat.height() * 0.4)  # then it scrolls
    assert chat.input.verticalScrollBar().maximum() > 0
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert chat.stop_button.y() - chat.send_button.y() < 2 * chat.send_button.height()
    assert chat.stop_button.geometry().bottom() >= chat.input.geometry().bottom() - 2
    gui.window.resize(900, 420)  # a smaller window lowers the limit
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert chat.input.height() == int(chat.height() * 0.4)
    assert chat.scroll.height() > chat.input.height()
    send(gui, "hello")
    assert chat.input.height() == empty  # sent: back to one line
    wait_until(qloop, lambda: answer_done(gui), what="the answer")


def test_html_in_an_answer_is_shown_as_written(gui, qloop):
    send(gui, 'Wrap it in <div> and <b>this</b>, not **that**; <img src="/x.png"> & 5 < 6')
    wait_until(qloop, lambda: answer_done(gui))
    body = gui.window.chat.widgets[-1].body
    assert body.toPlainText().strip() == (
        'You said: Wrap it in <div> and <b>this</b>, not that; <img src="/x.png"> & 5 < 6'
    )  # the Markdown is rendered, the tags are text
    assert "<img" not in body.toHtml().replace("&lt;img", "")


def to_html(text: str) -> str:
    """A message's HTML as the chat draws it."""
    from app.ui.markdown import render

    return render(text)[0]


def test_a_markdown_table_has_rules_and_cell_padding(qapp):
    from PySide6.QtGui import QTextDocument, QTextTable

    doc = QTextDocument()
    doc.setHtml(to_html("Tags:\n\n| tag | use |\n|---|---|\n| `<div>` | block |"))
    tables = [f for f in doc.rootFrame().childFrames() if isinstance(f, QTextTable)]
    assert len(tables) == 1 and (tables[0].rows(), tables[0].columns()) == (2, 2)
    fmt = tables[0].format()
    assert fmt.border() == 1 and fmt.cellPadding() == 5 and fmt.cellSpacing() == 0
    assert tables[0].cellAt(1, 0).firstCursorPosition().block().text() == "<div>"


@pytest.mark.parametrize("dark", [False, True])
def test_inline_code_in_an_answer_has_a_fixed_pitch_font_on_a_ground_of_its_own(qapp, dark):
    """In the answer's own document: the code's characters (escaped as written) in a
    fixed-pitch font on the theme's code ground; the words around it on none (in the font
    alone, inline code hardly stood out of a sentence)."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QColor, QFontInfo

    from app.ui.chat_view import MessageWidget
    from app.ui.markdown import INLINE_CODE_BG

    w = MessageWidget("assistant", dark)
    w.set_content("Run `pip install x<2` now.", "done", {})
    block, parts = w.body.document().firstBlock(), []
    it = block.begin()
    while not it.atEnd():
        fmt = it.fragment().charFormat()
        parts.append((it.fragment().text(), QFontInfo(fmt.font()).fixedPitch(), fmt.background()))
        it += 1
    assert [(text, fixed) for text, fixed, _ in parts] == [
        ("Run ", False),
        ("pip install x<2", True),
        (" now.", False),
    ]
    assert parts[1][2].color() == QColor(INLINE_CODE_BG[dark])
    assert parts[0][2].style() == parts[2][2].style() == Qt.BrushStyle.NoBrush
    assert INLINE_CODE_BG[False] != INLINE_CODE_BG[True]
    w.deleteLater()


def test_an_answer_keeps_its_line_breaks(qapp):
    """A single newline in an answer is a line break (Markdown would join the lines); a blank
    line still starts a paragraph, and a list may follow its introducing line directly (tables:
    test_a_markdown_table_has_rules_and_cell_padding)."""
    from PySide6.QtGui import QTextDocument

    def lines(text: str) -> list[str]:
        doc = QTextDocument()
        doc.setHtml(to_html(text))
        return doc.toPlainText().replace("\u2028", "\n").split("\n")

    assert lines("Roses are red,\nviolets are blue.") == ["Roses are red,", "violets are blue."]
    assert lines("def add(a, b):\n    return a + b") == ["def add(a, b):", "return a + b"]
    html = to_html("One.\n\nTwo.\n- a\n- b")  # the list right under its line
    assert html.count("<p>") == 2 and html.count("<li>") == 2 and "<br" not in html
    assert "<ol>" in to_html("Steps:\n1. Boil water.\n2. Add tea.")
    assert lines("Steps:\n1. Boil water.\n2. Add tea.") == ["Steps:", "Boil water.", "Add tea."]


def test_a_bare_web_address_in_an_answer_is_a_link():
    html = to_html("Models: https://huggingface.co/VPTQ-community, see main.py or example.com")
    assert html.count("<a ") == 1  # file names and bare domains stay words
    assert '<a href="https://huggingface.co/VPTQ-community">' in html
    assert "<a " not in to_html("`https://example.com/x` in code")


def test_code_blocks_open_and_close_only_on_fence_lines():
    """Backticks inside a line are not a fence (an answer that wrote "type ``` to start a block"
    became code to its end, and a string holding ``` in the code closed its block there); a
    fence of four backticks holds one of three; a block in a list item is copied without the
    list's indent; a block still streaming counts."""
    from PySide6.QtGui import QTextDocument

    from app.ui.markdown import code_blocks

    prose = "Type ``` to start a block.\nThen more prose."
    assert code_blocks(prose) == [] and "<table" not in to_html(prose)
    assert to_html(prose) == "<p>Type ``` to start a block.<br />\nThen more prose.</p>"
    answer = 'Code:\n```python\ns = "```"\nprint(s)\n```\nAfter.'
    assert code_blocks(answer) == ['s = "```"\nprint(s)']
    assert to_html(answer).endswith("<p>After.</p>")  # prose again after the block
    assert code_blocks("````md\n```python\nx = 1\n```\n````\nend") == ["```python\nx = 1\n```"]
    assert code_blocks("```sh```\nnot code") == []  # a backtick after the language: no fence
    listed = "1. Run:\n   ```bash\n   ls -l\n     cd ..\n   ```\n2. Done."
    assert code_blocks(listed) == ["ls -l\n  cd .."]
    doc = QTextDocument()
    doc.setHtml(to_html(listed))
    assert doc.toPlainText().replace("\u2028", "\n").split("\n")[-1] == "Done."
    assert code_blocks("```python\nprint('streaming") == ["print('streaming"]
    assert code_blocks("a\n```\n\n```\nb") == [""]


def test_a_streamed_answer_is_parsed_once_each_time_it_is_drawn_and_copy_code_follows_it(
    qapp, monkeypatch
):
    """Each text a streamed answer is drawn with (the repaint timer's) is parsed once, for its
    HTML and its code blocks both (code_blocks parsed it a second time for Copy code), and Copy
    code appears with the first fence and copies the blocks as they stand; the same text again
    parses nothing."""
    from markdown_it import MarkdownIt
    from PySide6.QtGui import QGuiApplication

    from app.ui.chat_view import MessageWidget
    from app.ui.markdown import code_blocks, render

    parses = []
    parse = MarkdownIt.parse
    monkeypatch.setattr(MarkdownIt, "parse", lambda self, *a: parses.append(1) or parse(self, *a))
    w = MessageWidget("assistant", False)
    pieces = ["Here:\n", "```python\n", "x = 1\n", "```\nand\n", "```sh\nls"]
    text, seen = "", []
    for piece in pieces:
        text += piece
        w.set_content(text, "streaming", {})
        seen.append(not w.copy_code.isHidden())
    assert len(parses) == len(pieces)
    assert seen == [False, True, True, True, True]
    w.set_content(text, "done", {})
    assert len(parses) == len(pieces)
    w.copy_code.click()
    assert QGuiApplication.clipboard().text() == "x = 1\n\nls" == "\n\n".join(code_blocks(text))
    for sample in (text, "no code", "1. Run:\n   ```bash\n   ls -l\n   ```\n2. Done."):
        assert render(sample)[1] == code_blocks(sample)


def test_a_code_block_in_a_list_item_is_drawn_in_the_item(qapp):
    """A fenced block inside a list item sits under the item's text, and the list goes on after
    it as one list (the blocks were cut out before Markdown: drawn at the message's left edge,
    the list split in two around them); a block at the top level stays at the left edge."""
    from PySide6.QtGui import QTextDocument, QTextTable

    doc = QTextDocument()
    doc.setTextWidth(500)
    doc.setHtml(to_html("1. Run:\n   ```bash\n   ls -l\n   ```\n2. Done.\n\n```\ntop\n```\nEnd."))
    layout = doc.documentLayout()
    tables = [f for f in doc.rootFrame().childFrames() if isinstance(f, QTextTable)]
    assert [t.cellAt(1, 0).firstCursorPosition().block().text() for t in tables] == ["ls -l", "top"]
    run, done, end = doc.findBlock(0), doc.find("Done.").block(), doc.find("End.").block()
    assert (run.text(), done.text()) == ("Run:", "Done.")
    assert run.textList() is not None and done.textList() == run.textList()
    assert done.textList().itemNumber(done) == 1  # the second item of the same list

    def text_left(block) -> float:
        return layout.blockBoundingRect(block).left() + block.layout().lineAt(0).x()

    indent = text_left(run) - text_left(end)
    assert indent > 20  # the list's
    lefts = [layout.frameBoundingRect(t).left() for t in tables]
    assert abs(lefts[0] - lefts[1] - indent) < 1  # the item's block that much right of the other


def test_one_message_s_markdown_does_not_carry_into_the_next():
    """The converter is built once and kept: a reference link defined in one answer must not
    turn the same words in a later answer into a link."""
    assert 'href="https://example.com/a"' in to_html("[docs]: https://example.com/a\n\nsee [docs]")
    assert "example.com" not in to_html("see [docs]")
    assert to_html("see [docs]") == "<p>see [docs]</p>"


def test_clicking_the_open_chat_while_it_answers_does_not_stop_the_answer(gui, qloop):
    send(gui, "slow")
    rows = gui.ctrl.messages.rows
    wait_until(qloop, lambda: len(rows) == 2 and rows[1].content.count("word") >= 5)
    gui.window.list.clicked.emit(gui.ctrl.conversations.index(0))  # the chat already open
    assert gui.ctrl.busy
    wait_until(qloop, lambda: answer_done(gui), timeout=60, what="the whole answer")
    last = gui.store.messages(gui.ctrl.current)[-1]
    assert last.status == "done" and last.content.count("word") == 400


def test_an_answer_goes_on_in_its_chat_while_another_is_open(gui, qloop):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    chat, ctrl = gui.window.chat, gui.ctrl
    send(gui, "slow")
    first = ctrl.current
    wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 5)
    second = ctrl.new_conversation()
    assert ctrl.busy  # opening another chat did not stop it
    titles = [ctrl.conversations.index(i).data() for i in range(2)]
    assert titles == ["New chat", "● slow"]  # the sidebar marks the chat being answered
    assert ctrl.conversations.index(1).data(Qt.ItemDataRole.EditRole) == "slow"
    assert chat.queue_note.isVisibleTo(gui.window)
    assert chat.queue_note.text().startswith("The model is answering in “slow”. A message")
    assert chat.send_button.isEnabled() and chat.stop_button.isEnabled()
    chat.input.setFocus()
    QTest.keyClicks(chat.input, "next question")  # a draft: the chat stays in the list
    # back in the first chat mid-answer: all the text so far, and the stream goes on there
    ctrl.open(first)
    assert not chat.queue_note.isVisibleTo(gui.window) and not chat.send_button.isEnabled()
    shown = ctrl.messages.rows[-1].content.count("word")
    assert shown >= 5 and ctrl.messages.rows[-1].status == "streaming"
    wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") > shown + 3)
    # a message sent in the other chat waits its turn, and is answered when the first ends
    ctrl.open(second)
    assert chat.input.toPlainText() == "next question"  # the draft came back with its chat
    chat.input.setFocus()
    QTest.keyClick(chat.input, Qt.Key.Key_Return)
    assert chat.input.toPlainText() == ""
    assert [(m.role, m.content) for m in ctrl.messages.rows] == [("user", "next question")]
    assert [ctrl.conversations.index(i).data() for i in range(2)] == ["○ next question", "● slow"]
    assert chat.queue_note.text().startswith(
        "This chat waits its turn: the model answers here after the answer in “slow”."
    )
    assert not chat.send_button.isEnabled()  # one message a chat at a time
    wait_until(qloop, lambda: answer_done(gui), timeout=60, what="the queued answer")
    stored = gui.store.messages(first)[-1]
    assert stored.status == "done" and stored.content.count("word") == 400
    assert ctrl.messages.rows[-1].content == "You said: next question"
    assert not chat.queue_note.isVisibleTo(gui.window) and chat.send_button.isEnabled()
    assert [ctrl.conversations.index(i).data() for i in range(2)] == ["next question", "slow"]
    ctrl.open(first)
    assert chat.widgets[-1].body.toPlainText().count("word") == 400


def test_queued_messages_are_answered_in_the_order_sent(tmp_path, qloop, monkeypatch):
    from .conftest import make_app

    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    app = make_app(tmp_path / "data", qloop, monkeypatch)
    ctrl = app.ctrl
    try:
        earlier, answering = answered_then_answering(app, qloop, "done before")
        chats = {}
        for text in ("one", "two", "three"):
            chats[text] = ctrl.new_conversation()
            send(app, text)
        assert ctrl.waiting == [chats["one"], chats["two"], chats["three"]]
        assert app.window.chat.queue_note.text().startswith(
            "This chat waits its turn: the model answers here after the answer in “slow” and 2 "
            "more waiting before it."
        )
        ctrl.delete(chats["two"])  # a deleted chat leaves the queue
        assert ctrl.waiting == [chats["one"], chats["three"]]
        # Regenerate in a chat that waits for nothing queues too (Continue needs a free model)
        ctrl.open(earlier)
        qloop.run_until_complete(asyncio.sleep(0.05))  # the new message widgets are shown
        w = app.window.chat.widgets[-1]
        assert w.regen.isVisibleTo(app.window) and app.window.chat.widgets[0].edit.isEnabled()
        w.regen.click()
        assert ctrl.waiting == [chats["one"], chats["three"], earlier]
        assert [m.role for m in ctrl.messages.rows] == ["user"]  # the old answer went
        assert app.window.chat.context.text() == ""  # and the context it had filled
        assert not app.window.chat.widgets[0].edit.isEnabled()  # one message at a time
        ctrl.open(answering)
        app.window.chat.stop_button.click()  # Stop ends the answer being written, not the queue
        wait_until(qloop, lambda: not ctrl.waiting and not ctrl.busy, what="the queue")
        asked = [
            r["messages"][-1]["content"]
            for r in map(json.loads, requests.read_text().splitlines())
            if r["type"] == "generate"
        ]
        assert asked == ["done before", "slow", "one", "three", "done before"]
        assert gui_answers(app, earlier) == ["You said: done before"]  # answered again
        assert gui_answers(app, chats["one"]) == ["You said: one"]
        assert gui_answers(app, chats["three"]) == ["You said: three"]
        assert app.store.messages(answering)[-1].status == "stopped"
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_continue_in_another_chat_waits_its_turn(gui, qloop):
    ctrl, chat = gui.ctrl, gui.window.chat
    send(gui, "slow")
    wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 2)
    chat.stop_button.click()
    wait_until(qloop, lambda: answer_done(gui), what="the stop")
    stopped = ctrl.current
    ctrl.new_conversation()
    send(gui, "slow")
    wait_until(qloop, lambda: ctrl.messages.rows[-1].content.count("word") >= 2)
    ctrl.open(stopped)
    qloop.run_until_complete(asyncio.sleep(0.05))  # the new message widgets are shown
    more = chat.widgets[-1].more
    assert more.isVisibleTo(gui.window)
    more.click()
    assert ctrl.waiting == [stopped] and not chat.widgets[-1].more.isVisibleTo(gui.window)
    assert chat.queue_note.text().startswith("This chat waits its turn: the model answers here")
    chat.stop_button.click()  # ends the other chat's answer: this one goes on
    wait_until(qloop, lambda: not ctrl.busy and not ctrl.waiting, what="the continuation")
    last = gui.store.messages(stopped)[-1]
    assert last.content.endswith(" and more.") and last.status == "done"
    assert ctrl.messages.rows[-1].content == last.content  # shown in the open chat as well


def answered_then_answering(app, qloop, text):
    """A chat with ``text`` answered, then another whose long answer ("slow") is being
    written, open: their ids."""
    send(app, text)
    wait_until(qloop, lambda: answer_done(app))
    done = app.ctrl.current
    app.ctrl.new_conversation()
    send(app, "slow")
    wait_until(qloop, lambda: app.ctrl.messages.rows[-1].content.count("word") >= 3)
    return done, app.ctrl.current


def gui_answers(app, cid):
    return [m.content for m in app.store.messages(cid) if m.role == "assistant"]


def test_deleting_the_chat_being_answered_from_another_stops_its_answer(gui, qloop, monkeypatch):
    from PySide6.QtWidgets import QMessageBox

    ctrl = gui.ctrl
    kept, doomed = answered_then_answering(gui, qloop, "first chat")
    ctrl.open(kept)
    monkeypatch.setattr(QMessageBox, "question", lambda *a: QMessageBox.StandardButton.Yes)
    gui.window.list.setCurrentIndex(ctrl.conversations.index(ctrl.conversations.row_of(doomed)))
    ctrl.delete(doomed)
    wait_until(qloop, lambda: not ctrl.busy, what="the stopped answer")
    assert [c.id for c in gui.store.conversations()] == [kept]
    assert not gui.window.chat.queue_note.isVisibleTo(gui.window)
    assert [m.content for m in ctrl.messages.rows] == ["first chat", "You said: first chat"]
    send(gui, "again")  # the engine is free for the next answer
    wait_until(qloop, lambda: answer_done(gui))
    assert ctrl.messages.rows[-1].content == "You said: again"


def test_the_arrow_keys_in_the_chat_list_open_chats(gui, qloop):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    for text in ("first chat", "second chat"):
        gui.ctrl.new_conversation()
        send(gui, text)
        wait_until(qloop, lambda: answer_done(gui))
    assert [c.title for c in gui.ctrl.conversations.rows] == ["second chat", "first chat"]
    gui.window.list.setFocus()
    QTest.keyClick(gui.window.list, Qt.Key.Key_Down)
    assert gui.store.conversation(gui.ctrl.current).title == "first chat"
    assert gui.ctrl.messages.rows[0].content == "first chat"
    QTest.keyClick(gui.window.list, Qt.Key.Key_Up)
    assert gui.ctrl.messages.rows[0].content == "second chat"
    gui.window.search.setText("first")  # the list changes under the selection: nothing opens
    assert gui.ctrl.messages.rows[0].content == "second chat"


def test_the_chat_settings_take_two_columns_where_the_pane_is_wide(gui, qloop):
    panel = gui.window.chat_settings
    panel.toggle.click()
    f = panel.fields

    def settle(w, h):
        gui.window.resize(w, h)
        qloop.run_until_complete(asyncio.sleep(0.05))

    settle(1200, 800)
    assert panel.width() >= panel.two_columns_width() > 400
    assert f["top_p"].y() == f["temperature"].y() < f["top_k"].y()  # side by side
    wide = panel.height()
    settle(760, 500)
    assert panel.width() < panel.two_columns_width()
    assert f["temperature"].y() < f["top_p"].y() < f["top_k"].y()  # one above the other
    assert panel.height() > wide + 2 * f["top_k"].height()
    assert all(b.isVisibleTo(gui.window) and b.width() > 40 for b in f.values())
    settle(1200, 800)
    assert f["top_p"].y() == f["temperature"].y()
    bar = panel.area.verticalScrollBar()
    assert bar.maximum() == 0  # all in view
    # at a larger text size two columns need more room: one, every field whole in the pane
    # (a fixed 560 px kept two and cut the right column's fields off)
    view = panel.area.viewport()
    gui.window.user_sized = True  # dragged panes keep their widths
    for size in (125, 150, 200):
        while gui.settings.text_size < size:
            menu_action(gui.window, "&Larger text").trigger()
        qloop.run_until_complete(asyncio.sleep(0.05))
        two = panel.width() >= panel.two_columns_width()
        assert (f["top_p"].y() == f["temperature"].y()) == two, size
        for box in f.values():
            assert box.mapTo(view, box.rect().topRight()).x() < view.width(), (size, box)
    assert not two  # at 200% in this window: one column


def test_open_chat_settings_in_a_short_window_scroll_and_leave_the_chat_room(gui, qloop):
    """Open in a 780 x 420 window, the one-column settings made the window taller than asked
    (433 px) and left the conversation 60 px: now they take at most 45% of the pane, scroll,
    and the conversation keeps the rest."""
    panel = gui.window.chat_settings
    panel.toggle.click()
    gui.window.resize(780, 420)
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert gui.window.height() == 420
    central = gui.window.centralWidget().height()
    assert panel.area.height() <= 0.45 * central + 1
    assert gui.window.chat.height() >= 0.3 * central
    bar = panel.area.verticalScrollBar()
    assert bar.maximum() > 0  # the rest is a scroll away
    panel.area.ensureWidgetVisible(panel.fields["seed"])
    qloop.run_until_complete(asyncio.sleep(0.05))
    seed = panel.fields["seed"]
    top = seed.mapTo(panel.area.viewport(), seed.rect().topLeft()).y()
    assert top >= 0 and top + seed.height() <= panel.area.viewport().height()


def test_continue_writes_more_of_a_cut_or_stopped_answer(tmp_path, qloop, monkeypatch):
    from .conftest import make_app

    requests = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(requests))
    app = make_app(tmp_path / "data", qloop, monkeypatch)
    try:
        cid = app.ctrl.new_conversation()
        app.ctrl.continue_answer()  # an empty chat: nothing to go on with
        assert app.ctrl.messages.rows == [] and not app.ctrl.busy
        app.ctrl.store.update_conversation(cid, sampling={"max_new_tokens": 3})
        send(app, "one two three four")
        wait_until(qloop, lambda: answer_done(app))
        w = app.window.chat.widgets[-1]
        assert w.body.toPlainText().strip() == "You said: one"  # cut at 3 tokens
        assert "cut at the token limit" in plain(w.meta.text())
        assert w.more.isVisibleTo(app.window) and w.regen.isVisibleTo(app.window)
        w.more.click()
        assert not w.more.isVisibleTo(app.window)  # while it writes
        app.ctrl.continue_answer()  # and takes no second continue
        wait_until(qloop, lambda: answer_done(app), what="the continuation")
        kinds = [json.loads(line)["type"] for line in requests.read_text().splitlines()]
        assert kinds.count("generate") == 2
        sent = last_request(requests, "generate")
        assert sent["continue"] is True
        assert sent["messages"][-1] == {"role": "assistant", "content": "You said: one"}
        stored = app.store.messages(cid)
        assert [(m.role, m.content, m.status) for m in stored] == [
            ("user", "one two three four", "done"),
            ("assistant", "You said: one and more.", "done"),  # the same message, written on
        ]
        assert stored[1].stats["completion_tokens"] == 5 and "truncated" not in stored[1].stats
        w = app.window.chat.widgets[-1]
        assert w.body.toPlainText().strip() == "You said: one and more."
        assert plain(w.meta.text()).startswith("5 tokens") and not w.more.isVisibleTo(app.window)
        # the context: the continuation's prompt (12 tokens in the fake engine's stats: the
        # question and the cut answer) and its own 2 tokens, not all 5 of the answer on top;
        # the same when the chat is opened again
        assert app.window.chat.context.text() == "Context: 14 / 2048 tokens"
        app.ctrl.new_conversation()
        app.ctrl.open(cid)
        assert app.window.chat.context.text() == "Context: 14 / 2048 tokens"
        # a stopped answer can be continued too; a whole one not
        app.ctrl.store.update_conversation(cid, sampling={})
        send(app, "slow")
        rows = app.ctrl.messages.rows
        wait_until(qloop, lambda: rows[-1].content.count("word") >= 3)
        app.window.chat.stop_button.click()
        wait_until(qloop, lambda: answer_done(app))
        assert app.window.chat.widgets[-1].more.isVisibleTo(app.window)
        app.ctrl.continue_answer()
        wait_until(qloop, lambda: answer_done(app))
        assert rows[-1].content.endswith(" and more.") and rows[-1].status == "done"
        assert len(app.store.messages(cid)) == 4
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_the_chat_list_deletes_with_the_delete_key_and_has_a_context_menu(gui, qloop, monkeypatch):
    from PySide6.QtCore import QPoint, Qt
    from PySide6.QtGui import QContextMenuEvent
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QMenu, QMessageBox

    for text in ("first chat", "second chat"):
        gui.ctrl.new_conversation()
        send(gui, text)
        wait_until(qloop, lambda: answer_done(gui))
    asked = []
    monkeypatch.setattr(
        QMessageBox, "question", lambda *a: asked.append(a[2]) or QMessageBox.StandardButton.Yes
    )
    gui.window.chat.input.setPlainText("abc")
    gui.window.chat.input.setFocus()
    QTest.keyClick(gui.window.chat.input, Qt.Key.Key_Home)
    QTest.keyClick(gui.window.chat.input, Qt.Key.Key_Delete)  # in the composer: edits the text
    assert gui.window.chat.input.toPlainText() == "bc" and not asked
    # a right click on the other chat opens it and offers Rename, Export, Delete
    shown = []
    monkeypatch.setattr(QMenu, "exec", lambda actions, *a: shown.append(actions) or None)
    rect = gui.window.list.visualRect(gui.ctrl.conversations.index(1))
    gui.window.list.contextMenuEvent(
        QContextMenuEvent(QContextMenuEvent.Reason.Mouse, rect.center(), QPoint(0, 0))
    )
    assert gui.store.conversation(gui.ctrl.current).title == "first chat"
    assert [a.text() for a in shown[0]] == [
        "Rename", "Export as Markdown…", "Export as JSON…", "Delete…"
    ]  # fmt: skip
    shown[0][0].trigger()
    assert gui.window.list.state() == gui.window.list.State.EditingState
    QTest.keyClick(gui.window.list.focusWidget() or gui.window.list, Qt.Key.Key_Escape)
    gui.window.list.setFocus()
    QTest.keyClick(gui.window.list, Qt.Key.Key_Delete)  # in the list: asks, then deletes
    assert asked == ["Delete “first chat”? This cannot be undone."]
    assert [c.title for c in gui.ctrl.conversations.rows] == ["second chat"]


def test_enter_sends_and_shift_enter_starts_a_new_line(gui, qloop):
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest

    sent = []
    gui.window.chat.send_requested.connect(sent.append)
    box = gui.window.chat.input
    box.setFocus()
    QTest.keyClicks(box, "first line")
    QTest.keyClick(box, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)
    QTest.keyClicks(box, "second")
    assert box.toPlainText() == "first line\nsecond" and not sent
    QTest.keyClick(box, Qt.Key.Key_Return)
    assert sent == ["first line\nsecond"]
    wait_until(qloop, lambda: answer_done(gui))
    assert box.toPlainText() == ""  # the controller took it
    user = [r for r in gui.ctrl.messages.rows if r.role == "user"]
    assert [r.content for r in user] == ["first line\nsecond"]
    QTest.keyClicks(box, "again")
    QTest.keyClick(box, Qt.Key.Key_Enter, Qt.KeyboardModifier.ControlModifier)  # keypad, Ctrl
    assert sent[-1] == "again"
    wait_until(qloop, lambda: answer_done(gui))
    QTest.keyClick(box, Qt.Key.Key_Return)  # an empty box sends nothing
    assert len(sent) == 2
    rows = len(gui.ctrl.messages.rows)
    assert gui.ctrl.send(" \n\t") is False  # nor does blank text (the controller's check)
    assert len(gui.ctrl.messages.rows) == rows and not gui.ctrl.busy


def test_titles_from_first_messages():
    from app.controller import _title_from

    assert _title_from("```python\ndef f(x):\n    return x\n```") == "def f(x): return x"
    assert _title_from("Why does `x` fail?\n```\nboom\n```") == "Why does `x` fail? boom"
    assert _title_from("```") == "```"  # nothing else to name it by
    long = " ".join(f"w{i}" for i in range(12))
    assert _title_from(long) == "w0 w1 w2 w3 w4 w5 w6 w7…"
    eight = " ".join(f"w{i}" for i in range(8))
    assert _title_from(eight) == eight  # eight words: whole, no ellipsis
    assert _title_from("x" * 60) == "x" * 60  # 60 characters: whole
    assert _title_from("x" * 61) == "x" * 60 + "…"
    assert _title_from("```c++ int x;```  \n ok") == "int x; ok"
    # bold marks go; powers, spaced stars, Python's dunders and an unclosed mark stay
    assert _title_from("Show me **bold** text") == "Show me bold text"
    assert _title_from("Is 2**10 more than 3**6?") == "Is 2**10 more than 3**6?"
    assert _title_from("a ** b ** c") == "a ** b ** c"
    assert _title_from("Why is **my __init__** slow?") == "Why is my __init__ slow?"
    assert _title_from("**unclosed bold") == "**unclosed bold"


def test_regenerate_keeps_answers_with_the_model_s_text_only():
    """Not the note left where the engine could not answer at all."""
    from app.controller import _worth_keeping
    from app.store import Message

    def answer(content, status="done"):
        return Message(1, 1, "assistant", content, status)

    assert _worth_keeping(answer("Paris.")) and _worth_keeping(answer("half an ans", "error"))
    assert _worth_keeping(answer("⚠ Mind the step: it is wet."))  # a model's own sign
    assert not _worth_keeping(answer("⚠ the engine could not answer", "error"))
    assert not _worth_keeping(answer(" \n", "stopped"))


def test_which_answers_can_be_continued():
    """An assistant's answer with text, stopped by the user, cut at the token limit or ended
    by an error (a crash mid-answer)."""
    from app.controller import can_continue

    assert can_continue("assistant", "stopped", {}, "Once upon")
    assert can_continue("assistant", "error", {}, "Once upon")
    assert not can_continue("assistant", "error", {}, "")  # failed before a word
    assert can_continue("assistant", "done", {"truncated": True}, "Once upon")
    assert not can_continue("assistant", "done", {}, "Once upon")  # finished by itself
    assert not can_continue("assistant", "done", {"truncated": False}, "Once upon")
    assert not can_continue("assistant", "stopped", {}, "")  # nothing to go on from
    assert not can_continue("user", "stopped", {"truncated": True}, "hello")


def test_sampling_settings_compare_with_a_seed_of_none_as_no_seed():
    from app.controller import _same_sampling

    assert _same_sampling({"temperature": 0.7, "seed": None}, {"temperature": 0.7})
    assert _same_sampling({"temperature": 0.7}, {"seed": None, "temperature": 0.7})
    assert not _same_sampling({"temperature": 0.7, "seed": 1}, {"temperature": 0.7})
    assert not _same_sampling({"temperature": 0.7}, {"temperature": 0.8})


def base_points() -> float:
    from PySide6.QtGui import QFontDatabase

    return QFontDatabase.systemFont(QFontDatabase.SystemFont.GeneralFont).pointSizeF()


def test_larger_text_grows_every_window_s_text_and_is_kept(gui, qloop):
    """View > Larger text (Ctrl++, Ctrl+=), Smaller text (Ctrl+-), Normal text size (Ctrl+0):
    all of the app's text in steps of the system's size, also what the style sheet styles (Qt
    left those widgets at their size) and bold labels; a wrapped code line still hangs by its
    indent in the new font's spaces; the composer fits the new lines; kept for the next
    start; the steps end at 70% and 200%."""
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QFont
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication, QBoxLayout, QLabel

    base = base_points()
    w = gui.window
    call = "    result = compute(" + ", ".join(f"argument_{i}" for i in range(40)) + ")"
    send(gui, f"```python\ndef f():\n{call}\n```")
    wait_until(qloop, lambda: answer_done(gui))
    answer = w.chat.widgets[-1]
    composer, before = w.chat.input.height(), code_space_px(answer.body.font())
    heading = next(x for x in w.panel.findChildren(QLabel) if x.text() == "Throughput")
    ctrl = Qt.KeyboardModifier.ControlModifier
    w.activateWindow()
    wait_until(qloop, lambda: QApplication.activeWindow() is w)
    QTest.keyClick(w.chat.input, Qt.Key.Key_Equal, ctrl)
    QTest.keyClick(w.chat.input, Qt.Key.Key_Plus, ctrl)
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert gui.settings.text_size == 125
    assert Settings.load(gui.data / "settings.json").text_size == 125  # saved at once
    assert w.statusBar().currentMessage() == "Text size 125%"
    for widget in (QApplication.instance(), w.chat.input, answer.body, answer.meta, w.search):
        assert widget.font().pointSizeF() == pytest.approx(1.25 * base), widget
    for label in (answer.who, heading):  # bold, at the size of the text around it
        assert label.font().pointSizeF() == pytest.approx(1.25 * base)
        assert label.font().weight() == QFont.Weight.Bold
    assert answer.body.document().defaultFont().pointSizeF() == pytest.approx(1.25 * base)
    space = code_space_px(answer.body.font())
    assert space > 1.15 * before  # the hang follows the new spaces' width
    for offset in wrap_offsets(answer.body, "    result = compute("):
        assert abs(offset - 6 * space) < 1.5, (offset, space)  # 4 columns of indent, then 2
    assert w.chat.input.height() > composer
    QTest.keyClick(w.chat.input, Qt.Key.Key_Minus, ctrl)
    assert gui.settings.text_size == 110
    assert answer.body.font().pointSizeF() == pytest.approx(1.1 * base)
    QTest.keyClick(w.chat.input, Qt.Key.Key_0, ctrl)
    assert gui.settings.text_size == 100 and answer.who.font().pointSizeF() == base
    larger, smaller, normal = (
        menu_action(w, t) for t in ("&Larger text", "&Smaller text", "&Normal text size")
    )
    assert not normal.isEnabled() and larger.isEnabled() and smaller.isEnabled()
    wide = QBoxLayout.Direction.LeftToRight
    assert answer.head.direction() == wide  # the buttons beside "Assistant"
    for size in (110, 125, 150, 175, 200, 200):
        larger.trigger()
        assert gui.settings.text_size == size
    assert not larger.isEnabled() and normal.isEnabled()
    # in a small window the buttons go under the name: they had widened the message past the
    # chat's edge, which cut off its right side
    w.resize(780, 560)
    wait_until(qloop, lambda: w.width() == 780)
    assert w.split.sizes()[2] == 0  # the panel folded away for the chat (424 px at 200%)
    menu_action(w, "&Live panel").trigger()  # asked for: shown, the chat narrow
    qloop.run_until_complete(asyncio.sleep(0.05))
    view = w.chat.scroll.viewport()
    assert answer.head.direction() == QBoxLayout.Direction.TopToBottom
    assert answer.width() < view.width()
    for button in (answer.copy, answer.copy_code, answer.regen):
        right = button.mapTo(view, button.rect().topRight()).x()
        assert button.isVisibleTo(w) and right < view.width(), button.text()
        # whole, on as many rows as they need (squeezed into one, a label was cut, "Co…de"),
        # all above the message's text
        assert button.width() >= button.sizeHint().width(), button.text()
        assert button.geometry().bottom() < answer.meta.geometry().top(), button.text()
    assert len({b.y() for b in (answer.copy, answer.copy_code, answer.regen)}) > 1
    # the empty composer shows its hint's wrapped lines whole (they were cut off)
    box = w.chat.input
    metrics, flags = box.fontMetrics(), Qt.TextFlag.TextWordWrap
    hint = metrics.boundingRect(
        0, 0, box.viewport().width() - 8, 10**6, flags, box.placeholderText()
    )
    assert box.toPlainText() == "" and hint.height() >= 3 * metrics.lineSpacing()  # it wraps
    assert box.viewport().height() >= hint.height()
    # the buttons' row follows the buttons shown, not only a resize: a message wide enough for
    # its buttons without Regenerate takes them beside its name once Regenerate goes
    w.user_sized = True  # the panes keep their widths: the message takes what the window gains
    rows = answer.layout().contentsMargins()
    room = answer.width() - rows.left() - rows.right()
    need = (
        answer.name_row.minimumSize().width()
        + answer.head.spacing()
        + answer.button_row.sizeHint().width()
    )
    w.resize(w.width() + need - 4 - room, 560)
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert answer.head.direction() == QBoxLayout.Direction.TopToBottom
    w.chat.set_send_allowed(False)  # as while another chat's answer is written
    assert not answer.regen.isVisibleTo(w) and answer.head.direction() == wide
    w.chat.set_send_allowed(True)
    assert answer.head.direction() == QBoxLayout.Direction.TopToBottom
    for size in (175, 150, 125, 110, 100, 90, 80, 70, 70):
        smaller.trigger()
        assert gui.settings.text_size == size
    assert not smaller.isEnabled() and larger.isEnabled()
    assert QApplication.instance().font().pointSizeF() == pytest.approx(0.7 * base)
    assert answer.head.direction() == wide  # room again beside the name
    assert Settings.load(gui.data / "settings.json").text_size == 70
    gui.ctrl.new_conversation()  # an empty chat: no message to keep in place
    larger.trigger()
    assert gui.settings.text_size == 80


@pytest.mark.parametrize("saved, size", [(150, 150), (500, 200), (100, 100)])
def test_the_app_starts_at_the_text_size_it_closed_with(tmp_path, qloop, monkeypatch, saved, size):
    """The text size from settings.json (a hand-edited one beyond the steps: the largest), and
    the side panes' widths from it: a window shown at its size left them at their floors (160
    and 190 px in a 1100 px window), and at a larger size they take more of the width (the
    panel's lines were cut at its edge)."""
    from PySide6.QtWidgets import QApplication

    Settings(text_size=saved).save(tmp_path / "settings.json")
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        w = app.window
        assert app.settings.text_size == size
        assert QApplication.instance().font().pointSizeF() == pytest.approx(
            size / 100 * base_points()
        )
        assert w.chat.input.font().pointSizeF() == pytest.approx(size / 100 * base_points())
        wait_until(qloop, lambda: sum(w.split.sizes()) > 0)
        side, _, panel = w.split.sizes()
        total = sum(w.split.sizes())
        scale = size / 100
        assert side == max(160, min(round(230 * scale), round(total * 0.22)))
        assert panel == round(max(190, min(250 * scale, total * 0.25)))
        assert side > 160 and panel > 190
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_a_theme_change_redraws_the_chat_where_it_is(gui, qloop):
    """A switch between light and dark draws the messages again in the new code colours, in
    place: the chat was built again, which lost an edit in progress."""
    from PySide6.QtCore import Qt

    send(gui, "```python\nx = 1\n```")
    wait_until(qloop, lambda: answer_done(gui))
    chat = gui.window.chat
    widgets = list(chat.widgets)
    user, answer = widgets
    assert "#f4f4f4" in answer.body.toHtml()  # the light code background
    user.edit.click()
    user.editor.setPlainText("half written")
    gui._scheme_changed(Qt.ColorScheme.Dark)
    assert chat.widgets == widgets and user.editing()
    assert user.editor.toPlainText() == "half written"
    assert "#272822" in answer.body.toHtml() and "#f4f4f4" not in answer.body.toHtml()
    gui._scheme_changed(Qt.ColorScheme.Light)
    assert "#f4f4f4" in answer.body.toHtml() and user.editing()


def test_an_edit_in_progress_waits_while_another_chat_is_open(gui, qloop):
    """A message being edited when another chat is opened is still being edited, with what was
    typed, when its chat is opened again (it was lost), and sends from there."""
    from PySide6.QtWidgets import QApplication

    send(gui, "first question")
    wait_until(qloop, lambda: answer_done(gui))
    first = gui.ctrl.current
    chat = gui.window.chat
    chat.widgets[0].edit.click()
    chat.widgets[0].editor.setPlainText("the question, better put")
    gui.ctrl.new_conversation()
    send(gui, "elsewhere")
    wait_until(qloop, lambda: answer_done(gui))
    assert not any(w.editing() for w in chat.widgets)  # the other chat's messages: none
    gui.window.activateWindow()
    wait_until(qloop, lambda: QApplication.activeWindow() is gui.window)
    chat.input.setFocus()
    gui.ctrl.open(first)
    user = chat.widgets[0]
    assert user.editing() and user.editor.toPlainText() == "the question, better put"
    assert chat.input.hasFocus()  # not taken from the composer
    user.edit_send.click()
    wait_until(qloop, lambda: answer_done(gui) and len(gui.ctrl.messages.rows) == 2)
    assert gui.ctrl.messages.rows[0].content == "the question, better put"
    assert not chat.widgets[0].editing()
    gui.ctrl.new_conversation()
    gui.ctrl.open(first)
    assert not chat.widgets[0].editing()  # sent: nothing kept to edit


def test_an_edit_in_progress_is_still_there_after_a_quit(tmp_path, qloop, monkeypatch):
    """An edit typed just before the app quits (its save timer not fired yet) is in the history
    and the message is being edited, with it, when its chat opens in the next run (it was kept
    in memory and lost at quit); Cancel ends it there too."""
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        send(app, "first question")
        wait_until(qloop, lambda: answer_done(app))
        cid, chat = app.ctrl.current, app.window.chat
        question = chat.widgets[0]
        question.edit.click()
        question.editor.setPlainText("the question, better put")
        assert chat.edit_timer.isActive()  # typed within the last 300 ms: not saved yet
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()
    app = make_app(tmp_path, qloop, monkeypatch)
    try:
        app.ctrl.new_conversation()
        app.ctrl.open(cid)
        chat = app.window.chat
        question, answer = chat.widgets
        assert question.editing() and question.editor.toPlainText() == "the question, better put"
        assert not answer.editing()
        question.edit_cancel.click()
        assert not question.editing() and question.body.toPlainText() == "first question"
        mid = question.id
        wait_until(qloop, lambda: app.store.message(mid).edit is None, what="the edit's end")
    finally:
        qloop.run_until_complete(app.close())
        app.window.close()


def test_a_match_late_in_the_snippet_shows_in_a_narrow_chat_list(gui, qloop):
    """Where a snippet is wider than the chat list and its match comes late, the text before
    the match loses its start ("…") and the match (the reason the chat was found) is drawn:
    it was cut off at the row's end. Drawn in the text's own colour, the match is the only ink
    in the snippet's line darker than the muted colour of the rest."""
    from PySide6.QtGui import QColor

    from app.ui.colours import colour
    from app.ui.main_window import fit_snippet, snippet_parts
    from app.ui.models import SnippetRole

    chat = gui.store.create_conversation("negotiations")
    lead = "extraordinarily complicated international negotiations concerning "
    gui.store.add_message(chat.id, "user", lead + "Zanzibar")
    gui.ctrl.conversations.set_rows(gui.store.conversations())
    gui.window.resize(780, 500)
    gui.window.search.setText("zanzibar")
    qloop.run_until_complete(asyncio.sleep(0.1))
    view = gui.window.list
    index = gui.ctrl.conversations.index(0)
    parts = snippet_parts(index.data(SnippetRole))
    assert parts == [(lead, False), ("Zanzibar", True)]
    font, width = view.font(), view.visualRect(index).width() - 12
    assert QFontMetrics(font).horizontalAdvance(lead) > width  # the match is past the edge
    fitted = fit_snippet(parts, width, font)
    assert fitted[0][0].startswith("…") and lead.endswith(fitted[0][0][1:])
    assert fitted[0][1] is False  # still the muted text before the match
    assert QFontMetrics(font).horizontalAdvance(fitted[0][0]) <= width // 3
    assert fitted[1:] == [("Zanzibar", True)]
    wide = 4 * QFontMetrics(font).horizontalAdvance(lead)
    assert fit_snippet(parts, wide, font) == parts  # room for it all: all of it
    assert fit_snippet(parts[1:], 10, font) == parts[1:]  # nothing before the match
    rect = view.visualRect(index)
    image = view.viewport().grab(rect).toImage()
    muted = QColor(colour("muted", view)).lightness()
    half = image.height() // 2
    ink = sum(
        image.pixelColor(x, y).lightness() < muted - 40
        for x in range(4, image.width() - 4)
        for y in range(half, image.height() - 2)
    )
    assert ink > 20, ink  # the match's letters


def test_ctrl_wheel_over_any_window_changes_the_text_size(gui, qloop):
    """Ctrl+wheel over a message, the chat around it, the composer, the chat list, the panel or
    the Models window steps the app's text size, a notch a step and a touchpad's small turns
    adding up to one: over a message or the composer it had zoomed that one's text alone, and
    elsewhere it scrolled. A wheel without Ctrl scrolls as before; a closed window's app takes
    Ctrl+wheel no more."""
    from PySide6.QtCore import QPoint, QPointF, Qt
    from PySide6.QtGui import QWheelEvent
    from PySide6.QtWidgets import QApplication

    send(gui, "hello there")
    wait_until(qloop, lambda: answer_done(gui))
    chat = gui.window.chat
    body = chat.widgets[-1].body

    def wheel(target, dy, ctrl=True):
        mods = Qt.KeyboardModifier.ControlModifier if ctrl else Qt.KeyboardModifier.NoModifier
        pos = QPointF(5, 5)
        event = QWheelEvent(
            pos, QPointF(target.mapToGlobal(pos.toPoint())), QPoint(0, 0), QPoint(0, dy),
            Qt.MouseButton.NoButton, mods, Qt.ScrollPhase.NoScrollPhase, False,
        )  # fmt: skip
        QApplication.sendEvent(target, event)

    wheel(body.viewport(), 120)
    assert gui.settings.text_size == 110
    assert body.font().pointSizeF() == QApplication.instance().font().pointSizeF()  # no zoom
    assert body.document().defaultFont().pointSizeF() == body.font().pointSizeF()
    for _ in range(3):
        wheel(chat.scroll.viewport(), 30)  # a touchpad: three small turns, not yet a notch
    assert gui.settings.text_size == 110
    wheel(chat.scroll.viewport(), 30)
    assert gui.settings.text_size == 125
    wheel(body.viewport(), -120)
    wheel(body.viewport(), -120)
    assert gui.settings.text_size == 100
    wheel(body.viewport(), -120, ctrl=False)
    assert gui.settings.text_size == 100
    from app.ui.browser import ModelsWindow

    models = ModelsWindow(gui.window, gui.browser, lambda: None)  # (not shown: no catalogue)
    sizes = []
    for target in (
        chat.input.viewport(),
        gui.window.list.viewport(),
        gui.window.panel,
        models.browse.table.viewport(),
    ):
        wheel(target, 120)
        sizes.append(gui.settings.text_size)
    assert sizes == [110, 125, 150, 175]
    assert chat.input.font().pointSizeF() == QApplication.instance().font().pointSizeF()
    gui.window.close()
    wheel(models.browse.table.viewport(), 120)
    assert gui.settings.text_size == 175


def test_a_new_text_size_keeps_the_message_read_at_the_top(gui, qloop):
    """Scrolled up to read, a new text size keeps the message at the top of the view there
    (the view kept its offset in pixels and showed another part of the chat); at the chat's
    end it stays at the end."""
    chat_id = gui.store.create_conversation("long").id
    for i in range(30):
        gui.store.add_message(chat_id, "user", f"question {i} " + "word " * 30)
        gui.store.add_message(chat_id, "assistant", f"answer {i} " + "text " * 60)
    gui.ctrl.conversations.set_rows(gui.store.conversations())
    gui.ctrl.open(chat_id)
    qloop.run_until_complete(asyncio.sleep(0.2))
    chat = gui.window.chat
    bar = chat.scroll.verticalScrollBar()
    target = chat.widgets[20]
    bar.setValue(target.y() - 5)
    bar.actionTriggered.emit(bar.SliderAction.SliderMove)  # as the user's scrolling does
    assert not chat.pinned
    larger = menu_action(gui.window, "&Larger text")
    for _ in range(2):
        larger.trigger()
        qloop.run_until_complete(asyncio.sleep(0.1))
        assert abs(target.y() - bar.value() - 5) <= 2, (target.y(), bar.value())
    gui.window.chat.show_end()
    larger.trigger()
    qloop.run_until_complete(asyncio.sleep(0.1))
    assert bar.value() == bar.maximum()


def test_the_chat_list_has_a_heading_where_each_time_group_starts(gui, qloop):
    """Today, Yesterday, ... above the first chat of each (a long list was one run of titles):
    that row is taller by the heading, which is drawn above the title in the muted colour and
    outside the selection; the rest keep a title's height. Past midnight the headings move on
    at the window's next second."""
    from PySide6.QtGui import QColor

    from app.ui.colours import colour
    from app.ui.models import GroupRole

    now, day = time.time(), 86400
    for title, age in [("older", 3 * day), ("yesterday's", day), ("today's", 0)]:
        c = gui.store.create_conversation(title)
        gui.store.db.execute("UPDATE conversations SET updated=? WHERE id=?", (now - age, c.id))
    gui.ctrl.conversations.set_rows(gui.store.conversations())
    m, view = gui.ctrl.conversations, gui.window.list
    qloop.run_until_complete(asyncio.sleep(0.05))
    titles = [m.index(i).data() for i in range(m.rowCount())]
    assert titles == ["today's", "yesterday's", "older"]
    assert [m.index(i).data(GroupRole) for i in range(3)] == [
        "Today", "Yesterday", "Previous 7 days",
    ]  # fmt: skip
    line = view.fontMetrics().lineSpacing()
    heights = [view.visualRect(m.index(i)).height() for i in range(3)]
    assert all(h >= 2 * line for h in heights)  # a heading and a title each
    gui.store.db.execute("UPDATE conversations SET updated=?", (now,))
    gui.ctrl.conversations.set_rows(gui.store.conversations())  # all today: one heading
    qloop.run_until_complete(asyncio.sleep(0.05))
    first, second = (view.visualRect(m.index(i)) for i in range(2))
    assert second.height() < 2 * line and first.height() == heights[0]
    view.setCurrentIndex(m.index(0))
    qloop.run_until_complete(asyncio.sleep(0.05))
    image = view.viewport().grab(first).toImage()
    head = first.height() - second.height()  # the heading's part of the row
    muted = QColor(colour("muted", view))
    highlight = view.palette().color(view.palette().ColorRole.Highlight)

    def count(colour_, top, bottom):
        return sum(
            image.pixelColor(x, y).rgb() == colour_.rgb()
            for x in range(image.width())
            for y in range(top, bottom)
        )

    assert count(muted, 0, head) > 10  # the heading's letters (bold, in the muted colour)
    assert count(highlight, 0, head) == 0  # the selection is the title's
    assert count(highlight, head, first.height()) > 100
    m.clock = lambda: now + day  # the app left open past midnight
    gui.window._poll()
    assert m.index(0).data(GroupRole) == "Yesterday"


def test_titles_and_snippets_that_read_right_to_left_are_laid_out_so(gui, qloop):
    """A chat title in Arabic or Hebrew sits against the row's right edge, and a long one loses
    its end, the ellipsis at its left (both were laid out left to right: the ellipsis beside
    the title's first word); so does a search's snippet line. Left-to-right titles stay left."""
    from PySide6.QtCore import QModelIndex

    from app.ui.main_window import right_to_left

    assert right_to_left("שלום") and right_to_left("مرحبا") and right_to_left("12 ● שלום abc")
    assert not right_to_left("hello שלום") and not right_to_left("● 12 …")
    long_title = "مرحبا، كيف حالك اليوم؟ أريد أن أتعلم البرمجة بلغة بايثون من البداية"
    for title in (long_title, "שלום", "hello", "the row with the heading"):
        c = gui.store.create_conversation(title)
        gui.store.add_message(c.id, "user", title + " עולם" * (title == "שלום"))
    m, view = gui.ctrl.conversations, gui.window.list
    m.set_rows(gui.store.conversations())
    view.setCurrentIndex(QModelIndex())
    qloop.run_until_complete(asyncio.sleep(0.05))
    assert [m.index(i).data() for i in range(1, 4)] == ["hello", "שלום", long_title]

    def ink(row, top=0, bottom=None):
        """The row's image and the columns with ink between lines top and bottom."""
        rect = view.visualRect(m.index(row))
        image = view.viewport().grab(rect).toImage()
        paper = image.pixelColor(image.width() - 1, 0).rgb()
        cols = [
            x
            for x in range(image.width() - 1)
            if any(
                image.pixelColor(x, y).rgb() != paper for y in range(top, bottom or rect.height())
            )
        ]
        return image, cols

    image, cols = ink(1)  # hello
    assert cols and max(cols) < image.width() // 2
    image, cols = ink(2)  # שלום
    assert cols and min(cols) > image.width() // 2 and max(cols) > image.width() - 15
    image, cols = ink(3)  # cut short: its start at the right, the ellipsis at the left
    assert min(cols) < 15 and max(cols) > image.width() - 15
    dots = view.fontMetrics().horizontalAdvance("…")
    tall = max(
        sum(image.pixelColor(x, y).rgb() != image.pixelColor(image.width() - 1, 0).rgb()
            for y in range(image.height()))
        for x in range(min(cols), min(cols) + dots - 1)
    )  # fmt: skip
    assert tall <= 3  # dots on the baseline, not a letter
    gui.window.search.setText("עולם")
    qloop.run_until_complete(asyncio.sleep(0.1))
    assert m.rowCount() == 1
    half = view.visualRect(m.index(0)).height() // 2
    image, title_cols = ink(0, 0, half)
    image, snippet_cols = ink(0, half)
    assert min(title_cols) > image.width() // 2 and min(snippet_cols) > image.width() // 2
    assert max(snippet_cols) > image.width() - 15


def test_tab_goes_through_the_chat_in_reading_order(gui, qloop):
    """Tab from the chat's view goes through each message's buttons and text in order, then the
    composer and Send (the messages came last, after the live panel, as new widgets do), and on
    from the composer (it typed a tab there: only Ctrl+Tab left it). An edit box's Cancel and
    Send come after its text, before the next message."""
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    send(gui, "hello there")
    wait_until(qloop, lambda: answer_done(gui))
    gui.window.activateWindow()
    wait_until(qloop, lambda: QApplication.activeWindow() is gui.window)
    chat = gui.window.chat

    def tabs(start, n):
        start.setFocus()
        assert QApplication.focusWidget() is start, QApplication.focusWidget()
        names = []
        for _ in range(n):
            QTest.keyClick(QApplication.focusWidget(), Qt.Key.Key_Tab)
            names.append(QApplication.focusWidget().accessibleName())
        return names

    assert tabs(chat.scroll, 8) == [
        "Copy this message", "Edit this message and send it again", "You message",
        "Copy this message", "Answer again", "Assistant message", "Message", "Send message",
    ]  # fmt: skip
    assert chat.input.toPlainText() == ""  # Tab went on from the composer
    chat.widgets[0].edit.click()
    assert tabs(chat.widgets[0].editor, 3) == [
        "Cancel the edit", "Send the edited message", "Copy this message",
    ]  # fmt: skip
    assert QApplication.focusWidget() is chat.widgets[1].copy
    send(gui, "and again")  # a new message's controls come before the composer as well
    wait_until(qloop, lambda: answer_done(gui))
    gui.window.activateWindow()  # (Qt's offscreen platform lets it go at times)
    wait_until(qloop, lambda: QApplication.activeWindow() is gui.window)
    assert tabs(chat.widgets[2].body, 3) == [
        "Copy this message",
        "Answer again",
        "Assistant message",
    ]


def test_the_live_panel_holds_its_widest_word_at_a_large_text_size(gui, qloop):
    """At 200% in a small window the panel is as wide as its widest word (the heading
    "Throughput" was wider than its floor and every line of it ran past its edge, cut off).
    In a 700 px window the panel now folds away at 200% (the chat would have 320 px): 900."""
    gui.window.resize(900, 500)
    for _ in range(5):
        menu_action(gui.window, "&Larger text").trigger()
    qloop.run_until_complete(asyncio.sleep(0.1))
    assert gui.settings.text_size == 200
    assert gui.window.split.sizes()[2] > 190  # shown, above its floor
    gui.window.resize(700, 500)
    qloop.run_until_complete(asyncio.sleep(0.1))
    assert gui.window.split.sizes()[2] == 0  # folded away: the chat gets the room
    gui.window.resize(900, 500)
    qloop.run_until_complete(asyncio.sleep(0.1))
    panel = gui.window.panel
    content = panel.widget()
    assert content.minimumSizeHint().width() > 190  # wider than the floor
    assert content.width() <= panel.viewport().width()  # nothing past the edge


def test_a_flow_row_wraps_its_widgets_against_the_right_edge(qapp):
    """Side by side where the width holds them (exactly, too), else on more rows, each row set
    against the right edge; hidden widgets take no room; asking a height moves nothing."""
    from PySide6.QtCore import QRect, QSize
    from PySide6.QtWidgets import QWidget

    from app.ui.flow import FlowRow

    class Box(QWidget):
        def __init__(self, parent, width):
            super().__init__(parent)
            self.width_ = width

        def sizeHint(self):
            return QSize(self.width_, 10)

    host = QWidget()
    row = FlowRow(spacing=4)
    host.setLayout(row)
    assert (row.sizeHint(), row.minimumSize(), row.heightForWidth(100)) == (QSize(0, 0),) * 2 + (0,)
    boxes = [Box(host, width) for width in (50, 30, 40)]
    for box in boxes:
        row.addWidget(box)
    assert (row.sizeHint().width(), row.minimumSize().width()) == (50 + 30 + 40 + 8, 50)
    assert row.sizeHint().height() == row.minimumSize().height() == 10
    assert row.heightForWidth(200) == 10 and row.heightForWidth(100) == 24  # 10, 4, 10
    row.setGeometry(QRect(0, 0, 84, 24))  # 50 + 4 + 30: the first row, to the pixel
    assert row.geometry() == QRect(0, 0, 84, 24)
    placed = [b.geometry().getRect() for b in boxes]
    assert placed == [(0, 0, 50, 10), (54, 0, 30, 10), (44, 14, 40, 10)]
    assert row.heightForWidth(30) == 38  # one a row
    assert row.heightForWidth(74) == 24  # 50, then 30 + 4 + 40: the second row to the pixel
    assert [b.geometry().getRect() for b in boxes] == placed  # (a height asked: none moved)
    row.setGeometry(QRect(0, 0, 80, 24))  # a pixel short of 50 + 4 + 30: 30 goes down
    assert [b.geometry().y() for b in boxes] == [0, 14, 14]
    row.setGeometry(QRect(5, 3, 100, 24))
    assert [b.geometry().getRect() for b in boxes] == [
        (5 + 100 - 84, 3, 50, 10), (5 + 100 - 30, 3, 30, 10), (5 + 100 - 40, 17, 40, 10),
    ]  # fmt: skip
    boxes[1].hide()
    assert row.heightForWidth(94) == 10  # 50 + 4 + 40 in one row
    assert row.heightForWidth(60) == 24 and row.heightForWidth(20) == 24  # one a row
    boxes[2].hide()
    assert row.sizeHint() == QSize(50, 10)  # one: no spacing
    taken = row.takeAt(1)
    assert taken.widget() is boxes[1] and row.count() == 2 and row.takeAt(5) is None
    assert row.takeAt(0).widget() is boxes[0] and row.count() == 1
