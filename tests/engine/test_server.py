"""`python -m engine serve` as a real subprocess with the demo model."""

import os
import signal
import subprocess
import sys
import time

import pytest

from .engine_proc import EngineProcess
from .test_loader import build_vptq_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def engine(demo_path):
    e = EngineProcess()
    hello = e.next()
    assert hello.type == "hello" and hello.get("version") == 1
    e.send("hello", version=1)
    e.send("load", "load-1", path="demo", max_seq_len=2048)
    events = e.until("loaded", "load-1")
    assert any(m.type == "load_progress" for m in events)
    loaded = events[-1]
    assert loaded.get("n_ctx") == 2048 and loaded.get("kernels") == "reference"
    assert "CPU" in loaded.get("kernels_reason")  # the reason is said, not implied
    assert loaded.get("dtype") == "float32" and loaded.get("note") == ""
    # what the demo's generation_config.json recommends (engine/models.py DEMO_SAMPLING)
    assert loaded.get("sampling") == {"repetition_penalty": 1.05}
    yield e
    e.close()


def test_two_turn_conversation(engine):
    turn1 = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    answer, events = engine.chat("t1", turn1)
    assert "Paris" in answer
    started = next(m for m in events if m.type == "started")
    assert started.get("prompt_tokens") > 10
    finished = events[-1]
    assert finished.get("reason") == "stop"
    stats = finished.get("stats")
    assert stats["completion_tokens"] > 3 and stats["ttft_s"] > 0 and stats["decode_tok_s"] > 0
    turn2 = [
        *turn1,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And of Germany?"},
    ]
    answer2, events = engine.chat("t2", turn2)
    assert "Berlin" in answer2  # which the demo answers only with the first turn before it
    assert events[-1].get("stats")["cached_tokens"] > 30  # the first turn's KV was reused
    # with the first turn's KV reused, the answer is the one computed from the whole
    # conversation afresh (in this process, nothing cached)
    assert answer2 == fresh_answer(turn2)


def fresh_answer(messages, max_new_tokens=40):
    """The demo's greedy answer from a new session in this process (as EngineProcess.chat)."""
    from engine.generate import Session
    from engine.models import resolve_model
    from engine.sampling import SamplingParams

    session = Session.load(resolve_model("demo"), "cpu", None, max_seq_len=2048)
    ids, _ = session.prompt_ids(messages=messages, max_new_tokens=max_new_tokens)
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    return "".join(session.generate(ids, params))


def test_loading_on_the_cpu_expands_the_weights_before_the_first_answer(monkeypatch, prefill_log):
    """Session.load warms up on the CPU too: the reference path's dense weights, which the first
    answer would otherwise wait seconds for, are there before any prompt, the stage is
    reported, and the dummy prompt leaves nothing behind (the answers of a session loaded
    without it, VPTQ_CHAT_WARM_UP=0). Only the prompt: a follow-up's prefill, which a GPU's
    warm-up adds for the kernels CUDA loads at their first use, would cost the CPU time."""
    from engine.generate import WARM_UP_TOKENS, Session
    from engine.layers import VQLinear
    from engine.models import resolve_model
    from engine.sampling import SamplingParams

    messages = [{"role": "user", "content": "Name a colour."}]
    answers = {}
    for warm in ("1", "0"):
        monkeypatch.setenv("VPTQ_CHAT_WARM_UP", warm)
        stages = []
        progress = lambda f, st, to=stages: to.append(st)  # noqa: E731
        prefill_log.clear()
        s = Session.load(resolve_model("demo"), "cpu", None, 512, progress)
        assert prefill_log == ([(WARM_UP_TOKENS, 0)] if warm == "1" else [])
        layers = [m for m in s.loaded.model.modules() if isinstance(m, VQLinear)]
        assert len(layers) == 7 * s.loaded.args.n_layers
        assert {m.dense_cache is not None for m in layers} == {warm == "1"}
        assert ("warming up" in stages) == (warm == "1")
        ids, _ = s.prompt_ids(messages=messages, max_new_tokens=8)
        gen = s.generate(ids, SamplingParams(temperature=0, max_new_tokens=8))
        answers[warm] = "".join(gen), gen.tokens
    assert answers["1"] == answers["0"]


