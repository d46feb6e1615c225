"""The rest of a decode step (RMSNorm, RoPE with the KV-cache write, attention, SiLU gate, the
rows of an embedding table kept in host memory, the greedy and the sampled pick) as the fused
kernels of csrc/vptq_decode.cu where they are loaded, else the plain PyTorch code they replace;
a prefill takes the norms, SiLU gate and RoPE with the KV-cache write from them too.
At batch 1 those small kernels, not the weights, took a third of a step's GPU time
(csrc/KERNELS.md). ``VPTQ_DECODE_FUSED=0`` turns the fused kernels off (for comparisons), except
embed_rows, which a table in host memory needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling import argmax, penalize
from . import arch, kernels_ready

ENABLED = os.environ.get("VPTQ_DECODE_FUSED", "1") != "0"
# What decode_attention takes (decode_attention_supported() in csrc/vptq_decode.cu).
ATTN_HEAD_DIMS = (64, 128)
ATTN_GQA = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)  # query heads per KV head
# The first cache position from which a decode step's attention is faster on the tensor cores
# (attn_mma_kernel: all query heads of a KV head in one block) than on the CUDA cores (blocks of
# up to four heads), by (query heads, KV heads, head dimension): the first measured position
# (1024, 2048, 4096, 8192, 16384, 32768) from which `python -m engine bench attention` on an
# H100 had the tensor cores faster at every longer one (csrc/KERNELS.md, session 48, with the
# tensor-core kernel launched without PDL). Llama-3.1-8B's 32/8 stays on the CUDA cores.
# VPTQ_ATTN_TENSOR_CORES=0 keeps every position on the CUDA cores (comparisons, debugging).
TENSOR_CORES_SWITCH = os.environ.get("VPTQ_ATTN_TENSOR_CORES", "1") != "0"
TENSOR_CORE_FROM = {
    (64, 8, 128): 8192,  # Llama-3.1-70B, Qwen2.5-72B (4096: 16.2 us against 17.1)
    (96, 8, 128): 4096,  # Mistral-Large (2048: 12.3 against 17.1)
    (40, 8, 128): 8192,  # Qwen2.5-14B and 32B
    (28, 4, 128): 32768,  # Qwen2.5-7B (16384: 24.9 against 25.0)
    (16, 2, 128): 32768,  # Qwen2.5-3B
    (12, 2, 128): 32768,  # Qwen2.5-1.5B
    (14, 2, 64): 4096,  # Qwen2.5-0.5B (2048: 7.4 against 7.6)
}


@dataclass(frozen=True)
class Partial:
    """A projection's output left as the sliced GEMV's partial sums (engine/ops/cuda.py
    gemv_sliced with partial=True) for the kernel that reads it to add: the whole output is
    ``parts[0] + parts[1] + ...`` in that order, in float32, rounded to ``dtype`` (csrc/vptq.h
    Parts). The GEMV then ends when its last block's lookups do, instead of with one block per
    row block adding all its slices while the rest of the GPU waits. rms_norm with a residual,
    silu_mul and rope_kv take it; anything else calls ``whole()``."""

    parts: torch.Tensor  # float32 [terms, *shape]
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    @property
    def is_cuda(self) -> bool:
        return self.parts.is_cuda

    def whole(self) -> torch.Tensor:
        """The output as one tensor, added in the kernels' order (so bit for bit theirs)."""
        total = self.parts[0].clone()
        for term in self.parts[1:]:
            total += term
        return total.to(self.dtype)


def whole(y):
    """y as a tensor, where it may be a Partial."""
    return y.whole() if isinstance(y, Partial) else y


def _arg(y):
    """What the fused ops take for y: the tensor, or a Partial's terms."""
    return y.parts.contiguous() if isinstance(y, Partial) else y.contiguous()


def _fused(x) -> bool:
    return ENABLED and kernels_ready() and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def rms_norm(x, weight: torch.Tensor, eps: float, residual=None):
    """weight * x / rms(x); with ``residual``: (that of s = x + residual, s). With a residual,
    x may be a Partial."""
    if _fused(x) and weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype):
        if residual is None:
            return torch.ops.vptq.rms_norm(whole(x).contiguous(), weight.contiguous(), eps)
        out, total = torch.ops.vptq.add_rms_norm(
            _arg(x), residual.contiguous(), weight.contiguous(), eps
        )
        return out, total
    x = whole(x)
    if residual is not None:
        x = x + residual
    if x.dtype == weight.dtype == torch.float32:  # the CPU's models: one op, not five
        out = F.rms_norm(x, weight.shape, weight, eps)
        return out if residual is None else (out, x)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def silu_mul(gate, up) -> torch.Tensor:
    """silu(gate) * up; either may be a Partial."""
    if _fused(gate) and up.dtype == gate.dtype and up.shape == gate.shape:
        return torch.ops.vptq.silu_mul(_arg(gate), _arg(up), gate.dtype)
    gate, up = whole(gate), whole(up)
    return F.silu(gate) * up


