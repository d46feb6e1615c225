"""Session and Generation (engine/generate.py) in-process on the CPU, against transformers' own
generation of the same random checkpoint: the tokens, where an answer ends and why, what the
KV cache keeps between requests, and the prompt's budget."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine.generate import Session
from engine.sampling import SamplingParams
from engine.tokenizer import ContextError

from .hf_models import make_hf_model

CONTEXT = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_path):
    """A random 2-layer Llama with the demo's tokenizer, whose next token depends on the context
    (init std 0.3), and transformers' model of it."""
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    hf = make_hf_model("llama", folder, vocab_size=49152, initializer_range=0.3)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path / name, folder / name)
    return folder, hf


@pytest.fixture
def session(checkpoint, monkeypatch) -> Session:
    monkeypatch.setenv("VPTQ_CHAT_WARM_UP", "0")
    return Session.load(checkpoint[0], "cpu", torch.float32, CONTEXT)


def hf_answer(hf, ids: list[int], n: int, **sampling) -> list[int]:
    """transformers' greedy continuation of ``ids``, exactly ``n`` tokens (no end of text)."""
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0, **sampling,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def answer(session: Session, ids: list[int], **params) -> tuple[list[str], object]:
    g = session.generate(ids, SamplingParams(**{"temperature": 0, **params}))
    return list(g), g


def prompt(session: Session, n: int) -> list[int]:
    """``n`` prompt tokens of plain words."""
    ids = session.tok.encode(" ".join(f"word{i}" for i in range(n)))[:n]
    assert len(ids) == n
    return ids


def test_a_greedy_answer_is_transformers_greedy_continuation(session, checkpoint):
    ids = prompt(session, 20)
    deltas, g = answer(session, ids, max_new_tokens=8)
    want = hf_answer(checkpoint[1], ids, 8)
    assert g.tokens == want and g.reason == "length"
    assert "".join(deltas) == g.text == session.tok.hf.decode(want) and all(deltas)
    st = g.stats
    assert (st.prompt_tokens, st.completion_tokens, st.cached_tokens, st.cuda_graph) == (
        20, 8, 0, False,
    )  # fmt: skip
    assert st.ttft_s > 0 and st.prefill_tok_s > 0 and st.decode_tok_s > 0
    assert session.cached == ids + want[:-1]  # the last token's keys are not computed yet


def test_the_time_to_the_first_token_ends_at_the_first_token(session, monkeypatch):
    """On a clock that moves 2 s a reading (the start, the first token, the end): the speeds
    count the prompt's new tokens and the tokens after the first."""
    import types

    import engine.generate

    first = prompt(session, 20)
    _, g = answer(session, first, max_new_tokens=3)
    ticks = iter(range(0, 100, 2))
    monkeypatch.setattr(
        engine.generate, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    )
    _, g = answer(session, first + g.tokens + prompt(session, 4), max_new_tokens=5)
    st = g.stats
    # 5 new prompt tokens in 2 s, 4 tokens after the first in 2 s
    assert (st.cached_tokens, st.ttft_s, st.prefill_tok_s, st.decode_tok_s) == (22, 2.0, 2.5, 2.0)
    _, g = answer(session, prompt(session, 10), max_new_tokens=2)  # its first 9 are cached
    assert (g.stats.ttft_s, g.stats.prefill_tok_s, g.stats.decode_tok_s) == (2.0, 0.5, 0.5)


def test_the_repetition_penalty_covers_the_prompt_and_the_answer(session, checkpoint):
    hf, ids = checkpoint[1], prompt(session, 12)
    plain = hf_answer(hf, ids, 10)
    assert plain[6] == plain[7]  # the model repeats itself here
    _, g = answer(session, ids, max_new_tokens=10, repetition_penalty=1.5)
    assert g.tokens == hf_answer(hf, ids, 10, repetition_penalty=1.5) != plain
    repeated = ids + plain[:7]  # the token it would repeat is in the prompt
    _, g = answer(session, repeated, max_new_tokens=3, repetition_penalty=1.5)
    assert g.tokens == hf_answer(hf, repeated, 3, repetition_penalty=1.5)
    assert g.tokens[0] != plain[7]


def test_a_follow_up_prefills_only_what_the_cache_does_not_hold(session, checkpoint, prefill_log):
    first = prompt(session, 20)
    _, g = answer(session, first, max_new_tokens=5)
    follow_up = first + g.tokens + prompt(session, 7)
    prefill_log.clear()
    _, g2 = answer(session, follow_up, max_new_tokens=6)
    assert g2.stats.cached_tokens == 24  # the first answer's last token had no keys yet
    assert prefill_log[0] == (len(follow_up) - 24, 24)  # (tokens, start) of the prefill
    assert g2.tokens == hf_answer(checkpoint[1], follow_up, 6)
    # a prompt that parts from the cache at token 10 prefills from there
    other = first[:10] + prompt(session, 15)[5:]
    prefill_log.clear()
    _, g3 = answer(session, other, max_new_tokens=4)
    assert g3.stats.cached_tokens == 10 and prefill_log[0] == (len(other) - 10, 10)
    assert g3.tokens == hf_answer(checkpoint[1], other, 4)
    # the same prompt again: its last token is run again, for its logits
    prefill_log.clear()
    _, g4 = answer(session, other, max_new_tokens=4)
    assert g4.stats.cached_tokens == len(other) - 1 and prefill_log[0] == (1, len(other) - 1)
    assert g4.tokens == g3.tokens


