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
from .ops.reference import as_uint16

log = logging.getLogger(__name__)
_INT = {"int32": torch.int32, "int16": torch.int16, "int64": torch.int64}


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        bias = getattr(self, "bias", None)
        if x.is_cuda:
            return ops.vptq_linear(x, bias, self.tensors(), self.spec, self.sliced)
        # The CPU runs the reference path: dequantize once, not per token. It costs the dense
        # weight's memory, which is what a CPU-sized model can afford.
        if self.dense_cache is None or self.dense_cache.dtype != x.dtype:
            self.dense_cache = ops.vptq_dequant(self.tensors(), self.spec, x.dtype)
        return F.linear(x, self.dense_cache, None if bias is None else bias.to(x.dtype))

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
    props = torch.cuda.get_device_properties(layers[0].indices.device)
    built = arrange(model, layers, budget, props.multi_processor_count,
                    props.shared_memory_per_block_optin)  # fmt: skip
    return built, len(layers)


def arrange(model: nn.Module, layers: list, budget: int, num_sms: int, smem_optin: int) -> int:
    """The layouts (sliced.choose picks the layers) and the shared launches; returns how many
    layouts were built. Running out of memory while building (the scratch estimate is an
    estimate) keeps the layouts built so far and leaves the rest on the plain path."""
    from .ops import sliced

    built = 0
    for i in sliced.choose([m.spec for m in layers], budget):
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
            if linears and all(layouts) and sliced.worth_sharing(layouts, num_sms):
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

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._launch(
            x, [getattr(m, "bias", None) for m in self.linears], self.plan.layouts,
            [m.tensors() for m in self.linears], self.plan.metas, self.plan.counters,
        )  # fmt: skip


def sliced_summary(model: nn.Module) -> tuple[int, int]:
    """(layers with the sliced layout, bytes of those layouts)."""
    layouts = [m.sliced for m in model.modules() if isinstance(m, VQLinear) and m.sliced]
    return len(layouts), sum(t.nbytes for t in layouts)