def embed(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``table[ids]`` on the device of ids. A table kept in pinned host memory
    (engine/memory.py embedding_on_host; the loader does that only with the kernels loaded) is
    read by the GPU over the bus (vptq::embed_rows, about 16 KB a token: no host
    synchronisation, so the decode graph holds it)."""
    if table.device == ids.device:
        return F.embedding(ids, table)
    return torch.ops.vptq.embed_rows(table, ids.contiguous())


def attention_fused(x: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether a decode step on x takes rope_kv and decode_attention for these heads."""
    return (
        _fused(x)
        and head_dim in ATTN_HEAD_DIMS
        and n_heads % n_kv == 0
        and n_heads // n_kv in ATTN_GQA
    )


def rope_kv(q, k, v, cos, sin, pos, k_cache, v_cache) -> torch.Tensor:
    """One token: q, k, v [1, 1, heads * D] -> rotated q [1, H, 1, D]; the rotated k and v go
    into the caches [1, H_kv, max_seq, D] at position pos ([1] int64 on the GPU); cos, sin: the
    whole [max_seq, D] float32 tables. q, k and v may be Partials."""
    return torch.ops.vptq.rope_kv(_arg(q), _arg(k), _arg(v), cos, sin, pos, k_cache, v_cache)


def rope_prefill_fused(q, k, v, k_cache) -> bool:
    """Whether rope_prefill takes a prefill's q, k and v [B, T, heads * D] (one sequence)."""
    return (
        _fused(q)
        and q.shape[0] == 1
        and k_cache.dtype == q.dtype
        and all(t.is_contiguous() and t.dtype == q.dtype for t in (q, k, v))
    )


def rope_prefill(q, k, v, cos, sin, start: int, k_cache, v_cache) -> torch.Tensor:
    """A prefill's T tokens at positions start .. start + T - 1: q, k, v [1, T, heads * D] ->
    rotated q [1, H, T, D]; the rotated k and v go into the caches [1, H_kv, max_seq, D] there.
    cos, sin: the tokens' rows of the float32 tables [T, D]. One kernel where PyTorch takes
    some twenty small ones (engine/model.py rotate and KVCache.update, which it matches bit
    for bit)."""
    return torch.ops.vptq.rope_kv_prefill(q, k, v, cos, sin, start, k_cache, v_cache)


def attention(
    q, k_cache, v_cache, pos, window: int | None, scale: float, tensor_cores: bool = False
) -> torch.Tensor:
    """One query token (q [1, H, 1, D]) against cache positions pos - window + 1 .. pos (all up
    to pos without a window) -> [1, 1, H * D]. ``tensor_cores``: the MMA kernel (compute
    capability 8.0 and later; tensor_core_attention_from says where it is the faster)."""
    op = torch.ops.vptq.decode_attention
    return op(q, k_cache, v_cache, pos, window or 0, scale, tensor_cores)


def tensor_core_attention_from(
    n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> int | None:
    """The first position whose decode-step attention runs on the tensor cores (the decode
    graph switches there, engine/decode.py), or None: these heads always on the CUDA cores, or
    no fused attention at all on this device."""
    x = torch.empty(0, dtype=dtype, device=device)
    if not TENSOR_CORES_SWITCH or not attention_fused(x, n_heads, n_kv, head_dim):
        return None
    if arch.capability(device) < (8, 0):
        return None
    return TENSOR_CORE_FROM.get((n_heads, n_kv, head_dim))


def advance(nxt, token, seen, pos) -> None:
    """The end of a decode step's pick, on the device: token[...] = nxt ([1] int64), seen[nxt] =
    True, pos += 1 (what the fused picks do inside their kernel)."""
    seen.index_fill_(0, nxt, True)
    token.copy_(nxt.view(token.shape))
    pos.add_(1)


def greedy_pick(logits, token, seen, pos, ticket) -> None:
    """The end of a greedy decode step: token[...] = argmax(logits) (logits [1, V], any float
    dtype; the first of equal maxima, NaN the largest, as torch.argmax), seen[token] = True,
    pos += 1. Fused: one kernel (ticket: an int32 zero that it leaves zero) where PyTorch takes
    nine small ones, a cast to float32 among them."""
    if _fused(logits):
        torch.ops.vptq.greedy_pick(logits, token, seen, pos, ticket)
        return
    advance(argmax(logits.float()).view(1), token, seen, pos)


# What sample_pick_kernel holds (csrc/vptq_decode.cu: 8 blocks of kSampleMaxPer values) and
# the shared memory a block takes besides its values (the 128 KiB histogram and small arrays);
# test_decode_ops.py reads the kernel's constants from the source and checks these against them.
SAMPLE_PICK_MAX_VOCAB = 8 * 22 * 1024
SAMPLE_PICK_SMEM = 128 * 1024 + 8 * 1024


def sample_pick_fits(vocab: int, major: int, smem_optin: int) -> bool:
    """Whether the sampled-pick kernel runs on a GPU of this compute capability (major) and
    shared memory a block (opt-in): clusters need 9.0, and GPUs such as the GeForce RTX 50
    series (12.0, 99 KiB a block) have too little room for it."""
    need = SAMPLE_PICK_SMEM + 4 * -(-vocab // 8)
    return major >= 9 and vocab <= SAMPLE_PICK_MAX_VOCAB and smem_optin >= need


def sample_pick_fused(logits: torch.Tensor) -> bool:
    """Whether sample_pick runs as one kernel on this GPU (sample_pick_fits)."""
    if not _fused(logits):
        return False
    major = arch.capability(logits.device)[0]
    return sample_pick_fits(logits.shape[-1], major, arch.smem_optin(logits.device))


def sample_pick(
    logits, noise, token, seen, pos, temperature, top_p, min_p, params=None, top_k=0,
    repetition_penalty=1.0,
) -> None:  # fmt: skip
    """The end of a sampled decode step, as engine/sampling.py sample: the logits of the
    tokens marked in seen divided by the repetition penalty (multiplied where negative); of
    the tokens that min-p, top-k and top-p keep from p = exp(logits / temperature - max),
    token[...] = the one with the largest p / noise (noise [1, V] float32 ~ Exp(1): a draw
    from the kept tokens' distribution), seen[token] = True, pos += 1. Temperature 0: the
    greedy pick (noise unread).

    Top-k keeps the tokens whose p is at least the k-th largest, top-p those with less than
    top_p times the total mass strictly above them (ties kept or dropped together, both).
    Where no token has p > 0 (every logit -inf or NaN), the pick is greedy. Fused (compute
    capability 9.0, sample_pick_fused): one kernel where PyTorch sorts the vocabulary in
    about fifteen, its sums in a fixed order, so a seeded chat draws the same tokens on every
    run; else these tensor operations, with no host sync either.

    params: a float64 tensor [temperature, top_p, min_p, top_k, repetition_penalty] beside
    the logits, read in place of the five numbers (a captured graph then takes new settings
    without a new capture)."""
    if sample_pick_fused(logits):
        torch.ops.vptq.sample_pick(
            logits, noise, token, seen, pos, temperature, top_p, min_p, params, top_k,
            repetition_penalty,
        )  # fmt: skip
        return
    raw = logits.float().view(-1)
    V = raw.shape[0]
    if params is not None:  # device values: no host branch on them (the sort always runs)
        temperature, top_p, min_p = params[0].float(), params[1], params[2].float()
        top_k, repetition_penalty = params[3].long(), params[4].float()
    raw = penalize(raw, seen, repetition_penalty)
    if params is None and temperature == 0:
        advance(argmax(raw).view(1), token, seen, pos)
        return
    x = raw / temperature
    p = torch.exp(x - torch.where(x.isnan(), -torch.inf, x).amax())
    p = torch.where(p >= min_p, p, 0.0)  # NaN too
    total = p.double().sum()
    keys = p.view(torch.int32)  # p >= 0: its bits order the tokens as p does
    cut = torch.ones(1, dtype=torch.int32, device=p.device)  # every token with p > 0
    if params is not None or top_p < 1 or 0 < top_k < V:
        ordered, order = keys.sort(descending=True)
        if params is not None or 0 < top_k < V:  # the top_k-th largest (k = 0: all)
            k = torch.as_tensor(top_k, device=p.device).clamp(0, V)
            kth = ordered[(k - 1).clamp(min=0).view(1)]
            cut = torch.where((k > 0) & (k < V), kth, cut)
        mass = p[order].double()
        before = mass.cumsum(0) - mass  # for the first of equals: the mass strictly above
        top_p_cut = ordered[((before < top_p * total).sum() - 1).clamp(min=0).view(1)]
        cut = torch.maximum(cut, top_p_cut)  # top_p = 1 keeps them all: no cut
    kept = (keys >= cut) & (p > 0)
    ratio = torch.where(kept, p / noise.view(-1), -1.0)
    sampled = total > 0
    if params is not None:
        sampled &= params[0] > 0
    advance(torch.where(sampled, argmax(ratio), argmax(raw)).view(1), token, seen, pos)
