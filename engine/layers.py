"""VQLinear: a VPTQ-quantized linear layer holding exactly the checkpoint's tensors."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .formats.packing import pack_indices
from .formats.vptq import FormatError, VQLayerSpec
from .memory import cpu_half_weights
from .ops.reference import as_uint16

log = logging.getLogger(__name__)
_INT = {"int32": torch.int32, "int16": torch.int16, "int64": torch.int64}


def cpu_weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a CPU layer's expanded weight for activations of ``dtype``
    (engine/memory.py cpu_half_weights)."""
    return torch.float16 if dtype == torch.float32 and cpu_half_weights() else dtype


def cpu_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + bias on the CPU in x's dtype. A float16 W under float32 activations: one token
    multiplies in float16 (PyTorch's matrix-vector product, float32 sums, the GPU's rounding
    of x and y); several take W widened to float32, WIDEN_BYTES of it at a time (float16
    matrix products are a slow path on CPUs without float16 arithmetic: 3.5x float32's at 37
    tokens)."""
    b = None if bias is None else bias.to(x.dtype)
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    if x.numel() == x.shape[-1]:
        return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype)).to(x.dtype)
    rows = max(1, WIDEN_BYTES // (x.element_size() * w.shape[1]))
    parts = [
        F.linear(x, w[i : i + rows].to(x.dtype), None if b is None else b[i : i + rows])
        for i in range(0, w.shape[0], rows)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


# Rows of a float16 weight widened at a time for a prompt (cpu_linear): a piece stays in the
# CPU's caches for its product. The whole weight widened at once doubled the demo's time to the
# first token (231 against 117 ms for 39 tokens, two cores); 2 MiB pieces 123-228 ms.
WIDEN_BYTES = 2 << 20


class VQLinear(nn.Module):
    """State-dict names match the VPTQ-community checkpoints (``centroids.weight``, ``indices``,
    ``perm`` ...), so the loader fills it like any other module."""

    def __init__(self, spec: VQLayerSpec, dtype: torch.dtype = torch.float16, name: str = ""):
        super().__init__()
        self.spec = spec
        self.name = name
        for name, (shape, kind) in spec.tensor_shapes().items():
            tensor = torch.empty(shape, dtype=_INT.get(kind, dtype))
            holder: nn.Module = self
            if name.endswith(".weight"):  # centroids.weight etc.: nn.Embedding in upstream
                holder = nn.Module()
                self.add_module(name.removesuffix(".weight"), holder)
                name = "weight"
            holder.register_buffer(name, tensor)
        self.register_buffer("perm_index", None, persistent=False)  # int32 [K]
        self.register_buffer("inv_perm_index", None, persistent=False)  # int32 [K]
        self.register_buffer("dense_cache", None, persistent=False)  # CPU path: W [N, K]
        self.sliced = None  # engine.ops.sliced.SlicedLayout, built on the GPU where it fits
        self.decode_path = None  # one token: the path tune_decode chose where not the sliced

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    def post_load(self) -> None:
        """Once after loading: read perm as uint16 and invert it (never per call), and pack
        legacy unpacked indices so that every layer reaches the kernels in one layout."""
        if self.spec.enable_perm:
            perm = as_uint16(self.perm)
            if sorted(perm.tolist()) != list(range(self.spec.in_features)):
                raise FormatError(f"{self.name}: 'perm' is not a permutation of 0..K-1")
            self.perm_index = perm.to(torch.int32)
            self.inv_perm_index = torch.argsort(perm).to(torch.int32)
        if not self.spec.packed:
            values = as_uint16(self.indices)
            self.indices = pack_indices(values, self.spec.index_bits)
            self.spec = replace(self.spec, packed=True)

    def _book(self, name: str) -> torch.Tensor | None:
        holder = getattr(self, name, None)
        return None if holder is None else holder.weight

    def tensors(self) -> tuple:
        return (
            self.indices,
            self.centroids.weight,
            self._book("res_centroids"),
            getattr(self, "outlier_indices", None),
            self._book("outlier_centroids"),
            self.perm_index,
            self.inv_perm_index,
            getattr(self, "weight_scale", None),
            getattr(self, "weight_bias", None),
        )

    can_defer = True  # engine/model.py apply

    def forward(self, x: torch.Tensor, defer: bool = False):  # x: [..., K] -> [..., N]
        """``defer``: on the sliced GEMV, the output may stay a Partial (engine/ops/decode.py)
        for the fused decode kernel that reads it."""
        bias = getattr(self, "bias", None)
        if x.is_cuda:
            return ops.vptq_linear(
                x, bias, self.tensors(), self.spec, self.sliced, self.decode_path, defer
            )
        return cpu_linear(x, self.cpu_weight(x.dtype), bias)

    def cpu_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the CPU multiplies with for activations of ``dtype``: the reference path
        dequantizes once, not per token. It costs the dense weight's memory, which is what a
        CPU-sized model can afford (a view of its group's, engine/model.py CpuGroup)."""
        want = cpu_weight_dtype(dtype)
        if self.dense_cache is None or self.dense_cache.dtype != want:
            self.dense_cache = ops.vptq_dequant(self.tensors(), self.spec, want)
        return self.dense_cache

    def share_cpu_weight(self, view: torch.Tensor) -> None:
        self.dense_cache = view

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"K={s.in_features}, N={s.out_features}, v={s.vector_len}, k={s.num_centroids}, "
            f"kr={s.num_res_centroids}, G={s.group_num}, P={s.outlier_size}"
        )


