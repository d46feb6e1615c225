"""The first-run check: what this computer can do, each problem with what to do about it.

Pure logic (no Qt): the engine's hello says what PyTorch and the kernels can do (the GUI never
imports torch), NVML says what the driver and GPUs report, and the disk says what fits.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.memory import gib, host_available

from .gpu import Gpus, cuda_index

GiB = 1 << 30
MIN_FREE_DISK = 10 * GiB  # a 2-bit 8B model is ~4 GiB, a 70B one ~20 GiB
# On the CPU a 2-bit model takes about this many bytes a parameter (engine/memory.py cpu_need:
# its layers expanded to float16, 2, beside their packed form, at most 0.5, and the KV cache).
CPU_BYTES_PER_PARAM = 2.5
SMALLEST_MODEL = 7e9  # the VPTQ-community models start at 7B (Qwen2.5-7B)
_UNSET = object()


@dataclass
class Check:
    name: str
    ok: bool | None  # None: does not apply on this computer
    detail: str
    fix: str = ""


def run_checks(hello: dict, gpus: Gpus, models_dir: Path, available=_UNSET) -> list[Check]:
    """``available``: the memory the CPU path may take (default: the system's now)."""
    checks = []
    if gpus.available:
        checks.append(Check("NVIDIA driver", True, f"driver {gpus.driver}"))
        found = gpus.read()
        checks += [_gpu_check(g, hello.get("cuda_devices")) for g in found]
        if not found:
            checks.append(
                Check(
                    "GPU",
                    False,
                    "the driver reports no GPU",
                    "Check that the GPU is seated and enabled, then restart.",
                )
            )
    elif hello.get("cuda_devices"):  # the driver works (CUDA does); its NVML library is missing
        names = ", ".join(str(d.get("name", "a GPU")) for d in hello["cuda_devices"])
        checks.append(Check("NVIDIA driver", True, f"CUDA works: {names}"))
        checks.append(
            Check(
                "GPU monitoring (NVML)",
                False,
                gpus.reason or "not found",
                "NVML (libnvidia-ml) comes with the NVIDIA driver: without it the live panel "
                "shows only what the engine holds on the GPU, and the fit check cannot see "
                "what other programs use of it (it measures against the whole card). In a "
                "container, start it with the driver's libraries (the NVIDIA Container Toolkit "
                "adds them).",
            )
        )
    else:
        checks.append(
            Check(
                "NVIDIA driver",
                False,
                gpus.error or "not found",
                "Install the NVIDIA driver to use a GPU. Without it VPTQ Chat runs "
                "on the CPU: everything works, but answers come slowly.",
            )
        )
    cuda = hello.get("device") == "cuda"
    torch_name = f"PyTorch {hello['torch']}" if hello.get("torch") else "PyTorch"
    checks.append(
        Check(
            "PyTorch with CUDA",
            cuda,
            torch_name + ("" if cuda else " cannot use a GPU"),
            ""
            if cuda
            else "Install a CUDA build of PyTorch into this environment (needed only for a GPU).",
        )
    )
    kernels = hello.get("kernels") == "cuda"
    if not cuda:
        checks.append(Check("CUDA kernels", None, "not needed on the CPU path"))
        checks.append(cpu_memory(host_available() if available is _UNSET else available))
    else:
        fix = (
            ""
            if kernels
            else (
                "Install the CUDA toolkit (nvcc) and ninja; the engine then "
                "builds its kernels on the first load. Until then models run "
                "on the slow reference path."
            )
        )
        checks.append(Check("CUDA kernels", kernels, hello.get("kernels_reason", "unknown"), fix))
    models_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(models_dir).free
    enough = free >= MIN_FREE_DISK
    # rounded down, so a byte short of the need never reads as the need itself
    detail = f"{math.floor(free / GiB * 10) / 10:.1f} GiB free in {models_dir}"
    if not enough:
        detail += f" (under the {MIN_FREE_DISK // GiB} GiB the models need)"
    checks.append(
        Check(
            "Disk space for models",
            enough,
            detail,
            ""
            if enough
            else "Models need 2-40 GiB each: free some space on that disk, or start VPTQ Chat "
            "with VPTQ_CHAT_MODELS set to a folder on a disk with room (downloads go there).",
        )
    )
    return checks


def _gpu_check(g, cuda_devices: list[dict] | None) -> Check:
    """An NVML GPU, and whether the engine can use it: which CUDA device it is there (the
    numbers can differ), or that the engine does not see it."""
    detail = f"{g.name}: {g.free / GiB:.1f} GiB free of {g.total / GiB:.1f} GiB"
    if not cuda_devices:  # no hello yet, or no CUDA at all (the PyTorch check says so)
        return Check(f"GPU {g.index}", True, detail)
    n = cuda_index(g.uuid, cuda_devices)
    if n is not None:
        return Check(f"GPU {g.index}", True, f"{detail}; the engine's cuda:{n}")
    return Check(
        f"GPU {g.index}",
        False,
        f"{detail}; the engine does not see it",
        "CUDA_VISIBLE_DEVICES hides it from the engine: unset it (or list this GPU) before "
        "starting VPTQ Chat to use it.",
    )


def cpu_memory(available: int | None) -> Check:
    """How large a model the CPU path holds in the memory available now."""
    name = "Memory for the CPU path"
    if available is None:
        return Check(name, None, "this system does not say how much memory is available")
    params = available / CPU_BYTES_PER_PARAM
    billions = params / 1e9
    size = "under 1B" if billions < 1 else f"about {billions:.{1 if billions < 10 else 0}f}B"
    detail = (
        f"{gib(available)} available: models of up to {size} parameters fit (about "
        f"{CPU_BYTES_PER_PARAM} bytes a parameter on the CPU)"
    )
    if params >= SMALLEST_MODEL:
        return Check(name, True, detail)
    need = gib(int(SMALLEST_MODEL * CPU_BYTES_PER_PARAM))
    return Check(
        name,
        False,
        detail,
        f"The smallest VPTQ-community models (7B) need about {need} on the CPU: close other "
        "programs, or use an NVIDIA GPU. The demo model runs in any case.",
    )


def verdict(checks: list[Check]) -> str:
    by = {c.name: c for c in checks}
    if by["CUDA kernels"].ok:
        return "Ready: models run on your GPU with the CUDA kernels."
    if by["PyTorch with CUDA"].ok:
        return "Your GPU is usable, but on the slow reference path until the kernels build."
    return "No usable GPU: VPTQ Chat runs on the CPU. It works, but answers come slowly."
