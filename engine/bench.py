"""``python -m engine bench kernels``: the VPTQ kernels against cuBLAS fp16 on real layer shapes.

Random layers of the real Llama-3.1 shapes are built on the GPU and rotated across enough copies
that each call reads its weights from DRAM, as in a real decode step. Times are CUDA-event
medians; the baseline (cuBLAS fp16 F.linear) and the device's read bandwidth are measured in the
same run. Bytes are the fewest a call must move: each input read once, each output written once.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .formats.vptq import VQLayerSpec
from .memory import Shape
from .memory import projections as memory_projections
from .ops import cuda, sliced

MODELS = {  # the shape fields of each benchmarked model's config.json
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_hidden_layers=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                          num_hidden_layers=80, num_key_value_heads=8, vocab_size=128256),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                       num_hidden_layers=28, num_key_value_heads=4, vocab_size=152064,
                       architectures=["Qwen2ForCausalLM"]),
    "qwen2.5-72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64,
                        num_hidden_layers=80, num_key_value_heads=8, vocab_size=152064,
                        architectures=["Qwen2ForCausalLM"]),
    "mistral-large": dict(hidden_size=12288, intermediate_size=28672, num_attention_heads=96,
                          num_hidden_layers=88, num_key_value_heads=8, head_dim=128,
                          vocab_size=32768, architectures=["MistralForCausalLM"]),
}  # fmt: skip
ARCHS = ("llama-3.1-8b", "llama-3.1-70b")  # bench kernels' layer shapes
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # memory.projections' order
SCHEMES = {  # v, k, kr
    "v8-k65536-0": (8, 65536, 0),
    "v8-k65536-256": (8, 65536, 256),
    "v8-k65536-4096": (8, 65536, 4096),
    "v16-k65536-65536": (16, 65536, 65536),
    "v8-k65536-65536": (8, 65536, 65536),
    "v12-k65536-4096": (12, 65536, 4096),
}
TOKENS = (1, 4, 8, 16, 512)
ROTATE_BYTES = 256 << 20  # > 4x the H100's 50 MB L2


def model_config(arch: str) -> dict:
    """The config.json of a benchmarked model (bench e2e builds it with random weights)."""
    base = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "torch_dtype": "float16"}  # fmt: skip
    return base | MODELS[arch]


def projections(arch: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of each projection of one of the model's decoder layers."""
    pairs = memory_projections(Shape.from_config(model_config(arch)))
    return [(name, k, n) for name, (k, n) in zip(PROJECTIONS, pairs, strict=True)]


@dataclass
class Layer:
    spec: VQLayerSpec
    tensors: tuple
    sliced: sliced.SlicedLayout | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors if t is not None)

    @property
    def gemv_bytes(self) -> int:
        """What one GEMV call must read of the weights: the sliced layout instead of the packed
        indices where the layer has one (its codebooks once)."""
        if self.sliced is None:
            return self.nbytes
        return self.nbytes - self.tensors[0].numel() * 4 + self.sliced.nbytes


def scheme_spec(scheme: str, k_in: int, n_out: int) -> VQLayerSpec:
    """A k_in -> n_out layer quantized by one of SCHEMES, one group (as the community models)."""
    v, k, kr = SCHEMES[scheme]
    return VQLayerSpec(
        in_features=k_in,
        out_features=n_out,
        vector_len=v,
        num_centroids=k,
        num_res_centroids=kr,
        group_size=k_in,
    )


def random_layer(k_in: int, n_out: int, scheme: str, dtype=torch.float16) -> Layer:
    spec = scheme_spec(scheme, k_in, n_out)
    v, k, kr = spec.vector_len, spec.num_centroids, spec.num_res_centroids
    dev = "cuda"
    words = torch.randint(
        -(2**31), 2**31 - 1, (1, spec.num_indices, spec.words), dtype=torch.int32, device=dev
    )  # every B-bit field is a valid index
    books = torch.rand(1, k * v, dtype=dtype, device=dev)
    res = torch.rand(1, kr * v, dtype=dtype, device=dev) * 0.1 if kr else None
    perm = torch.randperm(k_in, device=dev)
    scale = torch.rand(k_in, dtype=dtype, device=dev) + 0.5
    wbias = torch.rand(k_in, dtype=dtype, device=dev) - 0.5
    tensors = (words, books, res, None, None, perm.int(), torch.argsort(perm).int(), scale, wbias)
    layer = Layer(spec, tensors)
    gpu = sliced.gpu_of(dev)
    if sliced.eligible(spec, gpu):
        layer.sliced = sliced.build(tensors, spec, gpu.num_sms, gpu.smem_optin)
    return layer


