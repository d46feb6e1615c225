"""Custom ops, one wrapper each. Today every op runs its pure-PyTorch twin in reference.py."""

from __future__ import annotations

import torch

from ..formats.vptq import VQLayerSpec
from . import reference


def kernel_status(device: torch.device | str) -> tuple[str, str]:
    """("cuda" | "reference", why): which implementation the ops use on ``device``."""
    if torch.device(device).type != "cuda":
        return "reference", "running on the CPU: the pure-PyTorch reference path"
    return "reference", "this build has no compiled CUDA kernels; using the reference path"


def vptq_linear(x: torch.Tensor, bias: torch.Tensor | None, *tensors, spec: VQLayerSpec):
    """y = x W^T + bias for a VPTQ layer; x: [..., K] -> [..., N]."""
    return reference.vptq_linear(x, bias, *tensors, spec=spec)
