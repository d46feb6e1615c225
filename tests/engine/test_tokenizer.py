"""Streaming detokenizer, stop strings and context fitting with the demo model's tokenizer."""

import shutil

import pytest

from engine.tokenizer import ContextError, Detokenizer, StopMatcher

TEXTS = [
    "Hello world, this is a test.",
    "  leading and   multiple   spaces\n\nnew lines\tand tabs",
    "Unicode: café, naïve, 日本語のテキスト, emoji 🎉🚀👍🏽 and ∑∫√ math",
    "code:\n```python\ndef f(x):\n    return x ** 2\n```",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(demo_tokenizer, text):
    tok = demo_tokenizer
    context = tok.encode("Some earlier text:")
    ids = tok.encode(text)
    detok = Detokenizer(tok, context)
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)  # never half a UTF-8 character


def test_deltas_come_as_the_tokens_do(demo_tokenizer):
    """Plain ASCII holds nothing back: each token's text is out when it is pushed (a streamed
    answer does not wait for its end), and the flush has nothing left."""
    tok = demo_tokenizer
    ids = tok.encode(TEXTS[0])
    detok = Detokenizer(tok, tok.encode("Earlier:"))
    assert [detok.push(t) for t in ids] == [tok.decode([t]) for t in ids]
    assert detok.flush() == ""