def test_cancel_mid_answer_then_still_serves(engine):
    engine.long_answer_under_way("long", 400)
    engine.send("cancel", "long")
    finished = engine.until("finished", "long")[-1]
    assert finished.get("reason") == "cancelled"
    assert finished.get("stats")["completion_tokens"] < 12  # stopped within a step or two
    answer, _ = engine.chat(
        "after", [{"role": "user", "content": "What is the capital of France?"}]
    )
    assert "Paris" in answer


def test_the_end_of_stdin_stops_an_answer_being_written(demo_path):
    """An app that closes the engine's stdin (it quits, or it died) while an answer is written:
    the answer stops within a step or two, ends with its finished event, and the engine exits
    (it went on to the token limit first, the GPU busy for nothing)."""
    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        e.send("load", "l", path="demo", max_seq_len=2048)
        e.until("loaded", "l")
        e.long_answer_under_way("long", 1000)
        e.proc.stdin.close()
        finished = e.until("finished", "long")[-1]
        assert finished.get("reason") == "cancelled"
        assert finished.get("stats")["completion_tokens"] < 12
        assert e.proc.wait(60) == 0
    finally:
        e.close()


def test_settings_a_request_leaves_out_are_the_models_recommended(engine):
    """The demo recommends a repetition penalty of 1.05 (engine/models.py DEMO_SAMPLING): a
    request without one gets it; one that gives it wins."""
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]

    def answer(id_, sampling):
        engine.send("generate", id_, messages=story, sampling=sampling)
        events = engine.until("finished", id_)
        return "".join(m.get("text") for m in events if m.type == "delta" and m.id == id_)

    greedy = {"temperature": 0, "max_new_tokens": 60}
    left_out = answer("rec-1", greedy)
    assert left_out == answer("rec-2", {**greedy, "repetition_penalty": 1.05})
    assert left_out != answer("rec-3", {**greedy, "repetition_penalty": 1.0})