def build_sliced_layouts(model: nn.Module, budget: int) -> tuple[int, int]:
    """Give the eligible VQLinear layers of a GPU model the sliced layout (engine/ops/sliced.py)
    while its extra memory stays within ``budget`` bytes, largest layers first, and layers that
    read the same input a shared launch. Returns (layers built, layers eligible). Without the
    CUDA kernels nothing is built."""
    from .ops import sliced

    layers = [m for m in model.modules() if isinstance(m, VQLinear) and sliced.eligible(m.spec)]
    if not layers or not ops.kernels_ready() or not layers[0].indices.is_cuda:
        return 0, len(layers)
    gpu = sliced.gpu_of(layers[0].indices.device)
    layers = [m for m in layers if sliced.eligible(m.spec, gpu)]  # plans that fit this GPU
    arrange(model, layers, budget, gpu.num_sms, gpu.smem_optin)
    tune_or_keep(model)  # may give layouts back
    return sum(1 for m in layers if m.sliced is not None), len(layers)


def tune_or_keep(model: nn.Module) -> dict[str, str]:
    """tune_decode unless VPTQ_TUNE_DECODE=0; a failure to time is logged and changes nothing
    (it is a speed-up, never a reason to fail a load)."""
    if os.environ.get("VPTQ_TUNE_DECODE", "1") == "0":
        return {}
    try:
        chosen = tune_decode(model)
    except RuntimeError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("timing the one-token decode paths failed (%s): layers keep the sliced "
                    "GEMV", why)  # fmt: skip
        return {}
    if chosen:
        log.info("decode path by layer shape: %s", chosen)
    return chosen


TUNE_MARGIN = 0.95  # another path replaces the sliced GEMV only when 5% faster


def tune_decode(model: nn.Module, timer=None) -> dict[str, str]:
    """The path each shape of layer decodes one token on, chosen by timing the candidates on
    this GPU: the sliced GEMV, the plain fused GEMV and dequant + GEMM. The sliced GEMV is not
    always fastest (H200, csrc/KERNELS.md session 7: the plain GEMV for v16 q and o, dequant +
    GEMM for v16 and v12 k and v). Layers in a shared launch keep it (the launch was measured
    as a whole, engine/ops/sliced.py worth_sharing). A layer that takes another path gives its
    sliced layout's memory back. ``timer(layers, path)``: seconds per call (default: CUDA-graph
    replays over all layers of the shape). Returns {shape: path}."""
    shared = {id(m) for b in model.modules() if getattr(b, "fused", None) for m in b.fused.linears}
    by_shape: dict[VQLayerSpec, list[VQLinear]] = {}
    for m in model.modules():
        if isinstance(m, VQLinear) and m.sliced is not None and id(m) not in shared:
            by_shape.setdefault(m.spec, []).append(m)
    timer = timer or _replay_seconds
    chosen = {}
    for spec, linears in by_shape.items():  # each shape is switched whole or not at all
        times = {}
        for path in decode_candidates(spec):
            try:
                times[path] = timer(linears, path)
            except torch.OutOfMemoryError:
                times[path] = float("inf")
        best = fastest(times)
        chosen[f"{spec.in_features}x{spec.out_features} v{spec.vector_len}"] = best
        if best != "sliced":
            for m in linears:
                m.sliced, m.decode_path = None, best
    return chosen


def fastest(times: dict[str, float]) -> str:
    """The path the engine takes given seconds per path ("sliced" among them): another path
    only where it is more than 5% faster than the sliced GEMV."""
    best = min(times, key=times.get)
    return best if times[best] <= TUNE_MARGIN * times["sliced"] else "sliced"


