"""Every setting of the app, its default and type, in one place; saved as JSON."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.protocol import sampling_type_error

log = logging.getLogger("app.settings")

DEFAULT_SAMPLING = {
    "temperature": 0.7,
    "top_p": 0.95,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 512,
}


def valid_sampling(sampling: object) -> dict:
    """The settings of ``sampling`` that the chat settings show (the defaults' names and the
    seed) with a value the engine takes (engine/protocol.py SAMPLING_FIELDS): what a damaged
    or hand-edited file holds beside those is dropped, so that the engine is never sent what
    it refuses on every answer."""
    shown = {*DEFAULT_SAMPLING, "seed"}
    items = sampling.items() if isinstance(sampling, dict) else ()
    return {k: v for k, v in items if k in shown and sampling_type_error(k, v) is None}


def clean_sampling(sampling: object) -> dict:
    """The defaults with the valid settings of ``sampling`` over them."""
    return {**DEFAULT_SAMPLING, **valid_sampling(sampling)}


def data_dir() -> Path:
    """$VPTQ_CHAT_DATA, else $XDG_DATA_HOME/vptq-chat, else ~/.local/share/vptq-chat."""
    if os.environ.get("VPTQ_CHAT_DATA"):
        return Path(os.environ["VPTQ_CHAT_DATA"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "vptq-chat"


@dataclass
class Settings:
    model: str = "demo"  # a model folder, a downloaded repo id, or "demo"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (the engine's numbering): the last load's
    context: int = 4096
    system_prompt: str = ""
    sampling: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    show_panel: bool = True
    text_size: int = 100  # percent of the system font's size (View > Larger text)
    window: str = ""  # the main window's size and place when the app closed (saveGeometry)
    first_run_done: bool = False
    hub_endpoint: str = ""  # a mirror (HF_ENDPOINT); empty: huggingface.co
    hub_proxy: str = ""
    hub_offline: bool = False

    @classmethod
    def load(cls, path: Path) -> Settings:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
            log.warning("%s: unreadable (%s); using defaults", path, e)
            return cls()
        if not isinstance(raw, dict):
            log.warning("%s: not a settings object; using defaults", path)
            return cls()
        defaults, kept = cls(), {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value, want = raw[f.name], type(getattr(defaults, f.name))
            # bool is an int to isinstance: each must be its own type (a float for an int is not)
            if type(value) is want or (want is dict and isinstance(value, dict)):
                kept[f.name] = value
            else:
                log.warning("%s: %s = %r is not of type %s; using %r", path, f.name, value,
                            want.__name__, getattr(defaults, f.name))  # fmt: skip
        s = cls(**kept)
        raw_sampling, s.sampling = s.sampling, clean_sampling(s.sampling)
        dropped = sorted(
            k for k, v in raw_sampling.items() if k not in s.sampling or s.sampling[k] != v
        )
        if dropped:
            log.warning("%s: sampling %s unknown or of the wrong type; using the defaults",
                        path, ", ".join(dropped))  # fmt: skip
        return s

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)
