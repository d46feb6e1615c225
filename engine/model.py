"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5) in plain PyTorch.

Module names mirror the Hugging Face checkpoints (``model.layers.3.self_attn.q_proj`` ...), so
the loader fills the state dict directly. Every linear comes from a factory, which returns a
VQLinear for quantized layers and an nn.Linear otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .config import ModelArgs, rope_inv_freq
from .kv_cache import KVCache
from .layers import cpu_linear, cpu_weight_dtype
from .ops import decode as fused

LinearFactory = Callable[[str, int, int, bool], nn.Module]
# The fused decode step leaves the sliced GEMV's sums to the kernels that read its outputs
# (engine/ops/decode.py Partial); VPTQ_PARTIAL_SUMS=0 makes every GEMV add its own (for
# comparisons).
PARTIAL_SUMS = os.environ.get("VPTQ_PARTIAL_SUMS", "1") != "0"


def fused_decode(start, mask) -> bool:
    """Whether a forward pass is the fused decode step: one token at a position held on the
    device, no mask (Transformer.decode chooses)."""
    return isinstance(start, torch.Tensor) and mask is None


# Prefill attention: PyTorch's own pick for grouped heads on Hopper, cuDNN's attention, builds a
# plan for each new (query, key) length, 40 ms to 1.1 s on an H200, and every chat turn brings a
# new one (csrc/KERNELS.md session 26). Flash and memory-efficient attention take any length.
CAUSAL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over k, v [B, H_kv, S, D] (query head h reads key head
    h // (H / H_kv)). mask None: causal, the queries being the last T positions (query t sees
    keys 0 .. S - T + t); K and V are not copied per query head: each key head's group of query
    heads is a batch entry of its own, over K and V expanded with stride 0, for flash attention.
    Else mask [T, S] bool on PyTorch's pick: a sliding window's prefill and the decode step off
    the fused kernels (one shape), where memory-efficient attention would expand the mask to
    every head."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    b, h, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    q = q.unflatten(1, (kv, h // kv)).flatten(0, 1)  # [B * H_kv, group, T, D]
    k = k.flatten(0, 1)[:, None].expand(-1, h // kv, -1, -1)
    v = v.flatten(0, 1)[:, None].expand(-1, h // kv, -1, -1)
    if flash_takes(q, k, v):
        # what SDPA ends in for these tensors, without its checks' host time at every layer
        # (a lower-right causal bias takes a Python dispatch, 100 us a call); flash attention
        # aligns a causal mask to the last key, as the lower right bias asks
        y = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)[0]
        return y.reshape(b, h, t, d)
    if t == 1 and not q.is_cuda:
        # a CPU decode step: the one query sees every key, no mask; the backend choice and the
        # bias's dispatch below took 62 of its 75 us (the demo: 1.9 ms of a 24 ms step)
        return F.scaled_dot_product_attention(q, k, v).reshape(b, h, t, d)
    with sdpa_kernel(CAUSAL_BACKENDS):
        if t == s:  # without the causal_lower_right bias's dispatch in Python
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s))
    return y.reshape(b, h, t, d)


_FLASH: dict[tuple, bool] = {}


def flash_takes(q, k, v) -> bool:
    """Whether flash attention takes q, k, v as attention() lays them out: PyTorch's own check
    (GPU, dtype, head dimension, strides), made once per device, dtype and head dimension."""
    if not q.is_cuda or q.shape[-1] % 8:  # SDPA pads other head dimensions for flash
        return False
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _FLASH:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        # not causal to PyTorch's check, which refuses flash for its own top-left causal mask
        # where T < S (attention() asks flash for the lower-right one, its own)
        _FLASH[key] = can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, False))
    return _FLASH[key]