TUNE_DEQUANT_BYTES = 32 << 20  # dequant + GEMM is a candidate only up to this dense weight


def decode_candidates(spec: VQLayerSpec) -> list[str]:
    """What may decode one token of this layer besides its sliced layout. Dequant + GEMM writes
    and reads the dense weight (2 bytes a weight) and won only on small layers; the cap also
    bounds what its buffer takes in the decode graph's memory pool."""
    from .ops import cuda

    out = ["sliced"]
    if cuda.fused_tokens(spec) >= 1:
        out.append("gemv")
    if spec.in_features * spec.out_features * 2 <= TUNE_DEQUANT_BYTES:
        out.append("dequant")
    return out


def _replay_seconds(linears: list[VQLinear], path: str) -> float:
    """Seconds per layer for one token on ``path``: every layer of the list once per replay of
    a CUDA graph (engine/bench.py time_us), so the weights come from memory as in a decode step
    (one layer timed alone would sit in L2)."""
    from .bench import time_us
    from .ops import cuda

    m0 = linears[0]
    x = torch.randn(1, m0.in_features, device=m0.indices.device, dtype=m0.centroids.weight.dtype)

    def call(m: VQLinear) -> torch.Tensor:
        bias = getattr(m, "bias", None)
        if path == "sliced":
            return cuda.gemv_sliced(x, bias, m.sliced, m.tensors())
        return cuda.linear(x, bias, m.tensors(), m.spec, None, path)

    fns = [lambda m=m: call(m) for m in linears]
    return time_us(fns, reps=5, calls=len(fns)) / 1e6


def arrange(model: nn.Module, layers: list, budget: int, num_sms: int, smem_optin: int) -> int:
    """The layouts (sliced.choose picks the layers) and the shared launches; returns how many
    layouts were built. Running out of memory while building (the scratch estimate is an
    estimate) keeps the layouts built so far and leaves the rest on the plain path."""
    from .ops import sliced

    built = 0
    for i in sliced.choose([m.spec for m in layers], budget, sliced.GPU(num_sms, smem_optin)):
        m = layers[i]
        try:
            m.sliced = sliced.build(m.tensors(), m.spec, num_sms, smem_optin)
        except torch.OutOfMemoryError:
            log.warning("out of memory arranging %s for fast decode: %d layers keep the plain "
                        "kernels", m.name or "a layer", len(layers) - built)  # fmt: skip
            break
        built += 1
    if os.environ.get("VPTQ_SLICED_GROUPS", "1") != "0":
        for block in model.modules():
            linears = block.shared_input() if hasattr(block, "shared_input") else ()
            layouts = [getattr(m, "sliced", None) for m in linears]
            if linears and all(layouts) and sliced.worth_sharing(layouts, num_sms, smem_optin):
                plan = sliced.group(layouts, num_sms, smem_optin)
                block.fused = SharedInputGroup(linears, plan)
    return built


class SharedInputGroup:
    """Linear layers that read the same input (q, k, v; gate, up), all with sliced layouts:
    decoded by one sliced GEMV launch whose blocks fill one wave (engine/ops/sliced.py
    SlicedGroup), instead of one launch per layer each paying the slice copies and the final
    sums on its own."""

    def __init__(self, linears: tuple, plan) -> None:
        from .ops import cuda  # built only where the kernels are loaded

        self.linears, self.plan, self._launch = linears, plan, cuda.gemv_sliced_group

    def takes(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.numel() // x.shape[-1] <= self.plan.max_tokens

    def __call__(self, x: torch.Tensor, defer: bool = False) -> list:
        """The layers' outputs; ``defer``: as Partials (engine/ops/decode.py)."""
        return self._launch(
            x, [getattr(m, "bias", None) for m in self.linears], self.plan.layouts,
            [m.tensors() for m in self.linears], self.plan.metas, self.plan.counters, defer,
        )  # fmt: skip


def decode_paths(model: nn.Module) -> dict[str, int]:
    """How many layers decode one token on each path: "sliced", or what tune_decode chose
    instead ("gemv", "dequant"), or "default" (no layout: the plain dispatch)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, VQLinear):
            path = "sliced" if m.sliced is not None else (m.decode_path or "default")
            out[path] = out.get(path, 0) + 1
    return out


def sliced_summary(model: nn.Module) -> tuple[int, int]:
    """(layers with the sliced layout, bytes of those layouts)."""
    layouts = [m.sliced for m in model.modules() if isinstance(m, VQLinear) and m.sliced]
    return len(layouts), sum(t.nbytes for t in layouts)
