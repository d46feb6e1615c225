"""`python -m engine bench gptq`: GPTQ layers (csrc/vptq_gptq.cu) against cuBLAS fp16 on
Llama-3.1 layer shapes, timed in the same run as CUDA-graph replays over weight copies larger
than L2: the GEMV kernel up to 8 tokens, the dense weight's slices then cuBLAS above (prefill),
and the dequant kernel alone against the device's read bandwidth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bench import ROTATE_BYTES, projections, start_gpu_bench, time_us
from .formats.gptq import GPTQSpec
from .gptq_linear import GEMV_MAX_TOKENS, GPTQLinear


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
    layer.g_idx = rows.int()
    layer.arrange()  # as a load does: act-order rows sorted by group
    return layer


def weight_bytes(layer: GPTQLinear) -> int:
    """What the kernel reads of a layer: packed codes, zero points (int32), scales, g_idx."""
    ts = (layer.qweight, layer.zeros, layer.scales, layer.g_idx)
    return sum(t.numel() * t.element_size() for t in ts)


def time_pair(layers: list[GPTQLinear], dense: list[torch.Tensor], t: int) -> tuple[float, float]:
    """us per call of cuBLAS fp16 and of the GPTQ layer, at t tokens."""
    x = torch.randn(t, layers[0].in_features, dtype=torch.float16, device="cuda")
    fp16 = time_us([lambda w=w: F.linear(x, w) for w in dense])
    return fp16, time_us([lambda L=L: L(x) for L in layers])


def run_gptq(archs: list[str], bits: int, group: int, act_order: bool, tokens: tuple) -> None:
    peak = start_gpu_bench("gptq")
    print(f"GPTQ {bits}-bit, group {group}, act-order {'on' if act_order else 'off'}; "
          f"the GEMV up to {GEMV_MAX_TOKENS} tokens, dequant + cuBLAS above")  # fmt: skip
    for arch in archs:
        print(f"\n{arch}: us per call; GB/s (% of the read bandwidth): of the packed layer for "
              "the GEMV, of the weight written and the packed layer read for dequant")  # fmt: skip
        print(f"{'proj':>6} {'T':>4} {'fp16':>8} {'gptq':>8} {'vs fp16':>8} {'GB/s':>12} "
              f"{'dequant':>8} {'GB/s':>12}")  # fmt: skip
        sums: dict[int, list[float]] = {t: [0.0, 0.0] for t in tokens}
        for name, K, N in projections(arch):
            proto = random_layer(K, N, bits, group, act_order)
            copies = max(1, min(16, -(-ROTATE_BYTES // weight_bytes(proto))))
            layers = [proto] + [
                random_layer(K, N, bits, group, act_order) for _ in range(copies - 1)
            ]
            dense = [torch.randn(N, K, dtype=torch.float16, device="cuda") * 0.02
                     for _ in range(max(1, min(16, -(-ROTATE_BYTES // (2 * N * K)))))]  # fmt: skip
            dq = time_us([lambda L=L: L.weight_t(torch.float16) for L in layers])
            dq_bytes = weight_bytes(proto) + 2 * N * K
            dq_gbs = f"{dq_bytes / dq / 1e3:6.0f} ({100 * dq_bytes / dq / 1e-6 / peak:3.0f}%)"
            for t in tokens:
                fp16, layer = time_pair(layers, dense, t)
                sums[t][0] += fp16
                sums[t][1] += layer
                gbs = weight_bytes(proto) / layer / 1e3  # bytes / us / 1e3 = GB/s
                read = f"{gbs:6.0f} ({100 * gbs * 1e9 / peak:3.0f}%)"
                read = read if t <= GEMV_MAX_TOKENS else ""  # prefill: not bound by the bytes
                print(f"{name:>6} {t:>4} {fp16:8.1f} {layer:8.1f} {fp16 / layer:7.2f}x "
                      f"{read:>12} {dq:8.1f} {dq_gbs:>12}")  # fmt: skip
        for t, (fp16, layer) in sums.items():
            how = "GEMV" if t <= GEMV_MAX_TOKENS else "dequant + cuBLAS"
            print(f"{arch} GPTQ {bits}-bit T={t} ({how}): block {layer:.0f} us against {fp16:.0f}"
                  f" us for cuBLAS fp16, {fp16 / layer:.2f}x")  # fmt: skip
