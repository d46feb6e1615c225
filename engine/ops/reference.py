"""Pure-PyTorch VPTQ dequant and quantized linear: the CPU path and the oracle for every kernel.

Math (vptq-format.md §3.1): Q[n*v+j, P + c*S + g] = C[c, i1, j] + R[c, i2, j] (rows >= N dropped),
outlier columns to the left, W'[:, perm[y]] = Q[:, y], W[o, x] = W'[o, x] * s[x] + b[x],
y = x W^T + bias. Lookups and sums run in float32; the result is cast once at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.packing import split_main_residual, unpack_indices
from ..formats.vptq import VQLayerSpec


def as_uint16(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit index or perm tensor (int16, or fp16 bit pattern) as int64 in 0..65535."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    if t.dtype == torch.int16:
        return t.to(torch.int64) & 0xFFFF
    return t.to(torch.int64)


def layer_indices(indices: torch.Tensor, spec: VQLayerSpec):
    """(main, residual) indices, each int64 [G, R, S]; residual is None without one."""
    if spec.packed:
        values = unpack_indices(indices, spec.index_bits, spec.group_size)
        return split_main_residual(values, spec.main_bits, spec.res_bits)
    return as_uint16(indices), None


def _lookup(codebook: torch.Tensor, idx: torch.Tensor, v: int) -> torch.Tensor:
    """codebook: [G, k*v], idx: [G, R, S] -> [G, R, S, v] float32."""
    g = codebook.shape[0]
    book = codebook.float().view(g, -1, v)
    return torch.stack([book[c][idx[c]] for c in range(g)])


def vptq_dequant(
    indices: torch.Tensor,
    centroids: torch.Tensor,
    res_centroids: torch.Tensor | None,
    outlier_indices: torch.Tensor | None,
    outlier_centroids: torch.Tensor | None,
    perm: torch.Tensor | None,
    inv_perm: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    weight_bias: torch.Tensor | None,
    spec: VQLayerSpec,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense W: [N, K] in ``dtype`` (default: the codebook dtype).
    inv_perm[x] is the stored column of original column x (perm is its inverse, unused here)."""
    n, v = spec.out_features, spec.vector_len
    i1, i2 = layer_indices(indices, spec)
    vec = _lookup(centroids, i1, v)  # [G, R, S, v]
    if i2 is not None and res_centroids is not None:
        vec = vec + _lookup(res_centroids, i2, v)
    g, r, s, _ = vec.shape
    q = vec.permute(1, 3, 0, 2).reshape(r * v, g * s)[:n]  # [N, G*S]
    if spec.has_outliers and outlier_indices is not None and outlier_centroids is not None:
        v0 = spec.outlier_vector_len
        ov = _lookup(outlier_centroids, as_uint16(outlier_indices), v0)[0]  # [R0, P, v0]
        r0, p, _ = ov.shape
        q = torch.cat([ov.permute(0, 2, 1).reshape(r0 * v0, p)[:n], q], dim=1)  # [N, K]
    if inv_perm is not None:
        q = q[:, inv_perm.long()]  # W'[:, x] = Q[:, inv_perm[x]], i.e. W'[:, perm[y]] = Q[:, y]
    if weight_scale is not None and weight_bias is not None:
        q = q * weight_scale.float() + weight_bias.float()
    return q.to(dtype or centroids.dtype)


def vptq_linear(x: torch.Tensor, bias: torch.Tensor | None, *dequant_args, spec: VQLayerSpec):
    """y = x W^T + bias with W from vptq_dequant; x: [..., K] -> [..., N] in x.dtype."""
    w = vptq_dequant(*dequant_args, spec=spec, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