class DenseLinear(nn.Linear):
    """A plain (not quantized) linear layer. On the CPU a float32 model's may hold its weight in
    float16 (engine/loader.py plants it so), read as the expanded VPTQ layers are
    (engine/layers.py cpu_linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.is_cuda else cpu_linear(x, self.weight, self.bias)

    def cpu_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight

    def share_cpu_weight(self, view: torch.Tensor) -> None:
        self.weight.data = view


def dense_linear(
    name: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None = None
) -> nn.Module:
    """``dtype``: the weight's, where it is not the model's (a float16 weight on the CPU)."""
    return DenseLinear(in_features, out_features, bias=bias, dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The norm of x; with ``residual``: (the norm of s = x + residual, s), in one kernel
        on the GPU (engine/ops/decode.py)."""
        return fused.rms_norm(x, self.weight, self.eps, residual)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the Hugging Face (half-split) layout; x: [B, H, T, D], cos/sin: [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def apply(m: nn.Module, x: torch.Tensor, defer: bool = False):
    """m(x). ``defer`` (the fused decode step): a layer that can (engine/layers.py VQLinear on
    the sliced GEMV) may return its output as a Partial, whose sums the next fused kernel adds
    (engine/ops/decode.py)."""
    if defer and getattr(m, "can_defer", False):
        return m(x, defer=True)
    return m(x)


def project(x: torch.Tensor, block, defer: bool = False) -> list:
    """The outputs of a block's linear layers that read the same x: one launch where the loader
    gave them a shared sliced GEMV (``block.fused``, engine/layers.py SharedInputGroup), one
    product on the CPU (``block.cpu_group``), else one call each."""
    shared = block.fused
    if shared is not None and shared.takes(x):
        return shared(x, defer=True) if defer else shared(x)
    if not x.is_cuda:
        ys = block.cpu_group(x, block.shared_input())
        if ys is not None:
            return ys
    return [apply(m, x, defer) for m in block.shared_input()]


class CpuGroup:
    """Linear layers that read the same input (q, k, v; gate, up) as one product on the CPU:
    their weights (engine/layers.py cpu_linear: float16 under float32 activations) made one
    tensor on the first call for a dtype of activations, each layer's weight a view of it, so
    nothing is held twice and in-place changes (quantize's) reach it. A decode step of the demo
    took 21.9 against 24.4 ms on two cores (the dense demo 20.1 against 21.1; medians of rounds
    alternating in one process): the seven products' dispatch and conversions, not their
    bytes."""

    def __init__(self) -> None:
        self.dtype: torch.dtype | None = None  # of the activations it was made for
        self.weight: torch.Tensor | None = None  # [sum of N, K]; None: the layers one by one
        self.bias: torch.Tensor | None = None
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor, linears: tuple) -> list | None:
        """The outputs of ``linears``, or None where they are not one product: a layer whose
        calls are watched (quantize's hooks) or replaced (bench_step's stand-ins), without a
        CPU weight, or of another dtype."""
        if any(m._forward_pre_hooks or m._forward_hooks or "forward" in vars(m) for m in linears):
            return None
        if self.dtype != x.dtype:
            self._join(linears, x.dtype)
        if self.weight is None:
            return None
        return list(cpu_linear(x, self.weight, self.bias).split(self.sizes, -1))

    def _join(self, linears: tuple, dtype: torch.dtype) -> None:
        self.dtype, self.weight, self.bias = dtype, None, None
        if not all(hasattr(m, "cpu_weight") for m in linears):
            return
        weights = [m.cpu_weight(dtype) for m in linears]
        if any(w.dtype != weights[0].dtype for w in weights):
            return
        self.weight = torch.cat(weights)
        self.sizes = [w.shape[0] for w in weights]
        row = 0
        for m, n in zip(linears, self.sizes, strict=True):
            m.share_cpu_weight(self.weight[row : row + n])
            row += n
        biases = [getattr(m, "bias", None) for m in linears]
        if any(b is not None for b in biases):
            pairs = zip(biases, self.sizes, strict=True)
            self.bias = torch.cat(  # in the activations' dtype: cpu_linear converts no more
                [torch.zeros(n, dtype=dtype) if b is None else b.to(dtype) for b, n in pairs]
            )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, prefix: str, make: LinearFactory):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.n_kv_heads, d
        self.q_proj = make(f"{prefix}.q_proj", h, args.n_heads * d, args.qkv_bias)
        self.k_proj = make(f"{prefix}.k_proj", h, args.n_kv_heads * d, args.qkv_bias)
        self.v_proj = make(f"{prefix}.v_proj", h, args.n_kv_heads * d, args.qkv_bias)
        self.o_proj = make(f"{prefix}.o_proj", args.n_heads * d, h, args.o_bias)
        self.window = args.sliding_window
        self.cache: KVCache | None = None
        self.fused = None  # q, k, v in one launch (engine/layers.py build_sliced_layouts)
        self.cpu_group = CpuGroup()
        self.tensor_cores = False  # the fused decode attention's kernel (Transformer.decode)

    def shared_input(self) -> tuple:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, start, mask: torch.Tensor | None) -> torch.Tensor:
        """start: an int, or a device tensor [1] for one decode token. Then either ``mask``
        covers the whole static cache, or mask is None and cos, sin are the whole tables: the
        fused decode kernels (Transformer.decode chooses)."""
        b, t, _ = x.shape  # x: [B, T, H]
        if self.cache is None:
            raise RuntimeError("setup_caches() must run before the forward pass")
        if fused_decode(start, mask):
            q, k, v = project(x, self, defer=PARTIAL_SUMS)
            c = self.cache
            q = fused.rope_kv(q, k, v, cos, sin, start, c.k, c.v)
            scale = self.head_dim**-0.5
            y = fused.attention(q, c.k, c.v, start, self.window, scale, self.tensor_cores)
            return apply(self.o_proj, y, defer=PARTIAL_SUMS)  # its sums left to the next norm
        q, k, v = project(x, self)
        c = self.cache
        if isinstance(start, int) and fused.rope_prefill_fused(q, k, v, c.k):
            q = fused.rope_prefill(q, k, v, cos, sin, start, c.k, c.v)  # [1, H, T, D]
            k, v = c.k[:, :, : start + t], c.v[:, :, : start + t]
        else:
            q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # [B, H, T, D]
            if isinstance(start, torch.Tensor):
                k, v = c.write_at(start, k, v)  # [B, H_kv, max_seq, D]
            else:
                k, v = c.update(start, k, v)  # [B, H_kv, start+T, D]
        y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, prefix: str, make: LinearFactory):
        super().__init__()
        h, i, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = make(f"{prefix}.gate_proj", h, i, bias)
        self.up_proj = make(f"{prefix}.up_proj", h, i, bias)
        self.down_proj = make(f"{prefix}.down_proj", i, h, bias)
        self.fused = None  # gate and up in one launch (engine/layers.py build_sliced_layouts)
        self.cpu_group = CpuGroup()

    def shared_input(self) -> tuple:
        return self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, defer: bool = False):
        """``defer``: the fused decode step, where projections may return Partials."""
        gate, up = project(x, self, defer)
        return apply(self.down_proj, fused.silu_mul(gate, up), defer)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, prefix: str, make: LinearFactory):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, f"{prefix}.self_attn", make)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, f"{prefix}.mlp", make)

    def forward(self, x, cos, sin, start, mask, residual=None):
        """The layer's input is x (+ residual, where given) -> (mlp output, residual), whose sum
        is the layer's output. The sums are left to the next norm, which adds them in its
        kernel on a GPU (engine/ops/decode.py rms_norm); in the fused decode step (start a
        tensor, no mask) so may be the projections' own sums (Partial)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        a = self.self_attn(h, cos, sin, start, mask)
        h, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(h, defer=PARTIAL_SUMS and fused_decode(start, mask)), residual


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs, make: LinearFactory):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, f"model.layers.{i}", make) for i in range(args.n_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, make: LinearFactory = dense_linear):
        super().__init__()
        self.args = args
        self.model = Backbone(args, make)
        self.lm_head = None
        if not args.tie_word_embeddings:
            self.lm_head = make("lm_head", args.hidden_size, args.vocab_size, False)
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.register_buffer("cpu_output", None, persistent=False)  # output(): float16 copy
        self.half_weights = True  # False: no float16 copy of a tied table (loader.load_model)
        self.max_seq = 0

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """Allocate the static KV cache and the RoPE tables on the model's device."""
        p = self.model.norm.weight
        a = self.args
        for layer in self.model.layers:
            layer.self_attn.cache = None  # the old cache is freed before the new one is taken
        caches = KVCache.allocate(
            len(self.model.layers), max_batch, a.n_kv_heads, max_seq, a.head_dim, p.dtype, p.device
        )
        for layer, cache in zip(self.model.layers, caches, strict=True):
            layer.self_attn.cache = cache
        angles = torch.outer(torch.arange(max_seq, dtype=torch.float64), rope_inv_freq(a))
        angles = torch.cat((angles, angles), dim=-1)  # [max_seq, D]
        self.cos = angles.cos().float().to(p.device)
        self.sin = angles.sin().float().to(p.device)
        self.key_pos = torch.arange(max_seq, device=p.device)  # for the decode mask
        self.max_seq = max_seq

    def attention_mask(self, start: int, t: int) -> torch.Tensor | None:
        """[T, start+T] bool: query t sees keys 0..start+t within the sliding window; None where
        that is every earlier key (no window, or the chunk ends within it): causal attention."""
        window = self.args.sliding_window
        if window is None or start + t <= window:
            return None
        q = torch.arange(start, start + t, device=self.cos.device)[:, None]
        k = torch.arange(start + t, device=self.cos.device)[None, :]
        mask = k <= q
        if window is not None:
            mask &= k > q - window
        return mask

    def decode(
        self, token: torch.Tensor, pos: torch.Tensor, cast: bool = True, tensor_cores: bool = False
    ) -> torch.Tensor:
        """One token (token: [1, 1]) at the position held by the device tensor pos ([1]) ->
        float32 logits [1, V] (cast=False: in the lm_head's dtype). No host values, so it can be
        captured in a CUDA graph. ``tensor_cores``: the fused attention on the tensor cores
        (engine/ops/decode.py tensor_core_attention_from says from where that is the faster)."""
        x = fused.embed(self.model.embed_tokens.weight, token)  # [1, 1, H]
        a = self.args
        for layer in self.model.layers:
            layer.self_attn.tensor_cores = tensor_cores
        if fused.attention_fused(x, a.n_heads, a.n_kv_heads, a.head_dim):
            cos, sin, mask = self.cos, self.sin, None  # the kernels read position pos
        else:
            cos, sin = self.cos[pos], self.sin[pos]  # [1, D]
            keys = self.key_pos[None, :]  # [1, max_seq]
            mask = keys <= pos[:, None]  # [1, max_seq]: this query sees keys 0..pos
            if a.sliding_window is not None:
                mask &= keys > pos[:, None] - a.sliding_window
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, cos, sin, pos, mask, residual)
        x, _ = self.model.norm(x, residual)  # [1, 1, H]
        logits = self.output(x[0])
        return logits.float() if cast else logits

    def forward(self, tokens: torch.Tensor, start: int = 0, last_only: bool = False):
        """tokens: [B, T] at positions start..start+T-1 -> float32 logits [B, T or 1, V]."""
        t = tokens.shape[1]
        if start + t > self.max_seq:
            raise ValueError(f"{start + t} tokens exceed the context of {self.max_seq}")
        cos, sin = self.cos[start : start + t], self.sin[start : start + t]
        mask = self.attention_mask(start, t)
        x = fused.embed(self.model.embed_tokens.weight, tokens)  # [B, T, H]
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, cos, sin, start, mask, residual)
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        x, _ = self.model.norm(x, residual)
        return self.output(x).float()

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer (lm_head, or the tied embedding table): logits in x's dtype. On the
        CPU a float32 model reads its output weight in float16, as its other layers
        (engine/layers.py cpu_linear): lm_head is loaded so (engine/loader.py), a tied table,
        which the embedding lookups read in float32, gets a float16 copy. Llama 3's 128256 x
        4096 table is 2.1 GB in float32, and the demo's took 9.9 ms of a 33 ms step that way,
        2.0 ms from float16."""
        if self.lm_head is not None:
            return self.lm_head(x)
        w = self.model.embed_tokens.weight
        if x.is_cuda or not self.half_weights or cpu_weight_dtype(x.dtype) == x.dtype:
            return F.linear(x, w)
        if self.cpu_output is None:
            self.cpu_output = w.to(cpu_weight_dtype(x.dtype))
        return cpu_linear(x, self.cpu_output, None)
