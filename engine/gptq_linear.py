"""GPTQLinear: a GPTQ-quantized linear layer holding the checkpoint's tensors
(engine/formats/gptq.py has the format and the math)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .formats import gptq
from .formats.gptq import GPTQSpec
from .layers import cpu_linear, cpu_weight_dtype
from .memory import DEQUANT_WORKSPACE

# The GPTQ GEMV kernel up to this many tokens (one launch's token tile); above, column slices of
# the dense weight written by `vptq::gptq_dequant`, then cuBLAS. H200, `bench gptq --bits 4`
# (KERNELS.md session 25): an 8B block takes 205 us at 8 tokens with the GEMV, where writing its
# seven dense weights alone takes 318 us.
GEMV_MAX_TOKENS = 8


class GPTQLinear(nn.Module):
    """State-dict names match GPTQ checkpoints (``qweight``, ``qzeros``, ``scales``, ``g_idx``,
    ``bias``), so the loader fills it like any other module; ``g_idx`` may be absent (old
    checkpoints), and then each row's group is row // group_size."""

    def __init__(self, spec: GPTQSpec, dtype: torch.dtype = torch.float16, name: str = ""):
        super().__init__()
        self.spec, self.name = spec, name
        kinds = {"int32": torch.int32, "int64": torch.int64}
        for attr, (shape, kind) in spec.tensor_shapes().items():
            self.register_buffer(attr, torch.empty(shape, dtype=kinds.get(kind, dtype)))
        self.register_buffer("zeros", None, persistent=False)  # true zero points, int32 [G, N]
        self.register_buffer("dense_cache", None, persistent=False)  # CPU path: W^T [N, K]
        # sort_rows: qweight's row k holds input row perm[k] (int32 [K]), or None: as stored
        self.register_buffer("perm", None, persistent=False)
        self.contiguous_groups = False  # g_idx[k] == k // group_size (the faster kernel)

    in_features = property(lambda self: self.spec.in_features)
    out_features = property(lambda self: self.spec.out_features)

    def missing_tensor(self, attr: str) -> torch.Tensor | None:
        """What the loader uses for a tensor the checkpoint lacks, or None (an error)."""
        return gptq.trivial_g_idx(self.spec) if attr == "g_idx" else None

    def post_load(self) -> None:
        """Once after loading: the zero points in v2 terms, g_idx checked and kept as int32
        (what the kernels take; checkpoints hold int32 or int64), and on a GPU the rows sorted
        by group (act-order layers), as the faster kernel needs them."""
        gptq.check_g_idx(self.g_idx, self.spec, self.name)
        self.zeros = gptq.zero_points(self.qzeros, self.spec, self.name)
        self.qzeros = None  # read into zeros: not kept twice
        self.g_idx = self.g_idx.to(torch.int32)
        self.arrange()

    def arrange(self) -> None:
        """On a GPU, rows sorted by group; then whether the groups are contiguous."""
        if self.qweight.is_cuda:
            self.sort_rows()
        self.contiguous_groups = self.g_idx_is_trivial()

    def g_idx_is_trivial(self) -> bool:
        return torch.equal(self.g_idx, gptq.trivial_g_idx(self.spec).to(self.g_idx))

    def sort_rows(self) -> None:
        """Rows of qweight (and g_idx) sorted by group, ``perm`` remembering each row's input:
        x[perm] @ W_sorted == x @ W. Act-order layers then have contiguous groups, whose scale
        the kernel applies once a group (gptq-format.md §3.4)."""
        if self.perm is not None or self.g_idx_is_trivial():
            return
        order = torch.argsort(self.g_idx, stable=True)
        self.qweight = gptq.permute_rows(self.qweight, order, self.spec.bits)
        self.g_idx = self.g_idx[order]
        self.perm = order.to(torch.int32)

    def weight_t(self, dtype: torch.dtype, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """Columns n0:n1 of the dense weight as nn.Linear holds it, [n1 - n0, K] (a transposed
        view where the kernel wrote it)."""
        n1 = self.out_features if n1 is None else n1
        if self.qweight.is_cuda and dtype == self.scales.dtype and self.kernel_layer_ok():
            w = torch.ops.vptq.gptq_dequant(
                self.qweight, self.zeros, self.scales, self.g_idx, self.spec.bits, n0, n1,
                self.perm,
            )  # fmt: skip  # csrc/vptq_gptq.cu: [K, n1 - n0], rows in the checkpoint's order
            return w.T
        cols = slice(n0, n1)
        w = gptq.dequant(
            self.qweight[:, cols], self.zeros[:, cols], self.scales[:, cols], self.g_idx,
            self.spec, torch.float32 if dtype == torch.float32 else dtype,
        )  # fmt: skip
        if self.perm is not None:  # sorted rows back to their inputs
            w = torch.empty_like(w).index_copy_(0, self.perm.long(), w)
        return w.T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, "bias", None)
        bias = None if bias is None else bias.to(x.dtype)
        if x.is_cuda:  # the GPU keeps only the packed weights
            tokens = x.numel() // self.in_features
            if tokens <= GEMV_MAX_TOKENS and self.kernel_ok(x):  # csrc/vptq_gptq.cu
                y = torch.ops.vptq.gptq_gemv(
                    x.reshape(tokens, self.in_features).contiguous(), self.qweight, self.zeros,
                    self.scales, self.g_idx, bias, self.spec.bits, self.perm,
                    min(self.spec.group_size, self.in_features) if self.contiguous_groups else 0,
                )  # fmt: skip
                return y.view(*x.shape[:-1], self.out_features)
            return self.linear_in_slices(x, bias, self.columns_per_slice(self.kernel_ok(x)))
        return cpu_linear(x, self.cpu_weight(x.dtype), bias)

    def cpu_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The CPU dequantizes once, as VQLinear does: the dense weight's memory, not per token
        (float16 under float32 activations by default, engine/layers.py cpu_linear)."""
        want = cpu_weight_dtype(dtype)
        if self.dense_cache is None or self.dense_cache.dtype != want:
            self.dense_cache = self.weight_t(want)
        return self.dense_cache

    def share_cpu_weight(self, view: torch.Tensor) -> None:
        self.dense_cache = view

    def kernel_ok(self, x: torch.Tensor) -> bool:
        return self.scales.dtype == x.dtype and self.kernel_layer_ok()

    def kernel_layer_ok(self) -> bool:
        return (
            ops.kernels_ready()
            and self.scales.dtype in (torch.float16, torch.bfloat16)
            and self.in_features % 32 == 0
            and self.in_features // 32 <= 65535
        )

    def linear_in_slices(self, x: torch.Tensor, bias: torch.Tensor | None, step: int):
        """x W^T + bias, unpacking ``step`` output columns of W at a time."""
        if step >= self.out_features:
            return F.linear(x, self.weight_t(x.dtype), bias)
        parts = []
        for n0 in range(0, self.out_features, step):
            n1 = min(n0 + step, self.out_features)
            b = None if bias is None else bias[n0:n1]
            parts.append(F.linear(x, self.weight_t(x.dtype, n0, n1), b))
        return torch.cat(parts, -1)

    def columns_per_slice(self, kernel: bool = False) -> int:
        """Output columns unpacked at once within memory.DEQUANT_WORKSPACE: the kernel's slice
        is the weight alone (2 bytes a weight; whole multiples of 4 columns keep its 16-byte
        loads), PyTorch's has temporaries (int32 codes, the weight and its transpose, about 12
        bytes a weight)."""
        if kernel:
            return max(4, DEQUANT_WORKSPACE // (2 * self.in_features) // 4 * 4)
        return max(1, DEQUANT_WORKSPACE // (12 * self.in_features))

    def extra_repr(self) -> str:
        s = self.spec
        return f"K={s.in_features}, N={s.out_features}, {gptq.describe(s)}"
