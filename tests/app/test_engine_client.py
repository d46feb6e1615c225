"""EngineClient against the scripted fake engine and the real protocol."""

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from app.engine_client import EngineClient, EngineError

FAKE = [sys.executable, str(Path(__file__).with_name("fake_engine.py"))]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def drain(queue):
    events = []
    while True:
        msg = await queue.get()
        events.append(msg)
        if msg.type == "finished":
            return events


def text_of(events):
    return "".join(m.get("text") for m in events if m.type == "delta")


def make_client(tmp_path, states=None):
    def on_state(state, info):
        if states is not None:
            states.append(state)

    return EngineClient(
        FAKE,
        log_path=tmp_path / "engine.log",
        on_state=on_state,
        env={"PYTHONPATH": str(Path(__file__).parents[2])},
    )


def test_stream_and_load_progress(tmp_path):
    async def go():
        c = make_client(tmp_path)
        await c.start()
        progress = []
        loaded = await c.load("demo", on_progress=lambda f, s: progress.append((f, s)))
        assert loaded["n_ctx"] == 2048 and progress == [(0.5, "loading weights")]
        _, queue = c.generate([{"role": "user", "content": "hello there"}])
        events = await drain(queue)
        assert events[0].type == "started" and text_of(events) == "You said: hello there"
        assert events[-1].get("reason") == "stop"
        await c.shutdown()
        assert c.proc.returncode == 0

    run(go())


def test_cancel(tmp_path):
    async def go():
        c = make_client(tmp_path)
        await c.start()
        await c.load("demo")
        id_, queue = c.generate([{"role": "user", "content": "slow"}])
        while (await queue.get()).type != "delta":
            pass
        c.cancel(id_)
        events = await drain(queue)
        assert events[-1].get("reason") == "cancelled"
        assert events[-1].get("stats")["completion_tokens"] < 100
        await c.shutdown()

    run(go())


def test_load_error_is_raised_with_the_engines_message(tmp_path):
    async def go():
        c = make_client(tmp_path)
        await c.start()
        with pytest.raises(EngineError, match="/x/bad: no such model"):
            await c.load("/x/bad")
        assert c.state == "ready"
        await c.shutdown()

    run(go())


def test_crash_ends_the_request_then_restarts_and_reloads(tmp_path):
    states = []

    async def go():
        c = make_client(tmp_path, states)
        await c.start()
        await c.load("demo")
        first_pid = c.proc.pid
        _, queue = c.generate([{"role": "user", "content": "crash"}])
        events = await drain(queue)
        assert text_of(events).startswith("You said:")  # the partial answer arrived first
        err = next(m for m in events if m.type == "error")
        assert "stopped unexpectedly (exit code 3)" in err.get("message")
        assert str(tmp_path / "engine.log") in err.get("message")
        assert events[-1].get("reason") == "error"
        for _ in range(200):
            if c.state == "loaded" and c.proc.pid != first_pid:
                break
            await asyncio.sleep(0.05)
        assert c.state == "loaded" and c.proc.pid != first_pid
        _, queue = c.generate([{"role": "user", "content": "again"}])
        assert text_of(await drain(queue)) == "You said: again"
        await c.shutdown()

    run(go())
    assert "crashed" in states and states[-1] == "stopped"


async def wait_for_state(c, *states):
    for _ in range(2000):
        if c.state in states:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"state {c.state}, not one of {states}")


async def crash(c):
    """Kill c's engine with an answer ("crash") and return while it restarts."""
    _, queue = c.generate([{"role": "user", "content": "crash"}])
    await drain(queue)
    await wait_for_state(c, "crashed", "starting")


def requests_of(log: Path, type_: str) -> list[dict]:
    """The requests of one type the fake engine got, in order (FAKE_ENGINE_LOG)."""
    return [m for m in map(json.loads, log.read_text().splitlines()) if m["type"] == type_]


async def logged_client_after_a_crash(tmp_path, log):
    """A client whose engine logs its requests to ``log``, with /models/first loaded, returned
    while the engine restarts after a crash."""
    c = make_client(tmp_path)
    c.env["FAKE_ENGINE_LOG"] = str(log)
    await c.start()
    await c.load("/models/first")
    await crash(c)
    return c


