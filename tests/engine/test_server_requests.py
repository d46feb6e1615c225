"""engine/server.py's Server in-process on the CPU: the events each request gives, in order, as
the app reads them, on a tiny random Llama with the demo's tokenizer (test_server.py runs the real
engine process with the demo model; these take seconds)."""

from __future__ import annotations

import io
import json
import shutil
import weakref

import pytest
import torch

from engine.generate import Session
from engine.protocol import PROTOCOL_VERSION, Message, decode, encode
from engine.sampling import SamplingParams
from engine.server import EOF, Server

from .hf_models import make_hf_model

CONTEXT = 96
RECOMMENDED = {"top_k": 7, "repetition_penalty": 1.3, "temperature": 0.9}
GREEDY = {"temperature": 0, "max_new_tokens": 5}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, demo_path):
    """A random 2-layer Llama (transformers' own checkpoint), the demo's tokenizer and a
    generation_config.json that recommends some sampling settings."""
    folder = tmp_path_factory.mktemp("server") / "tiny"
    make_hf_model(
        "llama", folder, vocab_size=49152, initializer_range=0.3, max_position_embeddings=8192
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, **RECOMMENDED}))
    return folder


@pytest.fixture(autouse=True)
def no_warm_up(monkeypatch):
    monkeypatch.setenv("VPTQ_CHAT_WARM_UP", "0")


@pytest.fixture(scope="module")
def session(folder) -> Session:
    return Session.load(folder, "cpu", torch.float32, CONTEXT)


class Engine:
    """A Server writing to memory: ``ask`` handles one request on this thread (as ``run`` does,
    errors included) and returns the events it gave."""

    def __init__(self, session: Session | None = None):
        self.out = io.StringIO()
        self.server = Server(self.out)
        if session is not None:
            self.server.session, self.server.model_name = session, "tiny"
            session.cached.clear()

    def events(self) -> list[Message]:
        lines = self.out.getvalue().splitlines()
        self.out.seek(0)
        self.out.truncate()
        return [decode(line) for line in lines]

    def ask(self, type_: str, id_: str | None = None, **payload) -> list[Message]:
        self.server.inbox.put(Message(type_, id_, payload))
        self.server.inbox.put(EOF)
        self.server.run()
        return self.events()


def kinds(events: list[Message]) -> list[str]:
    return [m.type for m in events]


def text_of(events: list[Message]) -> str:
    return "".join(m.get("text") for m in events if m.type == "delta")


def test_hello_of_another_protocol_version_is_refused_and_ends_the_engine():
    e = Engine()
    e.server.handle(Message("hello", payload={"version": PROTOCOL_VERSION}))
    assert e.events() == []  # the same version: nothing to say
    with pytest.raises(SystemExit) as ended:
        e.server.handle(Message("hello", payload={"version": PROTOCOL_VERSION + 1}))
    assert ended.value.code == 1
    [err] = e.events()
    assert (err.type, err.get("kind")) == ("error", "protocol")
    assert err.get("message") == f"app speaks protocol {PROTOCOL_VERSION + 1}, engine 1"


def test_a_load_reports_its_progress_then_what_it_loaded(folder):
    e = Engine()
    events = e.ask("load", "L", path=str(folder), max_seq_len=CONTEXT)
    assert kinds(events) == ["load_progress"] * (len(events) - 1) + ["loaded"]
    assert all(m.id == "L" for m in events)
    fractions = [m.get("fraction") for m in events[:-1]]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and fractions[-1] <= 1
    assert all(m.get("stage") for m in events[:-1])
    loaded, s = events[-1], e.server.session
    assert s is not None and e.server.model_name == str(folder)
    assert loaded.payload == {
        "model": str(folder), "path": str(folder), "arch": "LlamaForCausalLM", "quant": "dense",
        "n_ctx": CONTEXT, "device": "cpu", "weight_bytes": s.loaded.weight_bytes,
        "kv_cache_bytes": s.loaded.kv_bytes, "workspace_bytes": s.loaded.workspace_bytes,
        "layout_bytes": s.loaded.layout_bytes, "host_weight_bytes": s.loaded.host_bytes,
        "max_context": s.loaded.max_context, "vram_bytes": 0, "kernels": "reference",
        "kernels_reason": s.kernels_reason, "chat_template": True, "dtype": "float32",
        "note": s.loaded.note, "sampling": RECOMMENDED,
    }  # fmt: skip
    assert loaded.get("weight_bytes") > 0
    # keys and values of 2 layers x 96 positions x 2 KV heads x 16 dimensions, float32
    assert loaded.get("kv_cache_bytes") == 2 * 2 * CONTEXT * 2 * 16 * 4
    assert "CPU" in loaded.get("kernels_reason")
    # a dtype asked for, and a load that names no context: the engine's 4096 (of the model's
    # 8192 positions)
    events = e.ask("load", "B", path=str(folder), dtype="bfloat16")
    assert events[-1].get("dtype") == "bfloat16" and events[-1].get("n_ctx") == 4096
    assert e.server.session.loaded.model.model.norm.weight.dtype == torch.bfloat16


