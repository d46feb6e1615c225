"""Tokenizer, chat template, context fitting, and streaming-safe detokenizing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .formats.vptq import FormatError


class ContextError(ValueError):
    """A prompt that cannot fit the context even after dropping old turns."""


class Tokenizer:
    def __init__(self, folder: Path, config_eos: list[int] | None = None):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise FormatError(f"{folder}: cannot load the tokenizer ({e})") from e
        self.eos_ids = sorted(set(config_eos or []) | _generation_eos(folder) | self._own_eos())

    def _own_eos(self) -> set[int]:
        eos = self.hf.eos_token_id
        return set() if eos is None else {int(eos)}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]], continue_final: bool = False) -> list[int]:
        """The chat template's tokens, ending with the prompt for a new answer, or with
        ``continue_final`` inside the last (assistant) message, for more of it."""
        if not self.has_chat_template:
            raise ContextError("this model's tokenizer has no chat template; use a raw prompt")
        from jinja2.exceptions import TemplateError

        def render(msgs: list[dict[str, str]]) -> str:
            return self.hf.apply_chat_template(
                msgs,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                tokenize=False,
            )

        try:
            text = render(messages)
        except TemplateError:
            # Templates such as Mistral's refuse two turns of one role in a row, which a chat
            # holds after an answer that failed (the app leaves it out of the history): the
            # turns are then joined, as the model would read them one after the other.
            try:
                text = render(alternating(messages))
            except TemplateError as e:
                msg = f"the model's chat template refuses this conversation: {e}"
                raise ValueError(msg) from e
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def fit_messages(
        self, messages: list[dict[str, str]], budget: int, continue_final: bool = False
    ) -> tuple[list[int], int]:
        """Token ids of the conversation, dropping the oldest turns (never the system prompt)
        until it fits in ``budget`` tokens; returns (ids, number of messages dropped).
        ``continue_final``: the last message is an answer to write more of (chat_ids)."""
        check_messages(messages)
        if continue_final and messages[-1]["role"] != "assistant":
            raise ValueError("'continue' needs the last message to be the answer to go on with")
        system = messages[:1] if messages[0]["role"] == "system" else []
        rest = list(messages[len(system) :])
        dropped = 0
        while True:
            ids = self.chat_ids(system + rest, continue_final)
            if len(ids) <= budget:
                return ids, dropped
            if continue_final and len(rest) <= 2:  # an answer to go on with keeps its question
                raise ContextError(
                    f"the answer to continue and its question need {len(ids)} tokens but only "
                    f"{budget} are available; load the model with a longer context, or ask again "
                    "for a shorter answer"
                )
            if len(rest) <= 1:
                raise ContextError(
                    f"the last message needs {len(ids)} tokens but only {budget} are available; "
                    "shorten it or load the model with a longer context"
                )
            rest.pop(0)
            dropped += 1
            while len(rest) > 1 and rest[0]["role"] != "user":  # start on a user turn
                rest.pop(0)
                dropped += 1


def alternating(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """``messages`` with each run of turns of one role joined into one turn (their texts
    separated by a blank line): user and assistant turns then alternate."""
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not (
            isinstance(m, dict)
            and isinstance(m.get("content"), str)
            and m.get("role") in ("system", "user", "assistant")
        ):
            raise ValueError(
                f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}"
            )
    if not messages[-1]["content"].strip():
        raise ValueError("the last message is empty: type something to send")


def _generation_eos(folder: Path) -> set[int]:
    path = Path(folder) / "generation_config.json"
    if not path.exists():
        return set()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return set()
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


class Detokenizer:
    """Turns a token stream into text deltas that never split a UTF-8 character and keep the
    spaces that tokenizers attach to word pieces: each step decodes a window that starts a few
    tokens back and emits only what is new once it no longer ends in U+FFFD."""

    def __init__(self, tok: Tokenizer, context: list[int] | None = None):
        self.decode = tok.decode
        self.ids = list(context or [])[-4:]
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports a complete match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((self._overlap(s) for s in self.stops), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _overlap(self, stop: str) -> int:
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