def test_the_context_keeps_the_first_deltas_space_under_a_sentencepiece_decoder(tmp_path):
    """SentencePiece-style tokenizers (Mistral's, Llama 2's) drop the space of a text's first
    word piece when it is decoded alone, so the first delta of an answer would lose the space
    after the prompt's last word: the detokenizer decodes from the context's last tokens."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "▁again": 4}
    fast = Fast(models.WordLevel(vocab, unk_token="<unk>"))
    fast.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    fast.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    hf = PreTrainedTokenizerFast(tokenizer_object=fast, unk_token="<unk>", eos_token="</s>")
    hf.save_pretrained(str(tmp_path))
    tok = Tokenizer(tmp_path)
    assert tok.decode([3]) == "world" and tok.decode([2, 3]) == "Hello world"
    detok = Detokenizer(tok, [1, 1, 1, 1, 2])  # only the last 4 are read: ends with "Hello"
    assert [detok.push(3), detok.push(4), detok.flush()] == [" world", " again", ""]
    assert Detokenizer(tok).push(3) == "world"  # an answer's first word, no context


def test_multibyte_characters_are_split_over_tokens(demo_tokenizer):
    """The case the detokenizer exists for: at least one emoji spans several byte tokens."""
    ids = demo_tokenizer.encode("🎉")
    assert len(ids) > 1
    assert "\ufffd" in demo_tokenizer.decode(ids[:1])


def test_stop_matcher_holds_back_a_possible_stop():
    m = StopMatcher(["</end>", "STOP"])
    assert m.feed("hello </") == ("hello ", False)
    assert m.feed("en") == ("", False)
    assert m.feed("d> more") == ("", True)
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ay") == ("STay", False)
    assert m.feed("fine STOP later") == ("fine ", True)
    m = StopMatcher(["STOP"])  # a stop's first letter and its first three are held back
    assert [m.feed("abcS"), m.feed("TO"), m.feed("x")] == [("abc", False), ("", False),
                                                           ("STOx", False)]  # fmt: skip
    m = StopMatcher(["", ""])  # no stop strings (empty ones are none): nothing held back
    assert (m.stops, m.feed("abc S"), m.flush()) == ([], ("abc S", False), "")


def conversation(n):
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(n):
        msgs.append({"role": "user", "content": f"question {i} " + "word " * 30})
        msgs.append({"role": "assistant", "content": f"answer {i} " + "word " * 30})
    msgs.append({"role": "user", "content": "last question"})
    return msgs


def test_fit_drops_oldest_turns_but_keeps_the_system_prompt(demo_tokenizer):
    tok = demo_tokenizer
    msgs = conversation(6)
    full, dropped = tok.fit_messages(msgs, 10_000)
    assert dropped == 0
    ids, dropped = tok.fit_messages(msgs, len(full) // 2)
    assert len(ids) <= len(full) // 2
    assert dropped % 2 == 0 and dropped > 0  # whole user/assistant pairs
    text = tok.decode(ids)
    assert "Be brief." in text and "last question" in text
    assert "question 0 " not in text and f"answer {5}" in text


def test_last_message_too_long_is_a_clear_error(demo_tokenizer):
    with pytest.raises(ContextError, match="the last message needs"):
        demo_tokenizer.fit_messages([{"role": "user", "content": "word " * 500}], 100)


def test_an_answer_to_continue_keeps_its_question_and_says_what_to_do_when_too_long(
    demo_tokenizer,
):
    tok = demo_tokenizer
    msgs = [*conversation(3), {"role": "assistant", "content": "The answer begins"}]
    ids, dropped = tok.fit_messages(msgs, 10_000, continue_final=True)
    text = tok.decode(ids)
    assert dropped == 0 and text.endswith("The answer begins")  # open: no end of turn after it
    ids, dropped = tok.fit_messages(msgs, len(ids) - 1, continue_final=True)
    assert dropped > 0 and tok.decode(ids).endswith("The answer begins")
    long = [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": "w " * 500}]
    with pytest.raises(ContextError, match=r"the answer to continue and its question need .* "
                       r"load the model with a longer context, or ask again"):  # fmt: skip
        tok.fit_messages(long, 100, continue_final=True)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [{"role": "user"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": "  "}],
    ],
)
def test_bad_messages(demo_tokenizer, bad):
    with pytest.raises(ValueError):
        demo_tokenizer.fit_messages(bad, 100)


# A chat template as strict as Mistral's: after an optional system message, user and assistant
# turns must alternate, starting with the user.
STRICT = (
    "{%- set offset = 1 if messages[0]['role'] == 'system' else 0 -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}[SYS]{{ m['content'] }}[/SYS]"
    "{%- else -%}"
    "{%- if (m['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) -%}"
    "{{ raise_exception('conversation roles must alternate user/assistant/user/assistant') }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}[INST] {{ m['content'] }}[/INST]"
    "{%- else -%} {{ m['content'] }}</s>{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@pytest.fixture
def strict_tokenizer(demo_path, tmp_path):
    from engine.tokenizer import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_path / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(STRICT)
    return Tokenizer(tmp_path)


def test_turns_of_one_role_in_a_row_are_joined_for_a_template_that_refuses_them(
    strict_tokenizer,
):
    """A chat holds two user turns in a row after an answer that failed (the app leaves it out
    of the history). Mistral's template refuses that, so every message in such a chat failed
    with the template's exception; the turns are joined instead."""
    tok = strict_tokenizer
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first try"},
        {"role": "user", "content": "second try"},
    ]
    ids, dropped = tok.fit_messages(msgs, 10_000)
    assert dropped == 0
    assert tok.decode(ids) == "[SYS]Be brief.[/SYS][INST] first try\n\nsecond try[/INST]"
    # an answer to go on with after two assistant turns in a row (one stopped, one failed)
    more = [*msgs[:2], {"role": "assistant", "content": "Part one."},
            {"role": "assistant", "content": "Part two"}]  # fmt: skip
    ids, _ = tok.fit_messages(more, 10_000, continue_final=True)
    assert tok.decode(ids) == "[SYS]Be brief.[/SYS][INST] first try[/INST]Part one.\n\nPart two"
    # alternating turns are rendered as they are; the oldest dropped, the first kept a user's
    turns = conversation(4)
    ids, dropped = tok.fit_messages(turns, 10_000)
    assert tok.decode(ids).count("[INST]") == 5 and dropped == 0
    ids, dropped = tok.fit_messages(turns, len(ids) // 2)
    assert dropped > 0 and tok.decode(ids).startswith("[SYS]Be brief.[/SYS][INST] question")


def test_a_template_that_refuses_a_conversation_for_another_reason_says_so(strict_tokenizer):
    """A refusal that joining turns does not mend (here: a first turn of the assistant) is a
    ValueError that quotes the template, not jinja's exception from deep in transformers."""
    with pytest.raises(ValueError, match="the model's chat template refuses this conversation: "
                       "conversation roles must alternate"):  # fmt: skip
        strict_tokenizer.chat_ids([{"role": "assistant", "content": "hi"},
                                   {"role": "user", "content": "hello"}])  # fmt: skip


def test_fit_at_the_budget_to_the_token_and_counts_what_it_drops(demo_tokenizer):
    """A conversation exactly as long as the budget is kept whole; one token less drops turns,
    and the count returned is the number of messages missing from the text."""
    tok = demo_tokenizer
    msgs = conversation(6)
    full, dropped = tok.fit_messages(msgs, 10_000)
    assert tok.fit_messages(msgs, len(full)) == (full, 0)
    for budget in (len(full) - 1, len(full) // 2, len(full) // 3):
        ids, dropped = tok.fit_messages(msgs, budget)
        text = tok.decode(ids)
        missing = [m for m in msgs if m["content"] not in text]
        assert len(ids) <= budget and dropped == len(missing) > 0
        assert missing == msgs[1 : 1 + dropped]  # the oldest, never the system prompt


def test_fit_drops_the_first_of_two_user_turns_in_a_row(demo_tokenizer):
    """After a failed answer a chat ends with two user turns: the older goes where the context
    is short, and the newer is sent; an answer to continue after them keeps its question."""
    tok = demo_tokenizer
    old = {"role": "user", "content": "an old question " + "word " * 60}
    new = {"role": "user", "content": "the new question"}
    alone, _ = tok.fit_messages([new], 10_000)
    ids, dropped = tok.fit_messages([old, new], len(alone))
    assert (ids, dropped) == (alone, 1)
    answer = {"role": "assistant", "content": "It begins"}
    pair, _ = tok.fit_messages([new, answer], 10_000, continue_final=True)
    ids, dropped = tok.fit_messages([old, new, answer], len(pair), continue_final=True)
    assert (ids, dropped) == (pair, 1)


def test_an_answer_to_continue_is_never_sent_without_its_question(demo_tokenizer):
    """A long question and a short answer to go on with, in a budget the answer alone would
    fit: the error that says what to do, not the answer continued without its question."""
    tok = demo_tokenizer
    question = {"role": "user", "content": "word " * 200}
    answer = {"role": "assistant", "content": "Short"}
    alone, _ = tok.fit_messages([{"role": "user", "content": "q"}, answer], 10_000, True)
    with pytest.raises(ContextError, match="the answer to continue and its question need"):
        tok.fit_messages([question, answer], len(alone) + 5, continue_final=True)


@pytest.mark.parametrize(
    "config, want",
    [
        (None, {2}),  # no generation_config.json: the tokenizer's own end token
        ({"eos_token_id": None}, {2}),
        ({"eos_token_id": 7}, {2, 7}),
        ({"eos_token_id": [7, 9]}, {2, 7, 9}),  # Llama 3.1 lists three
        ({"bos_token_id": 1}, {2}),
    ],
)
def test_the_end_tokens_are_the_tokenizers_and_generation_configs(
    demo_path, tmp_path, config, want
):
    import json

    from engine.tokenizer import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path / name, tmp_path / name)
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    tok = Tokenizer(tmp_path)
    assert tok.hf.eos_token_id == 2  # the demo's <|im_end|>
    assert tok.eos_ids == sorted(want)
    assert Tokenizer(tmp_path, config_eos=[5]).eos_ids == sorted(want | {5})


def test_a_shortened_conversation_starts_on_a_user_turn(demo_tokenizer):
    """Dropping the oldest question leaves its answer first: that goes too, even where the
    budget would hold it (a template may require the user to speak first)."""
    tok = demo_tokenizer
    msgs = [
        {"role": "user", "content": "an old question " + "word " * 60},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "the new question"},
    ]
    alone, _ = tok.fit_messages(msgs[2:], 10_000)
    with_answer, _ = tok.fit_messages(msgs[1:], 10_000)
    assert len(with_answer) > len(alone)
    assert tok.fit_messages(msgs, len(with_answer)) == (alone, 2)
