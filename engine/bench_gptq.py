"""`python -m engine bench gptq`: the GPTQ GEMV kernel (csrc/vptq_gptq.cu) against cuBLAS fp16
and against the path above its token limit (PyTorch unpacking, then cuBLAS), on Llama-3.1 layer
shapes, timed in the same run as CUDA-graph replays over weight copies larger than L2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .bench import ROTATE_BYTES, projections, read_bandwidth, time_us
from .formats.gptq import GPTQSpec
from .gptq_linear import GPTQLinear


def random_layer(K: int, N: int, bits: int, group: int, act_order: bool) -> GPTQLinear:
    spec = GPTQSpec(K, N, bits, K if group == -1 else group, sym=False, v2=True)
    layer = GPTQLinear(spec, torch.float16, "bench")
    g = torch.Generator(device="cuda").manual_seed(K * 7 + N)
    words = (K * bits // 32, N)  # random words are random codes of any width
    layer.qweight = torch.randint(-(2**31), 2**31, words, device="cuda", generator=g).int()
    layer.scales = torch.rand(spec.groups, N, device="cuda", generator=g).half() * 0.01
    layer.zeros = torch.randint(0, 2**bits, (spec.groups, N), device="cuda", generator=g).int()
    rows = torch.arange(K, device="cuda") // spec.group_size
    if act_order:
        rows = rows[torch.randperm(K, device="cuda", generator=g)]
    layer.g_idx, layer.g_idx32 = rows, rows.int()
    return layer


def weight_bytes(layer: GPTQLinear) -> int:
    """What the kernel reads of a layer: packed codes, zero points (int32), scales, g_idx."""
    ts = (layer.qweight, layer.zeros, layer.scales, layer.g_idx32)
    return sum(t.numel() * t.element_size() for t in ts)


def time_three(layers: list[GPTQLinear], dense: list[torch.Tensor], t: int):
    """us per call of cuBLAS fp16, the kernel, and unpacking in slices then cuBLAS."""
    K, step = layers[0].in_features, layers[0].columns_per_slice()
    x = torch.randn(t, K, dtype=torch.float16, device="cuda")
    fp16 = time_us([lambda w=w: F.linear(x, w) for w in dense])
    kernel = time_us([lambda L=L: L(x) for L in layers])
    unpack = time_us([lambda L=L: L.linear_in_slices(x, None, step) for L in layers])
    return fp16, kernel, unpack


def run_gptq(archs: list[str], bits: int, group: int, act_order: bool, tokens: tuple) -> None:
    kind, why = ops.prepare("cuda")
    if kind != "cuda":
        raise ValueError(f"kernels unavailable: {why}")
    peak = read_bandwidth()
    print(f"device read bandwidth (sum over 1 GiB): {peak / 1e9:.0f} GB/s")
    print(f"GPTQ {bits}-bit, group {group}, act-order {'on' if act_order else 'off'}")
    for arch in archs:
        print(f"\n{arch}: us per call; GB/s of the kernel's bytes (% of the read bandwidth)")
        print(f"{'proj':>6} {'T':>3} {'fp16':>8} {'kernel':>8} {'unpack':>9} {'kernel GB/s':>14}"
              f" {'vs fp16':>8}")  # fmt: skip
        sums: dict[int, list[float]] = {t: [0.0, 0.0] for t in tokens}
        for name, K, N in projections(arch):
            proto = random_layer(K, N, bits, group, act_order)
            copies = max(1, min(16, -(-ROTATE_BYTES // weight_bytes(proto))))
            layers = [proto] + [
                random_layer(K, N, bits, group, act_order) for _ in range(copies - 1)
            ]
            dense = [torch.randn(N, K, dtype=torch.float16, device="cuda") * 0.02
                     for _ in range(max(1, min(16, -(-ROTATE_BYTES // (2 * N * K)))))]  # fmt: skip
            for t in tokens:
                fp16, kernel, unpack = time_three(layers, dense, t)
                gbs = weight_bytes(proto) / (kernel * 1e-6) / 1e9
                sums[t][0] += fp16
                sums[t][1] += kernel
                pct = 100 * gbs * 1e9 / peak
                print(f"{name:>6} {t:>3} {fp16:8.1f} {kernel:8.1f} {unpack:9.1f} "
                      f"{gbs:8.0f} ({pct:3.0f}%) {fp16 / kernel:7.2f}x")  # fmt: skip
        for t, (fp16, kernel) in sums.items():
            print(f"{arch} GPTQ {bits}-bit T={t}: block {kernel:.0f} us against {fp16:.0f} us "
                  f"for cuBLAS fp16, {fp16 / kernel:.2f}x")  # fmt: skip
