"""The GUI <-> engine wire protocol: JSON Lines over the engine's stdin/stdout.

Standard library only, so the GUI can import it without torch. Every message is one UTF-8
JSON object on one line: ``{"v": PROTOCOL_VERSION, "type": ..., "id": ..., **payload}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

# App -> engine. `generate` takes `messages` (a chat) or `prompt` (raw text), `sampling`
# (SAMPLING_FIELDS), `stop`, and `continue`: true where the last message is an answer to write
# more of (the app's Continue).
REQUESTS = frozenset({"hello", "load", "unload", "generate", "cancel", "stats", "shutdown"})
# Engine -> app. A `delta` carries the answer's next `text` and `tokens`, how many tokens it has
# so far: a piece can hold several (a character split across tokens, text held back while it
# could begin a stop string).
EVENTS = frozenset(
    {"hello", "load_progress", "loaded", "started", "delta", "finished", "error", "stats"}
)
FINISH_REASONS = ("stop", "length", "cancelled", "error")
# An `error` answering a `load` carries `model_kept: true` where the load was refused before
# the loaded model was let go (a bad field, no such GPU, no model there, an unreadable config):
# that model still answers. Without it, no model is loaded.

# The sampling fields of a `generate` request and what each takes. The engine refuses other
# names and values (engine/sampling.py); the app drops them from damaged files (app/settings.py).
SAMPLING_FIELDS = {
    "temperature": "a number",
    "top_k": "a whole number",
    "top_p": "a number",
    "min_p": "a number",
    "repetition_penalty": "a number",
    "max_new_tokens": "a whole number",
    "seed": "a whole number or null",
    "stop": "a list of strings",
}


def sampling_type_error(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be sampling field ``name`` (its name or its type), or None.
    Ranges are the engine's business (SamplingParams.validate)."""
    kind = SAMPLING_FIELDS.get(name)
    if kind is None:
        return f"unknown sampling field '{name}'"
    if kind == "a list of strings":
        ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
    elif value is None:
        ok = kind.endswith("or null")
    else:
        ok = isinstance(value, int if kind.startswith("a whole") else (int, float))
        ok = ok and not isinstance(value, bool)
    return None if ok else f"sampling field '{name}' = {value!r} must be {kind}"


class ProtocolError(ValueError):
    """A line that is not a valid protocol message; the message says what is wrong."""


@dataclass
class Message:
    type: str
    id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.payload.get(key, default)


def encode(type_: str, id_: str | None = None, **payload: Any) -> str:
    """One protocol line (with the trailing newline)."""
    obj: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": type_}
    if id_ is not None:
        obj["id"] = id_
    obj.update(payload)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def decode(line: str | bytes, allowed: frozenset[str] = REQUESTS | EVENTS) -> Message:
    """Parse one line; raise ProtocolError naming what is wrong with it."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"line is not UTF-8: {e}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"line is not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    version = obj.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    type_ = obj.pop("type", None)
    if type_ not in allowed:
        raise ProtocolError(f"unknown message type {type_!r}")
    id_ = obj.pop("id", None)
    if id_ is not None and not isinstance(id_, str):
        raise ProtocolError("'id' must be a string")
    return Message(type_, id_, obj)
