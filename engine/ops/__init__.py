"""Custom ops, one wrapper each: compiled CUDA kernels (csrc/, via cuda.py) where they are
loaded, their pure-PyTorch twins in reference.py everywhere else.

Every op takes the layer's tensors in one order:
(indices, centroids, res_centroids, outlier_indices, outlier_centroids, perm, inv_perm,
 weight_scale, weight_bias), with perm/inv_perm int32 and absent tensors None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats.vptq import VQLayerSpec
from . import reference

_cuda_ready = False


def prepare(
    device: torch.device | str,
    progress: Callable[[float, str], None] | None = None,
    use_kernels: bool = True,
) -> tuple[str, str]:
    """Load the kernels for ``device`` if it is a GPU; returns ("cuda" | "reference", why)."""
    global _cuda_ready
    if torch.device(device).type != "cuda":
        return "reference", "the model runs on the CPU"
    if not use_kernels:
        _cuda_ready = False
        return "reference", "CUDA kernels turned off (VPTQ_CHAT_KERNELS=reference)"
    from . import cuda

    ok, why = cuda.load(progress)
    _cuda_ready = ok
    return ("cuda", why) if ok else ("reference", why)


def availability() -> tuple[str, str]:
    """Before any load, cheaply: ("cuda" | "reference", why), without building anything."""
    if not torch.cuda.is_available():
        return "reference", "no CUDA GPU is visible, so models run on the CPU"
    from . import cuda

    why = cuda.why_not()
    if why is not None:
        return "reference", why
    built = any(cuda.build_dir().glob("*.so"))
    return "cuda", "CUDA kernels ready" if built else "CUDA kernels build on the first load"


def _on_kernels(x: torch.Tensor, spec: VQLayerSpec) -> bool:
    return (
        _cuda_ready
        and x.is_cuda
        and spec.vector_len <= 16
        and spec.packed
        and x.dtype in (torch.float16, torch.bfloat16)
    )


def vptq_dequant(tensors: tuple, spec: VQLayerSpec, dtype: torch.dtype) -> torch.Tensor:
    """Dense W: [N, K]."""
    if _on_kernels(tensors[1], spec) and tensors[1].dtype == dtype:
        from . import cuda

        return cuda.dequant(tensors, spec)
    return reference.vptq_dequant(*tensors, spec=spec, dtype=dtype)


def kernels_ready() -> bool:
    return _cuda_ready


def vptq_linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    tensors: tuple,
    spec: VQLayerSpec,
    sliced=None,
    decode_path: str | None = None,
    partial: bool = False,
):
    """y = x W^T + bias for a VPTQ layer; x: [..., K] -> [..., N]. ``sliced``: the layer's
    engine.ops.sliced layout, where it has one; ``decode_path``: see cuda.linear;
    ``partial``: the sliced GEMV may leave y as a decode.Partial."""
    if _on_kernels(x, spec) and tensors[1].dtype == x.dtype:
        from . import cuda

        return cuda.linear(x, bias, tensors, spec, sliced, decode_path, partial)
    return reference.vptq_linear(x, bias, *tensors, spec=spec)