def test_a_new_load_lets_the_loaded_model_go_first_unless_it_is_refused(folder, monkeypatch):
    """The old model is freed before the new one loads (two models at once did not fit the
    GPU); a load refused before that (a folder without a model) keeps it."""
    e = Engine()
    e.ask("load", "L1", path=str(folder), max_seq_len=CONTEXT)
    old = weakref.ref(e.server.session)
    seen = []
    real_load = Session.load.__func__

    def load(cls, *args, **kwargs):
        seen.append((e.server.session, e.server.model_name, old()))
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(Session, "load", classmethod(load))
    (folder.parent / "empty").mkdir(exist_ok=True)
    events = e.ask("load", "L2", path=str(folder.parent / "empty"))
    assert kinds(events) == ["error"] and events[0].get("model_kept") is True
    assert seen == [] and e.server.session is old()
    events = e.ask("load", "L3", path=str(folder), max_seq_len=CONTEXT // 2)
    assert seen == [(None, "", None)]  # let go, and collected, before the new load began
    assert events[-1].type == "loaded" and e.server.session.n_ctx == CONTEXT // 2


def test_unload_answers_with_stats_holding_no_model(session):
    e = Engine(session)
    assert e.server.stats()["model"] == "tiny"
    [stats] = e.ask("unload", "U")
    assert (stats.type, stats.id, stats.get("model"), stats.get("generating")) == (
        "stats", "U", None, None,
    )  # fmt: skip
    assert "n_ctx" not in stats.payload and stats.get("rss_bytes") > 0
    assert e.server.session is None and e.server.model_name == ""


def test_a_generate_streams_its_answer_between_started_and_finished(session):
    messages = [{"role": "user", "content": "Name three colours."}]
    ids, dropped = session.prompt_ids(messages=messages, max_new_tokens=5)
    want = session.generate(ids, SamplingParams(**GREEDY))
    pieces = [(text, len(want.tokens)) for text in want]  # each piece, and the tokens so far
    want_text = "".join(text for text, _ in pieces)
    e = Engine(session)
    events = e.ask("generate", "g", messages=messages, sampling=GREEDY)
    assert kinds(events) == ["started"] + ["delta"] * (len(events) - 2) + ["finished"]
    assert all(m.id == "g" for m in events)
    started, finished = events[0], events[-1]
    assert started.payload == {
        "prompt_tokens": len(ids), "dropped_messages": dropped, "n_ctx": CONTEXT,
    }  # fmt: skip
    assert text_of(events) == want_text and all(m.get("text") for m in events[1:-1])
    # each piece says the answer's tokens so far (a piece may hold several), up to all of them
    assert [m.get("tokens") for m in events[1:-1]] == [n for _, n in pieces]
    assert events[-2].get("tokens") == 5
    assert finished.get("reason") == "length"
    stats = finished.get("stats")
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (len(ids), 5)
    assert stats["cached_tokens"] == 0  # the engine was cleared: nothing reused
    assert (e.server.gen, e.server.gen_id) == (None, None)
    # a raw prompt instead of a chat
    events = e.ask("generate", "p", prompt="The sky is", sampling=GREEDY)
    assert events[0].get("prompt_tokens") == len(session.tok.encode("The sky is"))
    assert events[-1].get("reason") == "length"


def test_the_request_s_settings_go_over_the_model_s_recommended_ones(session, monkeypatch):
    """A setting the request leaves out is the model's recommended one; its stop strings join
    the sampling; a chat to continue reads its last answer as unfinished."""
    asked = []
    real = session.generate

    def generate(ids, params, dropped=0):
        asked.append((ids, params))
        return real(ids, params, dropped)

    monkeypatch.setattr(session, "generate", generate)
    e = Engine(session)
    sampling = {"top_k": 3, "max_new_tokens": 2, "seed": 5}
    e.ask("generate", "g", prompt="Once upon", sampling=sampling, stop=["\n\n", "The end"])
    params = asked[-1][1]
    assert (params.top_k, params.max_new_tokens, params.seed) == (3, 2, 5)
    assert (params.repetition_penalty, params.temperature) == (1.3, 0.9)  # recommended
    assert params.stop == ["\n\n", "The end"]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    for cont in (False, True):
        e.ask("generate", f"c{cont}", messages=chat, sampling=GREEDY, **{"continue": cont})
        want, _ = session.prompt_ids(messages=chat, max_new_tokens=5, continue_final=cont)
        assert asked[-1][0] == want
    assert asked[-1][0] != asked[-2][0]


def test_a_request_cancelled_before_it_began_finishes_at_once(session):
    e = Engine(session)
    e.server.cancel("g")  # read while another request was being handled
    assert e.server.cancelled == {"g"}
    events = e.ask("generate", "g", prompt="Hello", sampling=GREEDY)
    assert [(m.type, m.get("reason"), m.get("stats")) for m in events] == [
        ("finished", "cancelled", {})
    ]
    assert e.server.cancelled == set()  # spent: the same id again is answered
    assert kinds(e.ask("generate", "g", prompt="Hello", sampling=GREEDY))[-1] == "finished"
    assert e.server.cancelled == set()
    e.server.cancel(None)  # a cancel naming nothing cancels nothing
    assert e.server.cancelled == set()


def test_a_cancel_while_the_answer_is_written_stops_it_after_that_token(session, monkeypatch):
    e = Engine(session)
    real, calls = session.logits, []

    def logits(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second token's step: the app's cancel comes, as the reader
            e.server.cancel("g")  # thread files it
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "logits", logits)
    events = e.ask("generate", "g", prompt="Hello", sampling={"temperature": 0})
    assert kinds(events)[:2] == ["started", "delta"] and events[-1].get("reason") == "cancelled"
    assert events[-1].get("stats")["completion_tokens"] == 2
    assert e.server.cancelled == set()  # it reached the running answer, not the waiting list


def test_a_cancel_that_comes_while_the_request_starts_stops_it(session, monkeypatch):
    """Between the check for an early cancel and the answer's start, the reader thread files a
    cancel for an id not running yet: the answer must still see it."""
    e = Engine(session)
    real = session.generate

    def generate(ids, params, dropped=0):
        e.server.cancel("g")
        return real(ids, params, dropped)

    monkeypatch.setattr(session, "generate", generate)
    events = e.ask("generate", "g", prompt="Hello", sampling={"temperature": 0})
    assert kinds(events)[0] == "started" and events[-1].get("reason") == "cancelled"
    assert events[-1].get("stats")["completion_tokens"] == 1  # stopped at its first token
    assert e.server.cancelled == set()


def test_a_generate_that_cannot_start_or_fails_midway_still_finishes(session, monkeypatch):
    e = Engine()
    events = e.ask("generate", "n", prompt="Hello")
    assert [(m.type, m.get("kind"), m.get("reason")) for m in events] == [
        ("error", "not_loaded", None), ("finished", None, "error"),
    ]  # fmt: skip
    assert events[0].get("message") == "no model is loaded: load one first"
    assert events[1].get("stats") == {}
    [err] = e.ask("generate", None, prompt="Hello")  # no id: nothing to finish
    assert (err.get("kind"), err.get("message")) == ("generate", "generate needs an 'id'")
    e = Engine(session)
    events = e.ask("generate", "r", prompt="Hello", sampling={"top_p": 7})
    assert [(m.type, m.get("kind")) for m in events] == [("error", "request"), ("finished", None)]
    assert events[0].get("message").startswith("sampling field 'top_p' = 7 must be")
    calls = []
    real = session.logits

    def logits(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the GPU fell off the bus")
        return real(*args, **kwargs)

    monkeypatch.setattr(session, "logits", logits)
    events = e.ask("generate", "m", prompt="Hello", sampling={"temperature": 0})
    assert kinds(events) == ["started", "delta", "delta", "error", "finished"]
    assert events[-2].get("kind") == "generate"
    assert events[-2].get("message") == "RuntimeError: the GPU fell off the bus"
    assert events[-1].get("reason") == "error"
    assert events[-1].get("stats")["prompt_tokens"] == events[0].get("prompt_tokens")
    assert (e.server.gen, e.server.gen_id) == (None, None)
    monkeypatch.undo()
    assert e.ask("generate", "ok", prompt="Hello", sampling=GREEDY)[-1].get("reason") == "length"


def test_the_reader_answers_stats_and_cancels_at_once_and_queues_the_rest():
    """What the reader thread does with each line: blank ones skipped, a bad one answered as a
    protocol error, stats answered and cancels filed at once (the main thread may be busy with
    an answer), the rest queued; a shutdown, and the end of the input, cancel the running
    answer."""
    e = Engine()

    class Running:
        def __init__(self):
            self.cancels: list[int] = []  # how many requests were queued at each

        def cancel(self):
            self.cancels.append(e.server.inbox.qsize())

    running = e.server.gen = Running()
    e.server.gen_id = "cur"
    lines = [
        "\n",
        "not json\n",
        encode("stats", "s"),
        encode("cancel", "x"),
        encode("cancel", None, target="y"),
        encode("generate", "g", prompt="Hi"),
        encode("cancel", "cur"),
        encode("shutdown"),
    ]
    e.server.read(io.BytesIO("".join(lines).encode()))
    events = e.events()
    assert [(m.type, m.id, m.get("kind")) for m in events] == [
        ("error", None, "protocol"), ("stats", "s", None),
    ]  # fmt: skip
    assert events[1].get("model") is None and events[1].get("generating") == "cur"
    assert e.server.cancelled == {"x", "y"}
    assert running.cancels == [1, 1, 2]  # its cancel; the shutdown's, before it is queued; the end
    queued = []
    while not e.server.inbox.empty():
        queued.append(e.server.inbox.get())
    assert [(m.type, m.id) for m in queued] == [
        ("generate", "g"),
        ("shutdown", None),
        ("eof", None),
    ]
    assert queued[-1] is EOF