def test_an_answer_ends_where_the_context_does(session, checkpoint):
    ids = prompt(session, CONTEXT - 8)
    _, g = answer(session, ids, max_new_tokens=100)
    assert len(g.tokens) == 9 and g.reason == "length"  # 8 more keys fit, and the last token
    assert g.tokens == hf_answer(checkpoint[1], ids, 9)
    assert len(session.cached) == CONTEXT
    full = prompt(session, CONTEXT)  # no key fits: the one token its logits give
    _, g = answer(session, full, max_new_tokens=100)
    assert g.tokens == hf_answer(checkpoint[1], full, 1) and g.reason == "length"
    _, g = answer(session, ids, max_new_tokens=1)
    assert len(g.tokens) == 1 and g.reason == "length"


def test_an_end_of_text_token_ends_the_answer_unshown(session, checkpoint):
    ids = prompt(session, 20)
    want = hf_answer(checkpoint[1], ids, 8)
    session.tok.eos_ids = [want[3]]
    deltas, g = answer(session, ids, max_new_tokens=8)
    assert g.tokens == want[:4] and g.reason == "stop"
    assert "".join(deltas) == g.text == session.tok.hf.decode(want[:3])


def test_a_stop_string_ends_the_answer_before_it(session, checkpoint):
    ids = prompt(session, 20)
    want = hf_answer(checkpoint[1], ids, 8)
    full = session.tok.hf.decode(want)
    stop = session.tok.hf.decode(want[4:6])
    assert stop.strip() and full.index(stop) >= len(session.tok.hf.decode(want[:4]))
    deltas, g = answer(session, ids, max_new_tokens=8, stop=[stop])
    assert g.reason == "stop" and "".join(deltas) == g.text == full[: full.index(stop)]
    assert g.tokens == want[: len(g.tokens)] and len(g.tokens) <= 6
    # text held back as the start of a stop string comes out when the answer ends otherwise
    deltas, g = answer(session, ids, max_new_tokens=8, stop=[full[-3:] + "QQQ"])
    assert g.reason == "length" and "".join(deltas) == g.text == full and all(deltas)


def test_a_cancel_ends_the_answer_after_the_token_under_way(session):
    g = session.generate(prompt(session, 20), SamplingParams(temperature=0, max_new_tokens=50))
    deltas = []
    for delta in g:
        deltas.append(delta)
        g.cancel()
    assert len(g.tokens) == 1 and g.reason == "cancelled" and g.stats.completion_tokens == 1


def test_a_seed_gives_the_same_sampled_answer(checkpoint, monkeypatch):
    monkeypatch.setenv("VPTQ_CHAT_WARM_UP", "0")
    runs = {}
    for seed in (3, 3, 4):
        s = Session.load(checkpoint[0], "cpu", torch.float32, CONTEXT)  # a fresh cache
        g = s.generate(prompt(s, 20), SamplingParams(temperature=1.0, max_new_tokens=12, seed=seed))
        list(g)
        runs.setdefault(seed, []).append(g.tokens)
    assert runs[3][0] == runs[3][1] != runs[4][0]


def test_the_prompt_gets_the_context_less_the_answers_room(session):
    words = " ".join(f"word{i}" for i in range(40))
    assert len(session.tok.encode(words)) > CONTEXT // 2
    ids, dropped = session.prompt_ids(prompt=words, max_new_tokens=10)  # 118 tokens of room
    assert ids == session.tok.encode(words) and dropped == 0
    with pytest.raises(ContextError) as e:  # the answer keeps at most half the context
        session.prompt_ids(prompt=words, max_new_tokens=500)
    assert str(e.value) == (
        f"the prompt has {len(ids)} tokens, but 64 of the 128-token context are left for it (64"
        " are kept for the answer); shorten it, lower --max-new-tokens or load the model with a"
        " longer --context"
    )
    for blank in ("", "  \n"):
        with pytest.raises(ValueError, match="the prompt is empty"):
            session.prompt_ids(prompt=blank)
    with pytest.raises(ValueError, match="'continue' goes with 'messages'"):
        session.prompt_ids(prompt=words, continue_final=True)
    # a chat: the oldest messages give way to the budget (context less the answer's room)
    old = {"role": "user", "content": " ".join(f"word{i}" for i in range(25))}
    msgs = [old, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Hi"}]
    ids, dropped = session.prompt_ids(messages=msgs, max_new_tokens=100)
    assert dropped == 2 and ids == session.tok.chat_ids(msgs[2:])
    ids, dropped = session.prompt_ids(messages=msgs[:1], max_new_tokens=5)
    assert dropped == 0 and ids == session.tok.chat_ids(msgs[:1])