def test_requests_made_while_the_engine_restarts_wait_for_it(tmp_path):
    """A load, a message and a stopped message made while the engine restarts after a crash go
    to the new process: the load replaces the reload of the old model (which the new engine
    then never gets), the message is answered by the reloaded model, and the stopped one ends
    without reaching the engine. They used to fail with "the engine is not running"."""
    log = tmp_path / "requests.jsonl"

    async def go():
        c = await logged_client_after_a_crash(tmp_path, log)
        loaded = await c.load("/models/second")
        assert loaded["model"] == "/models/second" and c.state == "loaded"
        # the first model, loaded before the crash, is not reloaded by the restart
        assert [m["path"] for m in requests_of(log, "load")] == [
            "/models/first",
            "/models/second",
        ]
        log.write_text("")
        await crash(c)  # a second restart
        id_, stopped = c.generate([{"role": "user", "content": "never sent"}])
        c.cancel(id_)
        _, queue = c.generate([{"role": "user", "content": "after the restart"}])
        events = await drain(queue)
        assert text_of(events) == "You said: after the restart", events
        assert [m.get("reason") for m in await drain(stopped)] == ["cancelled"]
        await c.shutdown()

    run(go())
    loads = [m["path"] for m in requests_of(log, "load")]
    prompts = [m["messages"][-1]["content"] for m in requests_of(log, "generate")]
    assert loads == ["/models/second"]  # the second restart reloads the user's model, once
    assert prompts == ["crash", "after the restart"]


def test_a_crash_during_the_reload_restarts_again_and_requests_wait_for_the_last(tmp_path):
    """Each crash of a reload starts another restart: a message made during the first waits
    through all of them and ends "not running" once the engine is given up, and no restart
    ends another's wait (a second restart used to find its signal already set)."""
    problems = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))
        c = make_client(tmp_path)
        c.max_restarts = 2
        await c.start()
        with pytest.raises(EngineError):
            await c.load("/models/crash-on-load")  # each reload kills the engine again
        await wait_for_state(c, "crashed", "starting")
        _, queue = c.generate([{"role": "user", "content": "hello"}])
        events = await drain(queue)
        assert c.state == "failed" and len(c._restarts) == 3
        assert [m.type for m in events] == ["error", "finished"]
        assert events[0].get("kind") == "not_running"  # not ended by the crashes before it

    run(go())
    assert not problems, problems


def test_shutdown_during_a_restart_stops_the_new_engine_without_its_reload(tmp_path):
    """Closing the app (or Restart engine) while the engine restarts after a crash: the new
    engine, still starting, is killed before it gets a request, and a message waiting for it
    ends "stopped"."""
    log = tmp_path / "requests.jsonl"

    async def go():
        c = await logged_client_after_a_crash(tmp_path, log)
        assert c.state == "starting"
        _, waiting = c.generate([{"role": "user", "content": "never sent"}])
        await c.shutdown()
        assert c.state == "stopped" and c.proc.returncode is not None
        assert [m.get("kind") for m in await drain(waiting)] == ["stopped", None]

    run(go())  # and no task left behind (asyncio.run waits for them)
    sent = [json.loads(line)["type"] for line in log.read_text().splitlines()]
    assert sent == ["hello", "load", "generate"]  # nothing reached the new engine


# shutdown()'s timeout in the two tests below, longer than the wait the test allows: an
# engine with nothing to finish is killed at once, not asked and waited for.
PATIENT = 30