def test_max_tokens_and_stop_strings(engine):
    msgs = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    text, events = engine.chat("len", msgs, max_new_tokens=5)
    assert events[-1].get("reason") == "length"
    assert events[-1].get("stats")["completion_tokens"] == 5
    full, _ = engine.chat("full", msgs)
    stop_at = full[len(full) // 2 :][:3]
    text, events = engine.chat("stop", msgs, stop=[stop_at])
    assert events[-1].get("reason") == "stop" and stop_at not in text
    assert full.startswith(text)


def test_continue_writes_on_from_where_an_answer_was_cut(engine):
    """`continue`: the last message is an answer the model writes more of; greedy, an answer cut
    at 12 tokens and continued for 12 is the 24-token answer, and the continuation reuses the
    cut answer's KV entries."""
    q = [{"role": "user", "content": "Tell me about the planet Mars in three sentences."}]
    full, _ = engine.chat("c-full", q, max_new_tokens=24)
    part, events = engine.chat("c-part", q, max_new_tokens=12)
    assert events[-1].get("reason") == "length"
    engine.send(
        "generate",
        "c-more",
        messages=[*q, {"role": "assistant", "content": part}],
        sampling={"temperature": 0, "repetition_penalty": 1.0, "max_new_tokens": 12},
        **{"continue": True},
    )
    events = engine.until("finished", "c-more")
    more = "".join(m.get("text") for m in events if m.type == "delta")
    assert len(part) > 10 and more and part + more == full
    stats = events[-1].get("stats")
    assert stats["cached_tokens"] >= stats["prompt_tokens"] - 2  # only the last few are new
    for fields, needle in [
        (dict(messages=q, **{"continue": True}), "'continue' needs the last message to be"),
        (dict(prompt="Hi", **{"continue": True}), "'continue' goes with 'messages'"),
        (dict(messages=q, **{"continue": "yes"}), "'continue' must be true or false, not 'yes'"),
    ]:
        engine.send("generate", "c-bad", **fields)
        err = engine.until("finished", "c-bad")[0]
        assert err.type == "error" and err.get("message").startswith(needle), err.payload


def test_seeded_sampling_is_reproducible(engine):
    msgs = [{"role": "user", "content": "Tell me a fun fact."}]
    a, _ = engine.chat("s1", msgs, temperature=1.0, top_p=0.95, seed=7)
    b, _ = engine.chat("s2", msgs, temperature=1.0, top_p=0.95, seed=7)
    assert a == b


def test_malformed_lines_and_bad_requests_answered_with_errors(engine):
    engine.write("   ")  # blank lines are skipped, not answered
    engine.send("stats", "after-blank")
    msg = engine.next()
    assert (msg.type, msg.id) == ("stats", "after-blank")
    engine.write("this is not json")
    assert engine.next().get("kind") == "protocol"
    engine.write('{"v": 1, "type": "nonsense"}')
    assert "unknown message type" in engine.next().get("message")
    engine.send("generate", "empty", prompt="   ")
    events = engine.until("finished", "empty")
    assert events[0].type == "error" and "prompt is empty" in events[0].get("message")
    assert events[-1].get("reason") == "error"
    for fields, needle in [
        (dict(prompt="Hi", sampling={"top_p": 7}), "sampling field 'top_p' = 7 must be"),
        (dict(prompt="Hi", sampling="hot"), "'sampling' must be an object of settings"),
        (dict(prompt=5), "'prompt' must be a string, not 5"),  # was an AttributeError
        (dict(prompt="Hi", **{"continue": "yes"}), "'continue' must be true or false, not 'yes'"),
    ]:
        engine.send("generate", "badrequest", **fields)
        events = engine.until("finished", "badrequest")
        assert events[0].get("message").startswith(needle), events[0].payload
    # a load with a bad field is refused naming it, before the loaded model is let go (the
    # stats below still name it)
    for fields, needle in [
        (dict(max_seq_len="big"), "load: max_seq_len 'big' is not a whole number of tokens"),
        (dict(max_seq_len=-5), "load: max_seq_len -5 is not"),
        (dict(device="tpu"), "load: device 'tpu' is not one of cpu, cuda, cuda:N"),
        (dict(device="cuda:99"), "load: device 'cuda:99': PyTorch sees"),  # was a torch error
        (dict(path=5), "load: model 5 is not a folder"),
        (dict(dtype="int4"), "load: dtype 'int4' is not one of float32, float16, bfloat16"),
        (dict(max_seq_len=True), "load: max_seq_len True is not a whole number of tokens"),
    ]:
        engine.send("load", "bad", **{"path": "demo", **fields})
        err = engine.until("error", "bad")[-1]
        assert err.get("kind") == "load" and err.get("message").startswith(needle), err.payload
    engine.send("stats", "st")
    stats = engine.until("stats", "st")[-1]
    assert stats.get("model") == "demo" and stats.get("rss_bytes") > 0
    loaded = {k: stats.get(k) for k in ("n_ctx", "device", "kernels")}
    assert loaded == {"n_ctx": 2048, "device": "cpu", "kernels": "reference"}
    assert stats.get("weight_bytes") > 0 and stats.get("cached_tokens") >= 0


def test_bad_models_give_error_events_then_the_engine_still_serves(tmp_path, demo_path):
    build_vptq_model(tmp_path / "trunc", shard_bytes=200_000)
    shard = sorted((tmp_path / "trunc").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "config.json").write_text('{"architectures": ["BertModel"]}')
    build_vptq_model(tmp_path / "shard", shard_bytes=200_000)
    lost = sorted((tmp_path / "shard").glob("model-*.safetensors"))[-1]
    lost.unlink()
    build_vptq_model(tmp_path / "field")
    cfg = (tmp_path / "field" / "config.json").read_text().replace('"vocab_size"', '"vocab"')
    (tmp_path / "field" / "config.json").write_text(cfg)
    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        for name, needle in [
            (tmp_path / "nowhere", "not found"),
            (tmp_path / "trunc", f"{shard.name}: truncated or corrupt"),
            (tmp_path / "arch", "unsupported architecture BertModel"),
        ]:
            e.send("load", "L", path=str(name))
            err = e.until("error", "L")[-1]
            assert needle in err.get("message"), err.payload
            assert "model_kept" not in err.payload  # there was none to keep
        e.send("generate", "g", prompt="Hello")
        assert e.until("finished", "g")[0].get("kind") == "not_loaded"
        e.send("load", "ok", path=str(demo_path), max_seq_len=256)
        e.until("loaded", "ok")
        greedy = {"temperature": 0, "max_new_tokens": 4}
        e.send("generate", "g2", prompt="The capital of France is", sampling=greedy)
        assert e.until("finished", "g2")[-1].get("reason") in ("stop", "length")
        # refused before the loaded model is let go (no model there, a config the engine
        # cannot read): that model stays and answers; a late failure (a truncated shard) has
        # let it go
        e.send("load", "D", path=str(demo_path), dtype="int3")  # a bad field: refused first
        assert e.until("error", "D")[-1].get("model_kept") is True
        for name in ("nowhere", "arch", "field"):
            e.send("load", "K", path=str(tmp_path / name))
            assert e.until("error", "K")[-1].get("model_kept") is True, name
            e.send("generate", "g3", prompt="The capital of France is", sampling=greedy)
            assert e.until("finished", "g3")[-1].get("reason") in ("stop", "length"), name
        e.send("load", "T", path=str(tmp_path / "trunc"))
        assert "model_kept" not in e.until("error", "T")[-1].payload
        e.send("generate", "g4", prompt="Hello")
        assert e.until("finished", "g4")[0].get("kind") == "not_loaded"
    finally:
        e.close()
    assert e.proc.returncode == 0  # exits cleanly when stdin closes


def test_a_model_larger_than_the_memory_is_an_oom_error_then_the_engine_still_serves(
    tmp_path, demo_path
):
    """On the CPU, where the system would kill the engine part-way through (every layer is
    expanded to float32): refused first with the numbers. Here a context of 2^40 tokens."""
    import json

    build_vptq_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 1 << 40}))
    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        e.send("load", "big", path=str(tmp_path), device="cpu", max_seq_len=1 << 40)
        err = e.until("error", "big")[-1]
        msg = err.get("message")
        assert err.get("kind") == "oom" and str(tmp_path) in msg, err.payload
        assert "a KV cache of 1099511627776 tokens" in msg and "is available" in msg
        assert "The largest context that fits is" in msg
        e.send("load", "ok", path=str(demo_path), device="cpu", max_seq_len=64)
        assert e.until("loaded", "ok")[-1].get("n_ctx") == 64
        e.send("generate", "g", prompt="Hi", sampling={"temperature": 0, "max_new_tokens": 3})
        assert e.until("finished", "g")[-1].get("reason") in ("stop", "length")
    finally:
        e.close()


