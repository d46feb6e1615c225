"""Where the engine keeps models and built kernels. Standard library only (the GUI uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$VPTQ_CHAT_HOME, else $XDG_CACHE_HOME/vptq-chat, else ~/.cache/vptq-chat."""
    if os.environ.get("VPTQ_CHAT_HOME"):
        return Path(os.environ["VPTQ_CHAT_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vptq-chat"


INSTALLED_MARKER = ".vptq-installed.json"  # written last into a verified downloaded model


def hub_models() -> Path:
    """Where downloaded hub models live: $VPTQ_CHAT_MODELS, else <home>/hub; then <owner>/<name>."""
    if os.environ.get("VPTQ_CHAT_MODELS"):
        return Path(os.environ["VPTQ_CHAT_MODELS"])
    return home() / "hub"


def shipped(name: str) -> Path:
    """A top-level folder of the project (csrc, assets, packaging): the source checkout's, else
    the copy a wheel installed under <prefix>/share/vptq-chat."""
    import sys

    repo = Path(__file__).resolve().parents[1] / name
    return repo if repo.exists() else Path(sys.prefix) / "share" / "vptq-chat" / name