def test_shutdown_does_not_wait_for_a_restart_that_hangs(tmp_path):
    """The engine restarting after a crash hangs before its hello: shutdown kills it at once.
    It used to wait its timeout for the restart, then again for the hung engine to exit, and
    left the restart waiting two minutes for the hello."""
    hang, pids = tmp_path / "hang", tmp_path / "pids"

    async def go():
        c = make_client(tmp_path)
        c.env.update(FAKE_ENGINE_HANG_START=str(hang), FAKE_ENGINE_PIDS=str(pids))
        await c.start()
        await c.load("/models/first")
        hang.touch()  # the next start hangs
        await crash(c)
        while len(pids.read_text().split()) < 2:  # the new engine is up, and hangs
            await asyncio.sleep(0.01)
        await asyncio.wait_for(c.shutdown(timeout=PATIENT), PATIENT / 2)
        assert c.state == "stopped" and not c.recovering

    try:
        run(go())
    finally:
        left = []
        for pid in map(int, pids.read_text().split() if pids.exists() else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a hung engine outlives a failed test otherwise
                left.append(pid)
    assert not left  # no engine left behind


def test_shutdown_during_a_load_stops_the_engine_at_once(tmp_path):
    """A load under way (one that never ends here) is ended "stopped" and its engine killed,
    without waiting for shutdown's timeout; the engine starts and loads again after."""

    async def go():
        states = []
        c = make_client(tmp_path, states)
        await c.start()
        loading = asyncio.ensure_future(c.load("/models/hang"))
        await wait_for_state(c, "loading")
        await asyncio.wait_for(c.shutdown(timeout=PATIENT), PATIENT / 2)
        with pytest.raises(EngineError) as e:
            await loading
        assert e.value.kind == "stopped" and c.state == "stopped"
        assert "failed" not in states and "crashed" not in states
        await c.start()
        assert (await c.load("/models/next"))["model"] == "/models/next"
        await c.shutdown()

    run(go())


def test_engine_that_cannot_start(tmp_path):
    async def go():
        c = EngineClient(
            [sys.executable, "-c", "import sys; sys.exit(7)"], log_path=tmp_path / "engine.log"
        )
        with pytest.raises(EngineError, match="did not start"):
            await c.start()
        assert c.state == "failed"

    run(go())


def test_shutdown_ends_an_open_answer(tmp_path):
    async def go():
        states = []
        c = make_client(tmp_path, states)
        await c.start()
        await c.load("demo")
        _, queue = c.generate([{"role": "user", "content": "slow"}])
        while (await queue.get()).type != "delta":  # the answer is streaming
            pass
        await c.shutdown()  # the engine cancels it and exits
        rest = await asyncio.wait_for(drain(queue), 5)
        assert rest[-1].type == "finished" and rest[-1].get("reason") == "cancelled"
        await c.start()
        await c.load("demo")
        _, queue = c.generate([{"role": "user", "content": "hang"}])
        assert (await queue.get()).type == "started"
        await c.shutdown(timeout=0.5)  # a stuck engine is killed
        rest = await asyncio.wait_for(drain(queue), 5)
        assert [(m.type, m.get("kind")) for m in rest if m.type != "delta"] == [
            ("error", "stopped"),
            ("finished", None),
        ]
        assert rest[-1].get("reason") == "error" and "crashed" not in states

    run(go())


def test_start_again_replaces_a_running_engine(tmp_path):
    async def go():
        states = []
        c = make_client(tmp_path, states)
        await c.start()
        first = c.proc
        await c.start()
        assert first.returncode is not None and c.proc is not first
        assert "crashed" not in states and c.state == "ready"
        await c.load("demo")
        _, queue = c.generate([{"role": "user", "content": "still here"}])
        assert text_of(await drain(queue)) == "You said: still here"
        await c.shutdown()

    run(go())


def test_crash_during_a_load_restarts_without_failing_first(tmp_path):
    async def go():
        states, infos = [], []
        c = make_client(tmp_path)
        c.on_state = lambda state, info: (states.append(state), infos.append(info))
        c.max_restarts = 1
        await c.start()
        with pytest.raises(EngineError) as e:
            await c.load("/models/crash-on-load")
        assert e.value.kind == "crashed"
        for _ in range(1000):  # restarted, reloaded, crashed again: one too many
            if c.state == "failed":
                break
            await asyncio.sleep(0.02)
        after = states[states.index("crashed") :]
        assert after == ["crashed", "starting", "ready", "loading", "failed"]
        assert "twice in 5 minutes, so it was not restarted" in infos[-1]["message"]

    run(go())


def test_an_unload_answered_with_an_error_raises_it(tmp_path):
    """The engine answers an unload with an error event (a CUDA error emptying PyTorch's cache):
    the client raised nothing and returned it as if the model had gone cleanly."""

    async def go():
        c = make_client(tmp_path)
        await c.start()
        await c.load("/models/sticky-one")
        with pytest.raises(EngineError) as e:
            await c.unload()
        assert (e.value.kind, str(e.value)) == ("unload", "CUDA error: unspecified launch failure")
        assert c.state == "ready"
        assert (await c.stats())["pid"] == c.pid  # the engine serves on
        await c.load("demo")
        await c.unload()  # a clean unload raises nothing
        await c.shutdown()

    run(go())


def test_a_load_refused_with_the_model_kept_leaves_that_model_to_reload_after_a_crash(tmp_path):
    """A load the engine refuses before letting its model go (model_kept) leaves the loaded
    model the one a crash's restart reloads; refused with nothing loaded, nothing is."""
    log = tmp_path / "requests.jsonl"

    async def go():
        c = make_client(tmp_path)
        c.env["FAKE_ENGINE_LOG"] = str(log)
        await c.start()
        with pytest.raises(EngineError, match="not found"):
            await c.load("/models/missing")  # nothing loaded yet: nothing to keep
        assert c.state == "ready" and c.last_load is None
        await c.load("/models/first")
        with pytest.raises(EngineError, match="not found"):
            await c.load("/models/missing-too")
        assert c.state == "loaded" and c.last_load["path"] == "/models/first"
        await crash(c)
        await wait_for_state(c, "loaded")
        assert c.loaded["model"] == "/models/first"
        await c.shutdown()

    run(go())
    assert [m["path"] for m in requests_of(log, "load")] == [
        "/models/missing", "/models/first", "/models/missing-too", "/models/first"
    ]  # fmt: skip


def test_a_load_refused_while_another_loads_keeps_the_one_that_finished(tmp_path):
    """A load made while another is loading is answered after it: refused with the model kept,
    the model kept is the one that just finished loading, which a crash's restart reloads. A
    load refused after the engine let its model go leaves no model to reload or report."""
    log = tmp_path / "requests.jsonl"

    async def go():
        c = make_client(tmp_path)
        c.env["FAKE_ENGINE_LOG"] = str(log)
        await c.start()
        first = asyncio.ensure_future(c.load("/models/slowload"))
        await wait_for_state(c, "loading")
        with pytest.raises(EngineError, match="not found"):
            await c.load("/models/missing")  # sent while the first one loads
        assert (await first)["model"] == "/models/slowload"
        assert c.state == "loaded" and c.last_load["path"] == "/models/slowload"
        await crash(c)
        await wait_for_state(c, "loaded")
        assert c.loaded["model"] == "/models/slowload"
        with pytest.raises(EngineError, match="no such model"):
            await c.load("/models/bad")  # refused after the engine let its model go
        assert (c.state, c.loaded, c.last_load) == ("ready", {}, None)
        with pytest.raises(EngineError, match="not found"):
            await c.load("/models/missing")  # nothing kept now
        assert (c.state, c.loaded) == ("ready", {})
        await c.shutdown()

    run(go())
    assert [m["path"] for m in requests_of(log, "load")] == [
        "/models/slowload", "/models/missing", "/models/slowload", "/models/bad",
        "/models/missing",
    ]  # fmt: skip


def test_crashes_older_than_five_minutes_no_longer_count_against_restarts(tmp_path):
    """The engine is restarted after a crash unless it crashed more than max_restarts times in
    the last 5 minutes; earlier crashes are forgotten."""
    import time

    async def go():
        c = make_client(tmp_path)
        c.max_restarts = 2
        await c.start()
        await c.load("demo")
        now = time.monotonic()
        c._restarts = [now - 300.5, now - 250]  # one older than 5 minutes, one within them
        await crash(c)
        await wait_for_state(c, "loaded")  # the third crash in all, the second in 5 minutes
        assert len(c._restarts) == 2
        _, queue = c.generate([{"role": "user", "content": "crash"}])  # the third in 5 minutes
        await drain(queue)
        await wait_for_state(c, "failed")  # given up
        assert c.state == "failed" and len(c._restarts) == 3
        await c.shutdown()

    run(go())


def test_a_generate_request_carries_its_prompt_and_sampling(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def go():
        c = make_client(tmp_path)
        c.env["FAKE_ENGINE_LOG"] = str(log)
        await c.start()
        await c.load("demo")
        _, queue = c.generate(prompt="raw text", sampling={"temperature": 0.5})
        await drain(queue)
        _, queue = c.generate([{"role": "user", "content": "hi"}])
        await drain(queue)
        await c.shutdown()

    run(go())
    gens = requests_of(log, "generate")
    assert [(m.get("prompt"), m.get("messages"), m["sampling"]) for m in gens] == [
        ("raw text", None, {"temperature": 0.5}),
        (None, [{"role": "user", "content": "hi"}], {}),
    ]