def test_unload_lets_the_model_go_and_the_engine_serves_on(demo_path):
    """What Model > Unload model sends: the engine answers with its stats, holding no model;
    a generate is then refused as with none loaded, and a load works again."""
    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        e.send("load", "l1", path="demo", max_seq_len=512)
        assert e.until("loaded", "l1")[-1].type == "loaded"
        e.send("unload", "u")
        stats = e.until("stats", "u")[-1]
        assert stats.get("model") is None and stats.get("generating") is None
        e.send("generate", "g", messages=[{"role": "user", "content": "hi"}])
        events = e.until("finished", "g")
        assert any(m.type == "error" and "no model is loaded" in m.get("message") for m in events)
        e.send("load", "l2", path="demo", max_seq_len=512)
        assert e.until("loaded", "l2")[-1].get("n_ctx") == 512
    finally:
        e.close()


@pytest.mark.parametrize("close_stdin", [False, True])
def test_shutdown_ends_the_engine_cleanly(close_stdin):
    """A shutdown request ends the process with status 0, stdin left open (as a client that
    waits for the exit does) or closed right after it (as the app does). The reader thread
    was still in a read of stdin when the interpreter exited, which then aborted: "Fatal Python
    error: _enter_buffered_busy: could not acquire lock for <_io.BufferedReader name='<stdin>'>
    at interpreter shutdown" (or "terminate called without an active exception"), status -6
    and a core dump on systems that keep them, at every quit of the app."""
    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        for i in range(5):  # answered by the reader thread, as the app's live panel asks
            e.send("stats", f"s{i}")
        e.send("shutdown", "bye")
        if close_stdin:
            e.proc.stdin.close()
        assert e.proc.wait(60) == 0, b"".join(e.stderr).decode()[-600:]
    finally:
        e.close()
    assert b"Fatal Python error" not in b"".join(e.stderr)


