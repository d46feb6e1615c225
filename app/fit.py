"""Will it fit: weights (exact file sizes) + KV cache at a context + runtime overhead, against
the free VRAM of one GPU. Pure arithmetic on config.json; no Qt, no torch.

The engine keeps the KV cache in the model's dtype (2 bytes for fp16/bf16), K and V for every
layer and KV head. Prefill of more than a few tokens dequantizes the largest linear layer to a
dense fp16 workspace before its GEMM, so that layer's N x K x 2 bytes is part of the overhead,
beside the CUDA context and the prefill activations.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30
CUDA_CONTEXT = 512 * MiB  # CUDA context, cuBLAS workspace and allocator slack (measured ~450 MiB)
PREFILL_CHUNK = 512  # tokens per prefill step
TIGHT = 0.90  # above this share of free VRAM the verdict is "tight"
CONTEXT_STEP = 256  # the largest context is reported in these steps


@dataclass(frozen=True)
class Shape:
    """The parts of config.json that decide memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        cfg = cfg.get("text_config", cfg)
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                layers=int(cfg["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings") or 4096),
                dtype_bytes=4 if cfg.get("torch_dtype", cfg.get("dtype")) == "float32" else 2,
            )
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]!r}") from None

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def largest_linear(self) -> int:
        """Elements of the largest projection (what dequant-then-GEMM materialises)."""
        q = self.heads * self.head_dim
        return max(self.hidden * q, self.hidden * self.intermediate)

    def overhead(self) -> int:
        acts = PREFILL_CHUNK * (4 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        logits = 2 * self.vocab * 4  # last-token logits and sampling buffers, fp32
        return CUDA_CONTEXT + self.largest_linear * 2 + acts + logits

    def parameters(self, tied: bool = False) -> int:
        """Parameter count of the dense model this config describes."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        emb = self.vocab * self.hidden
        return self.layers * per_layer + self.hidden + emb * (1 if tied else 2)


@dataclass(frozen=True)
class Fit:
    weights: int
    kv_cache: int
    overhead: int
    free: int
    context: int
    max_context: int  # the largest context that fits (0: not even the weights)

    @property
    def needed(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def verdict(self) -> str:
        if self.needed <= TIGHT * self.free:
            return "fits"
        return "tight" if self.needed <= self.free else "does not fit"

    def lines(self) -> list[str]:
        out = [
            f"Weights {gib(self.weights)}",
            f"KV cache at {self.context} tokens {gib(self.kv_cache)}",
            f"Runtime overhead {gib(self.overhead)}",
            f"Needed {gib(self.needed)} of {gib(self.free)} free",
        ]
        if self.max_context:
            out.append(f"Largest context that fits: {self.max_context} tokens")
        else:
            out.append("The weights alone do not fit")
        return out


def fit(shape: Shape, weight_bytes: int, free: int, context: int) -> Fit:
    per_token = shape.kv_bytes_per_token
    overhead = shape.overhead()
    room = free - weight_bytes - overhead
    largest = max(0, room // per_token) if room > 0 else 0
    largest = min(largest - largest % CONTEXT_STEP, shape.max_context) if largest else 0
    return Fit(weight_bytes, per_token * context, overhead, free, context, largest)


def gib(n: int) -> str:
    if n >= 0.1 * GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"
