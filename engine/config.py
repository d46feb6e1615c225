"""ModelArgs: the decoder's shape facts, read from a Hugging Face config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .formats.vptq import FormatError

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED.items()}


@dataclass
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float16"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], where: str = "config.json") -> ModelArgs:
        archs = cfg.get("architectures") or [_BY_MODEL_TYPE.get(cfg.get("model_type", ""), "")]
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED:
            names = ", ".join(SUPPORTED)
            found = arch or cfg.get("model_type") or "none given"
            raise FormatError(f"{where}: unsupported architecture {found} (supported: {names})")

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise FormatError(f"{where}: missing field '{key}'")
            return cfg[key]

        hidden, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
        rope = cfg.get("rope_parameters") or {}  # transformers >= 5 keeps rope keys here
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") else None)
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        family = SUPPORTED[arch]
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or hidden // n_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
            eos_token_ids=_ids(cfg.get("eos_token_id")),
            bos_token_id=cfg.get("bos_token_id"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> tuple[ModelArgs, dict[str, Any]]:
        path = Path(folder) / "config.json"
        if not path.exists():
            raise FormatError(f"{path}: missing; a model folder needs its config.json")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_config(cfg, str(path)), cfg


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] with the config's rope scaling applied (float64)."""
    d = args.head_dim
    inv = 1.0 / args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    s = args.rope_scaling
    if not s:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv / float(s["factor"])
    if kind == "llama3":
        return _llama3(inv, s)
    raise FormatError(f"config.json: rope_scaling type {kind!r} is not supported")


def _llama3(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = (
        float(s["factor"]),
        float(s["low_freq_factor"]),
        float(s["high_freq_factor"]),
    )
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, blended, scaled)
