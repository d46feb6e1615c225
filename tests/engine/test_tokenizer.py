"""Streaming detokenizer, stop strings and context fitting with the demo model's tokenizer."""

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