PARENT = """
import json, subprocess, sys, time
p = subprocess.Popen([sys.executable, "-m", "engine", "serve"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE)
p.stdout.readline()  # its hello
load = {"v": 1, "type": "load", "id": "l", "path": sys.argv[1]}
p.stdin.write((json.dumps(load) + "\\n").encode())
p.stdin.flush()
print(p.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)  # a zombie: ended
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_engine_ends_with_the_app_even_while_it_loads(tmp_path):
    """An app killed while its engine loads a model: the engine reads the end of its stdin only
    after the load, which for a 70B model held the GPU for a minute or more after the app was
    gone (and a new start's load found no room). It now ends with its parent at once. The load
    here never ends: its config.json is a FIFO this test holds open and never writes."""
    folder = tmp_path / "model"
    folder.mkdir()
    fifo = folder / "config.json"
    os.mkfifo(fifo)
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(folder)], stdout=subprocess.PIPE, text=True
    )
    engine_pid, writer = None, None
    try:
        engine_pid = int(parent.stdout.readline())
        end = time.monotonic() + 60
        while writer is None:  # opens once the engine's load opens config.json to read it
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert time.monotonic() < end, "the engine never read config.json"
                time.sleep(0.05)
        time.sleep(0.5)
        assert not _gone(engine_pid)  # in the load, waiting for config.json's bytes
        parent.kill()
        parent.wait()
        end = time.monotonic() + 20
        while not _gone(engine_pid) and time.monotonic() < end:
            time.sleep(0.1)
        assert _gone(engine_pid), "the engine outlived the app"
    finally:
        parent.kill()
        if writer is not None:
            os.close(writer)
        if engine_pid and not _gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)


def test_a_request_that_fails_unexpectedly_is_an_error_event_and_the_engine_serves_on(monkeypatch):
    """In-process: a request whose handling raises is answered with an error event of its kind
    (an OOM's kind is "oom", after what the load left behind went back), its message naming the
    exception, and the next request is still handled; a load refused with a model loaded says
    the model was kept. The error texts: a bad input's own message, torch's OOM line with its
    sizes, anything else with its type."""
    import io

    import torch

    from engine.protocol import Message, decode
    from engine.server import EOF, Server

    out = io.StringIO()
    server = Server(out)
    failures = {
        "a": RuntimeError("boom"),
        "b": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(details)"),
        "c": ValueError("load: device 'cuda:7' is not there"),
        "d": MemoryError("cannot allocate 3 GiB"),
    }
    handled, unloads = [], []

    def handle(msg):
        handled.append(msg.id)
        if msg.id in failures:
            raise failures[msg.id]

    def unload():
        unloads.append(handled[-1])
        server.session = None

    monkeypatch.setattr(server, "handle", handle)
    monkeypatch.setattr(server, "unload", unload)
    server.session = object()  # a model is loaded
    order = [("a", "generate"), ("c", "load"), ("b", "load"), ("d", "generate"), ("e", "load")]
    for id_, type_ in order:
        server.inbox.put(Message(type_, id_))
    server.inbox.put(EOF)
    server.run()
    events = [decode(line) for line in out.getvalue().splitlines()]
    assert handled == ["a", "c", "b", "d", "e"] and unloads == ["b", "d"]
    got = [(m.id, m.get("kind"), m.get("message"), m.get("model_kept")) for m in events]
    assert got == [
        ("a", "generate", "RuntimeError: boom", None),
        ("c", "load", "load: device 'cuda:7' is not there", True),
        ("b", "oom", "out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB", None),
        ("d", "oom", "cannot allocate 3 GiB", None),
    ]
    assert all(m.type == "error" for m in events)
