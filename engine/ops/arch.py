"""The GPU generation the kernels are built and run for: the device's own, or an older one named
by VPTQ_CUDA_ARCH (say 86), so that a Hopper machine runs the code paths of an RTX 3090 or 4090.

csrc/ has two kinds of code per generation: device code under ``__CUDA_ARCH__ >= 900`` (bulk
copies, clusters, early launch) and host code that asks the device's compute capability before
launching it so (vptq_device.cuh ``compute_major``). With VPTQ_CUDA_ARCH below the device's, the
kernels are compiled from that generation's virtual architecture into the device's machine code
(``-gencode arch=compute_86,code=sm_90``), the host code and the Python planners below take that
generation's capability and shared memory, and so every older-GPU path runs, natively, on the
GPU at hand: for the GPU tests (csrc/KERNELS.md session 27); users never set it.
"""

from __future__ import annotations

import os
import re

import torch

from .. import sliced_plan

ENV = "VPTQ_CUDA_ARCH"
# Opt-in shared memory a block on the generations the kernels are compiled for besides Hopper
# (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability").
SMEM_OPTIN = {cap: b for cap, b in sliced_plan.SMEM_OPTIN.items() if cap < (9, 0)}


def emulated() -> tuple[int, int] | None:
    """VPTQ_CUDA_ARCH as (major, minor): "86" or "8.6"; None where unset."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    m = re.fullmatch(r"(\d+)\.?(\d)", raw)
    cap = (int(m[1]), int(m[2])) if m else None
    if cap not in SMEM_OPTIN:
        known = ", ".join(f"{a}{b}" for a, b in SMEM_OPTIN)
        raise ValueError(f"{ENV}={raw!r} is not one of the older GPU generations: {known}")
    return cap


def capability(device=None) -> tuple[int, int]:
    """The compute capability the kernels are built and run for: the device's, or VPTQ_CUDA_ARCH
    where that is older."""
    real = torch.cuda.get_device_capability(device)
    cap = emulated()
    return cap if cap is not None and cap < real else real


def smem_optin(device=None) -> int:
    """Shared memory a block may opt in to: the device's, or the emulated generation's where
    that is less."""
    props = torch.cuda.get_device_properties(device)
    cap = capability(device)
    if cap == (props.major, props.minor):
        return props.shared_memory_per_block_optin
    return min(props.shared_memory_per_block_optin, SMEM_OPTIN[cap])


def gencode(device=None) -> str:
    """nvcc's -gencode for the build: Hopper's own sm_90a (whose features, the slice copy's
    multicast, ptxas would otherwise flag as possibly slow on later GPUs), else the device's
    machine code compiled from the (possibly older) generation's virtual architecture."""
    real = torch.cuda.get_device_capability(device)
    cap = capability(device)
    virtual, sm = f"{cap[0]}{cap[1]}", f"{real[0]}{real[1]}"
    if cap == real == (9, 0):
        virtual = sm = "90a"
    return f"-gencode=arch=compute_{virtual},code=sm_{sm}"


def tag(device=None) -> str:
    """The build folder's name for the generation: sm90, or sm90-as-sm86 when emulating."""
    real = torch.cuda.get_device_capability(device)
    cap = capability(device)
    own = f"sm{real[0]}{real[1]}"
    return own if cap == real else f"{own}-as-sm{cap[0]}{cap[1]}"