def time_us(fns: list[Callable[[], object]], reps: int = 7, calls: int = 20) -> float:
    """Median microseconds per call over replays of a CUDA graph of ``calls`` calls, cycling
    over ``fns`` (one per weight copy). A graph is how the decode step runs, and it keeps the
    host's launch overhead out of the kernel times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return statistics.median(samples)


def start_gpu_bench(what: str) -> float:
    """The device's read rate (read_bandwidth) once the CUDA kernels are ready, after a line
    naming the device; a message that says what is missing where there is no GPU or no
    kernels."""
    if not torch.cuda.is_available():
        raise ValueError(f"bench {what} needs an NVIDIA GPU with CUDA")
    from .ops import prepare

    kind, why = prepare("cuda")
    if kind != "cuda":
        raise ValueError(f"bench {what} needs the CUDA kernels: {why}")
    peak = read_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"device: {name}, read rate {peak / 1e9:.0f} GB/s (a sum over 1 GiB)")
    return peak


def read_bandwidth() -> float:
    """Device read rate in bytes/s: a sum over 1 GiB. A decode step mostly reads (the weights
    once, the KV cache), and a copy, which also writes, runs slower: the H200 measured 2.7 TB/s
    copying (read plus written bytes) while cuBLAS's fp16 GEMV read 3.8 TB/s, so a copy-based
    peak put fp16 decode at 110% of its roofline."""
    a = torch.ones(1 << 28, dtype=torch.float32, device="cuda")
    us = time_us([lambda: a.sum()], reps=5, calls=5)
    return a.numel() * a.element_size() / (us * 1e-6)


def bench_projection(
    name: str, k_in: int, n_out: int, scheme: str, peak: float, tokens=TOKENS
) -> list[dict]:
    proto = random_layer(k_in, n_out, scheme)
    copies = max(1, min(16, -(-ROTATE_BYTES // (proto.nbytes + proto.gemv_bytes))))
    layers = [proto] + [random_layer(k_in, n_out, scheme) for _ in range(copies - 1)]
    dense = [
        torch.randn(n_out, k_in, dtype=torch.float16, device="cuda") * 0.02
        for _ in range(max(1, min(16, -(-ROTATE_BYTES // (2 * n_out * k_in)))))
    ]
    rows = []
    for t in tokens:
        x = torch.randn(t, k_in, dtype=torch.float16, device="cuda")
        io = 2 * t * (k_in + n_out)
        row = {"proj": name, "K": k_in, "N": n_out, "scheme": scheme, "tokens": t}
        row["cublas_us"] = time_us([lambda w=w, x=x: F.linear(x, w) for w in dense])
        row["cublas_bytes"] = 2 * n_out * k_in + io
        q = [lambda L=L, x=x: F.linear(x, cuda.dequant(L.tensors, L.spec)) for L in layers]
        row["dequant_gemm_us"] = time_us(q)
        row["dequant_gemm_bytes"] = proto.nbytes + 4 * n_out * k_in + io
        if t <= cuda.fused_tokens(proto.spec):
            g = [lambda L=L, x=x: cuda.linear(x, None, L.tensors, L.spec) for L in layers]
            row["plain_gemv_us"] = time_us(g)  # packed indices, codewords through L2
            row["plain_gemv_bytes"] = proto.nbytes + io
        if proto.sliced is not None and t <= proto.sliced.max_tokens:
            g = [lambda L=L, x=x: cuda.gemv_sliced(x, None, L.sliced, L.tensors) for L in layers]
            row["gemv_us"] = time_us(g)
            row["gemv_bytes"] = proto.gemv_bytes + io
        elif "plain_gemv_us" in row:
            row["gemv_us"] = row["plain_gemv_us"]
            row["gemv_bytes"] = proto.nbytes + io
        key = engine_path(row, proto.spec, proto.sliced is not None)
        best = row[f"{key}_us"]
        row["best_us"] = best
        row["speedup_vs_fp16"] = row["cublas_us"] / best
        row["best_path"] = key
        row["best_gbs"] = row[f"{key}_bytes"] / (best * 1e-6) / 1e9
        row["best_pct_peak"] = 100 * row[f"{key}_bytes"] / (best * 1e-6) / peak
        rows.append(row)
    return rows


def engine_path(row: dict, spec: VQLayerSpec, has_layout: bool) -> str:
    """Which measured path of a bench_projection row ("gemv", "plain_gemv" or "dequant_gemm")
    the engine takes: for one token on a layer with the sliced layout, what load-time tuning
    would choose (engine/layers.py fastest, decode_candidates); otherwise the faster of the
    GEMV (sliced where built, else plain) and dequant + GEMM."""
    from .layers import decode_candidates, fastest

    if has_layout and row["tokens"] == 1 and "gemv_us" in row:
        keys = {"sliced": "gemv", "gemv": "plain_gemv", "dequant": "dequant_gemm"}
        times = {p: row[f"{keys[p]}_us"] for p in decode_candidates(spec)
                 if f"{keys[p]}_us" in row}  # fmt: skip
        return keys[fastest(times)]
    if row.get("gemv_us", float("inf")) <= row["dequant_gemm_us"]:
        return "gemv"
    return "dequant_gemm"


SHARED_INPUT = (("q", "k", "v"), ("gate", "up"))  # projections the engine launches together


def bench_shared(arch: str, scheme: str, tokens=TOKENS) -> list[dict]:
    """The sliced GEMV with q, k, v and gate, up each in one launch (engine/layers.py
    SharedInputGroup), as the engine decodes; rows like bench_projection's."""
    shapes = {name: (k_in, n_out) for name, k_in, n_out in projections(arch)}
    gpu = sliced.gpu_of(0)
    rows = []
    for names in SHARED_INPUT:
        proto = [random_layer(*shapes[n], scheme) for n in names]
        if any(layer.sliced is None for layer in proto):
            return []
        layouts = [layer.sliced for layer in proto]
        sms, optin = gpu.num_sms, gpu.smem_optin
        if not sliced.worth_sharing(layouts, sms, optin):
            continue  # the engine launches these one by one (sliced.MAX_SHARED_TAIL)
        per_copy = sum(layer.nbytes + layer.gemv_bytes for layer in proto)
        copies = max(1, min(8, -(-ROTATE_BYTES // per_copy)))
        sets = [proto] + [
            [random_layer(*shapes[n], scheme) for n in names] for _ in range(copies - 1)
        ]
        plans = [sliced.group([layer.sliced for layer in s], sms, optin) for s in sets]
        for t in tokens:
            if t > plans[0].max_tokens:  # at most sliced.GROUP_TOKENS
                continue
            x = torch.randn(t, shapes[names[0]][0], dtype=torch.float16, device="cuda")
            fns = [
                lambda s=s, p=p, x=x: cuda.gemv_sliced_group(
                    x, [None] * len(s), p.layouts, [layer.tensors for layer in s], p.metas,
                    p.counters,
                )
                for s, p in zip(sets, plans, strict=True)
            ]  # fmt: skip
            rows.append({"proj": "+".join(names), "scheme": scheme, "tokens": t,
                         "shared_us": time_us(fns)})  # fmt: skip
    return rows


def run_kernels(archs: list[str], schemes: list[str], out: Path | None, tokens=TOKENS) -> None:
    ok, why = cuda.load()
    if not ok:
        raise SystemExit(f"error: kernels unavailable: {why}")
    peak = read_bandwidth()
    name = torch.cuda.get_device_name()
    print(f"device: {name}; measured read bandwidth {peak / 1e9:.0f} GB/s; {why}")
    rows, shared = [], []
    for arch in archs:
        for scheme in schemes:
            for proj, k_in, n_out in projections(arch):
                for r in bench_projection(proj, k_in, n_out, scheme, peak, tokens):
                    rows.append(r | {"arch": arch})
            _print_scheme(
                arch, scheme, [r for r in rows if r["arch"] == arch and r["scheme"] == scheme]
            )
            shared += [r | {"arch": arch} for r in bench_shared(arch, scheme, tokens)]
    _print_summary(rows, tokens)
    _print_shared(rows, shared)
    if out:
        out.write_text(
            json.dumps(
                {"device": name, "read_bandwidth": peak, "rows": rows, "shared": shared}, indent=1
            )
        )


def _print_scheme(arch: str, scheme: str, rows: list[dict]) -> None:
    print(f"\n{arch} {scheme}")
    print(
        f"{'proj':>5} {'T':>4} {'gemv us':>9} {'plain':>9} {'deq+gemm':>9} {'fp16 us':>9} "
        f"{'x fp16':>7} {'GB/s':>6} {'%peak':>6}"
    )
    for r in rows:
        gemv = f"{r['gemv_us']:9.1f}" if "gemv_us" in r else f"{'-':>9}"
        plain = f"{r['plain_gemv_us']:9.1f}" if "plain_gemv_us" in r else f"{'-':>9}"
        print(
            f"{r['proj']:>5} {r['tokens']:>4} {gemv} {plain} {r['dequant_gemm_us']:9.1f} "
            f"{r['cublas_us']:9.1f} {r['speedup_vs_fp16']:7.2f} {r['best_gbs']:6.0f} "
            f"{r['best_pct_peak']:6.1f}"
        )


def _print_summary(rows: list[dict], tokens=TOKENS) -> None:
    print(
        "\nsum over a block's 7 projections (the path the engine takes for each), "
        "ratio = fp16 time / VPTQ time"
    )
    print(f"{'arch':>14} {'scheme':>17} " + " ".join(f"{'T=' + str(t):>16}" for t in tokens))
    keys = sorted({(r["arch"], r["scheme"]) for r in rows})
    for arch, scheme in keys:
        cells = []
        for t in tokens:
            sel = [r for r in rows if (r["arch"], r["scheme"], r["tokens"]) == (arch, scheme, t)]
            q = sum(r["best_us"] for r in sel)
            f = sum(r["cublas_us"] for r in sel)
            cells.append(f"{q:6.0f}/{f:6.0f} {f / q:4.2f}x")
        print(f"{arch:>14} {scheme:>17} " + " ".join(f"{c:>16}" for c in cells))


def _print_shared(rows: list[dict], shared: list[dict]) -> None:
    """The block sum as the engine decodes it: q+k+v and gate+up each one sliced launch."""
    if not shared:
        return
    print("\nsum over a block with q+k+v and gate+up each in one launch (as the engine decodes)")
    keys = sorted({(r["arch"], r["scheme"], r["tokens"]) for r in shared})
    for arch, scheme, t in keys:
        alone = {
            r["proj"]: r for r in rows if (r["arch"], r["scheme"], r["tokens"]) == (arch, scheme, t)
        }
        group = {
            r["proj"]: r["shared_us"]
            for r in shared
            if (r["arch"], r["scheme"], r["tokens"]) == (arch, scheme, t)
        }
        if not group or any(n not in alone for names in SHARED_INPUT for n in names):
            continue
        for names in SHARED_INPUT:  # not worth sharing: one launch each, as the engine does
            key = "+".join(names)
            if key not in group:
                group[key + " separate"] = sum(alone[n]["best_us"] for n in names)
        q = sum(group.values()) + alone["o"]["best_us"] + alone["down"]["best_us"]
        f = sum(r["cublas_us"] for r in alone.values())
        parts = ", ".join(f"{k} {v:.1f} us" for k, v in group.items())
        print(f"{arch:>14} {scheme:>17} T={t}: {q:6.0f}/{f:6.0f} {f / q:4.2f}x ({parts})")
