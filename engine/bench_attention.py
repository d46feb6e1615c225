"""``python -m engine bench attention``: the decode step's attention at long contexts.

One query token against the KV cache up to a position, for the head shapes of the benchmarked
models (or any ``--heads H/HKV/D``): ``vptq::decode_attention`` (csrc/vptq_decode.cu) on the CUDA
cores and on the tensor cores against PyTorch's scaled dot-product attention on the same cache,
timed in the same run. Where the tensor cores are the faster from some position on, the decode
graph switches there (engine/ops/decode.py TENSOR_CORE_FROM, from these rows). At batch 1 the
attention reads the filled part of the cache once a layer and does little arithmetic on it, so
its bound is the device's read rate: each row prints the GB/s of cache read against that rate,
measured in the same run. The calls cycle over enough caches (one per layer, as in a decode
step) that they come from DRAM, not L2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bench import ROTATE_BYTES, model_config, start_gpu_bench, time_us
from .memory import Shape
from .ops import arch as gpu_arch
from .ops import decode as fused

POSITIONS = (1024, 4096, 16384, 32768)
ARCHS = ("llama-3.1-8b", "llama-3.1-70b")
MAX_CACHE_BYTES = 8 << 30  # the caches a row allocates at most


def heads(arch: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head dimension) of a benchmarked model."""
    s = Shape.from_config(model_config(arch))
    return s.heads, s.kv_heads, s.head_dim


def kv_bytes(kv_heads: int, head_dim: int, position: int) -> int:
    """Bytes of fp16 keys and values one layer's query at ``position`` reads (keys 0 ..
    position)."""
    return 2 * kv_heads * head_dim * 2 * (position + 1)


def parse_heads(value: str) -> tuple[int, int, int]:
    """``--heads 64/8/128`` -> (64, 8, 128): query heads, KV heads, head dimension."""
    try:
        h, hkv, d = (int(v) for v in value.split("/"))
    except ValueError:
        msg = f"--heads {value!r}: give query heads/KV heads/head dim, e.g. 64/8/128"
        raise ValueError(msg) from None
    if not (d in fused.ATTN_HEAD_DIMS and hkv > 0 and h % hkv == 0 and h // hkv in fused.ATTN_GQA):
        raise ValueError(f"--heads {value!r}: decode attention does not take these heads")
    return h, hkv, d


def bench_one(label: str, shape: tuple[int, int, int], position: int, peak: float) -> dict:
    h, hkv, d = shape
    length = position + 256  # the cache's length (the engine's context) decides the splits
    nbytes, per_layer = kv_bytes(hkv, d, position), kv_bytes(hkv, d, length - 1)
    copies = max(2, min(-(-ROTATE_BYTES // nbytes), 64))
    copies = max(1, min(copies, MAX_CACHE_BYTES // per_layer))
    gen = torch.Generator(device="cuda").manual_seed(position)
    caches = [
        (torch.randn(1, hkv, length, d, device="cuda", generator=gen, dtype=torch.float16),
         torch.randn(1, hkv, length, d, device="cuda", generator=gen, dtype=torch.float16))
        for _ in range(copies)
    ]  # fmt: skip
    q = torch.randn(1, h, 1, d, device="cuda", generator=gen, dtype=torch.float16)
    pos = torch.tensor([position], device="cuda")
    scale = d**-0.5

    def ours(k, v):
        return fused.attention(q, k, v, pos, None, scale)

    def tensor_cores(k, v):
        return fused.attention(q, k, v, pos, None, scale, True)

    def sdpa(k, v):
        k, v = k[:, :, : position + 1], v[:, :, : position + 1]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    kernels = [("ours", ours), ("tc", tensor_cores), ("sdpa", sdpa)]
    if gpu_arch.capability() < (8, 0):
        kernels.pop(1)
    k, v = caches[0]
    want = sdpa(k, v).float().view(-1)
    diff = max((fn(k, v).float().view(-1) - want).abs().max().item() for _, fn in kernels[:-1])
    row = dict(arch=label, position=position, heads=f"{h}/{hkv}x{d}", copies=copies, diff=diff,
               mb=nbytes / 1e6)  # fmt: skip
    for name, fn in kernels:
        us = time_us([lambda k=k, v=v, fn=fn: fn(k, v) for k, v in caches])
        row[name] = us
        row[name + "_gbs"] = nbytes / (us * 1e-6) / 1e9
    row["peak_gbs"] = peak / 1e9
    del caches
    torch.cuda.empty_cache()
    return row


def run_attention(
    archs: list[str], positions: list[int], shapes: list[tuple[int, int, int]] = ()
) -> list[dict]:
    peak = start_gpu_bench("attention")
    print("decode attention, one fp16 query token against the KV cache up to the position;")
    print("GB/s of keys and values read; % of the read rate; the same kernel on the tensor")
    print("cores (tc); PyTorch SDPA on the same cache")
    print(f"{'model':<15} {'heads':<10} {'position':>8} {'MB':>7} {'ours us':>9} {'GB/s':>6} "
          f"{'%':>4} {'tc us':>8} {'SDPA us':>9} {'GB/s':>6} {'SDPA/ours':>9} "
          f"{'faster':>7}")  # fmt: skip
    rows = []
    todo = [(a, heads(a)) for a in archs] + [("/".join(map(str, s)), s) for s in shapes]
    for label, shape in todo:
        for p in positions:
            r = bench_one(label, shape, p, peak)
            tc = r.get("tc")
            faster = "-" if tc is None else "tc" if tc < r["ours"] else "cuda"
            print(
                f"{label:<15} {r['heads']:<10} {p:>8} {r['mb']:>7.1f} {r['ours']:>9.1f} "
                f"{r['ours_gbs']:>6.0f} {100 * r['ours_gbs'] / r['peak_gbs']:>4.0f} "
                f"{'-' if tc is None else f'{tc:.1f}':>8} "
                f"{r['sdpa']:>9.1f} {r['sdpa_gbs']:>6.0f} {r['sdpa'] / r['ours']:>8.2f}x "
                f"{faster:>7}"
            )
            if r["diff"] > 1e-2:
                print(f"  warning: outputs differ by up to {r['diff']:.3g} from SDPA's")
            rows.append(r)
    return rows
