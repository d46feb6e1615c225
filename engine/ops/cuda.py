"""Building, loading and calling the compiled VPTQ kernels of csrc/.

The extension is built on first use with torch.utils.cpp_extension (ninja) into
``<data folder>/kernels/<torch>-<cuda>-sm<arch>-<source hash>``, so a new torch, CUDA, GPU or
source builds anew and everything else loads in a second (engine/ops/arch.py: the GPU
generation, which VPTQ_CUDA_ARCH may set to an older one). When it cannot be built,
``status()`` says why and the engine runs the reference path, saying so.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats.vptq import VQLayerSpec
from ..memory import DEQUANT_WORKSPACE  # prefill dequantizes a layer in slices of at most this
from ..paths import shipped
from . import arch
from .decode import Partial
from .sliced import SlicedLayout
from .sliced import parts as sliced_parts

CSRC = shipped("csrc")
# The sliced GEMV's instances are spread over one file per token tile so that ninja builds them
# in parallel (one file took most of the first-use build).
SOURCES = (
    "vptq_ops.cpp",
    "vptq_kernels.cu",
    "vptq_decode.cu",
    "vptq_gptq.cu",
    "vptq_sliced.cu",
    "vptq_sliced_1.cu",
    "vptq_sliced_2.cu",
    "vptq_sliced_4.cu",
    "vptq_sliced_8.cu",
    "vptq_wide_1.cu",
    "vptq_wide_2.cu",
    "vptq_wide_4.cu",
)
HEADERS = ("vptq.h", "vptq_device.cuh", "vptq_sliced.cuh", "vptq_gemv.cuh")
# Fused GEMV (the sliced one where the layer has that layout) up to this many tokens; above it,
# dequant + cuBLAS GEMM. Chosen by measurement (`python -m engine bench kernels`, H200): summed
# over a Llama-3.1-8B block at 4 tokens the sliced GEMV takes 276 us against 533 us for
# dequant + GEMM; at 8 tokens the plain GEMV lost to dequant + GEMM (H100). csrc/KERNELS.md.
GEMV_MAX_TOKENS = 4
GEMV_VECTOR_LENS = {2: 8, 4: 8, 6: 8, 8: 8, 10: 4, 12: 4, 16: 4}  # v -> most tokens it takes

_lock = threading.Lock()
_state: dict[str, object] = {}


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from ..paths import home

    cuda = (torch.version.cuda or "none").replace(".", "")
    tag = f"torch{torch.__version__.split('+')[0]}-cu{cuda}-{arch.tag()}-{source_hash()}"
    return home() / "kernels" / tag


def why_not() -> str | None:
    """Why the kernels cannot be built here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA support"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None or not shutil.which("nvcc", path=_nvcc_path()):
        return "the CUDA compiler nvcc was not found (install the CUDA toolkit, set CUDA_HOME)"
    if shutil.which("ninja") is None:
        return "ninja was not found (pip install ninja)"
    return None


def _nvcc_path() -> str:
    import os

    from torch.utils import cpp_extension

    extra = str(Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "bin")
    return os.pathsep.join([extra, os.environ.get("PATH", "")])


def load(progress: Callable[[float, str], None] | None = None) -> tuple[bool, str]:
    """Build (once) and load the kernels; returns (loaded, reason or description)."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"]), str(_state["why"])
        why = why_not()
        if why is None:
            try:
                _build(progress)
                _register_fakes()
                major, minor = arch.capability()
                why = f"compiled CUDA kernels for sm_{major}{minor}"
                if arch.tag() != f"sm{major}{minor}":  # VPTQ_CUDA_ARCH
                    why += f" (as {arch.ENV}={major}{minor} on this newer GPU)"
                _state.update(ok=True, why=why)
                return True, why
            except Exception as e:  # compiler errors, missing headers, a broken toolchain
                why = f"the CUDA kernels failed to build ({str(e).strip().splitlines()[-1]})"
        _state.update(ok=False, why=why)
        return False, why


def _build(progress) -> None:
    from torch.utils import cpp_extension

    out = build_dir()
    name = f"vptq_kernels_{source_hash()}"
    if progress and not any(out.glob(f"{name}*.so")):
        progress(0.0, "building CUDA kernels, one time")
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        build_directory=str(out),
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-std=c++17", arch.gencode()],
        is_python_module=False,
        verbose=False,
    )


def _register_fakes() -> None:
    @torch.library.register_fake("vptq::dequant")
    def _(indices, centroids, res, oi, oc, perm, inv_perm, scale, wbias, meta):
        return centroids.new_empty((meta[0], meta[1]))

    @torch.library.register_fake("vptq::gemv")
    def _(x, indices, centroids, res, perm, scale, wbias, bias, meta):
        return x.new_empty((*x.shape[:-1], meta[0]))

    @torch.library.register_fake("vptq::gemv_sliced")
    def _(x, entries, res_codes, offsets, table, res_table, scale, wbias, bias, counters, meta,
          partial=False):  # fmt: skip
        shape = x.shape[:-1]
        if partial:  # [parts + 1, ..., N] float32 terms (parts: slices x column chunks)
            metas = [meta[12 * i : 12 * i + 12] for i in range(len(entries))]
            return [x.new_empty((sliced_parts(m) + 1, *shape, m[0]), dtype=torch.float32)
                    for m in metas]  # fmt: skip
        return [x.new_empty((*shape, meta[12 * i])) for i in range(len(entries))]

    @torch.library.register_fake("vptq::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("vptq::add_rms_norm")
    def _(x, residual, weight, eps):
        return torch.empty_like(residual), torch.empty_like(residual)

    @torch.library.register_fake("vptq::rope_kv")
    def _(q, k, v, cos, sin, pos, k_cache, v_cache):
        d = k_cache.shape[3]
        values = q[0].numel() if q.dtype == torch.float32 else q.numel()  # terms of sums
        return k_cache.new_empty((1, values // d, 1, d))

    @torch.library.register_fake("vptq::rope_kv_prefill")
    def _(q, k, v, cos, sin, start, k_cache, v_cache):
        d = k_cache.shape[3]
        return k_cache.new_empty((1, q.shape[2] // d, q.shape[1], d))

    @torch.library.register_fake("vptq::decode_attention")
    def _(q, k_cache, v_cache, pos, window, scale, tensor_cores=False):
        return q.new_empty((1, 1, q.numel()))

    @torch.library.register_fake("vptq::silu_mul")
    def _(gate, up, dtype=None):
        whole = [t for t in (gate, up) if t.dtype != torch.float32]
        like = whole[0] if whole else gate[0]
        return like.new_empty(like.shape, dtype=whole[0].dtype if whole else dtype)

    @torch.library.register_fake("vptq::greedy_pick")
    def _(logits, token, seen, pos, ticket):
        return None

    @torch.library.register_fake("vptq::sample_pick")
    def _(
        logits, noise, token, seen, pos, temperature, top_p, min_p, params=None, top_k=0,
        repetition_penalty=1.0,
    ):  # fmt: skip
        return None

    @torch.library.register_fake("vptq::gptq_gemv")
    def _(x, qweight, zeros, scales, g_idx, bias, bits, perm=None, group_size=0):
        return x.new_empty((x.shape[0], qweight.shape[1]))

    @torch.library.register_fake("vptq::gptq_dequant")
    def _(qweight, zeros, scales, g_idx, bits, n0, n1, perm=None):
        return scales.new_empty((g_idx.shape[0], n1 - n0))

    @torch.library.register_fake("vptq::embed_rows")
    def _(table, ids):
        return ids.new_empty((*ids.shape, table.shape[1]), dtype=table.dtype)


def meta(spec: VQLayerSpec) -> list[int]:
    return [
        spec.out_features,
        spec.in_features,
        spec.vector_len,
        spec.num_centroids,
        spec.num_res_centroids,
        spec.group_num,
        spec.group_size,
        spec.outlier_size,
        spec.outlier_vector_len,
        spec.outlier_centroids,
        spec.main_bits,
        spec.res_bits,
    ]


def fused_tokens(spec: VQLayerSpec) -> int:
    """Most tokens the fused GEMV takes for this layer (0: dequant + GEMM always).
    Mirrors gemv_supported() in csrc/vptq_kernels.cu."""
    if spec.has_outliers or not spec.packed or spec.index_bits > 32:
        return 0
    return min(GEMV_VECTOR_LENS.get(spec.vector_len, 0), GEMV_MAX_TOKENS)


def dequant(tensors: tuple, spec: VQLayerSpec) -> torch.Tensor:
    indices, centroids, res, oi, oc, perm, inv_perm, scale, wbias = tensors
    return torch.ops.vptq.dequant(
        indices, centroids, res, oi, oc, perm, inv_perm, scale, wbias, meta(spec)
    )


def gemv_sliced(
    x: torch.Tensor, bias: torch.Tensor | None, layout: SlicedLayout, tensors: tuple,
    partial: bool = False,
):  # fmt: skip
    return gemv_sliced_group(
        x, [bias], [layout], [tensors], [layout.meta], [layout.counters], partial
    )[0]


def gemv_sliced_group(
    x: torch.Tensor,
    biases: list,
    layouts: list[SlicedLayout],
    tensors: list[tuple],
    metas: list[list[int]],
    counters: list[torch.Tensor],
    partial: bool = False,
) -> list:
    """y_i = x W_i^T + bias_i for layers sharing x, in one launch (engine/ops/sliced.py
    SlicedGroup gives the metas and counters of a group; a single layer uses its own).
    ``partial``: each y_i as a Partial (engine/ops/decode.py), its sums left to the reader."""
    out = torch.ops.vptq.gemv_sliced(
        x, [a.entries for a in layouts], [a.res_codes for a in layouts],
        [a.offsets for a in layouts], [a.table for a in layouts], [a.res_table for a in layouts],
        [t[7] for t in tensors], [t[8] for t in tensors], biases, counters,
        [m for meta in metas for m in meta], partial,
    )  # fmt: skip
    return [Partial(y, x.dtype) for y in out] if partial else out


def linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    tensors: tuple,
    spec: VQLayerSpec,
    sliced: SlicedLayout | None = None,
    decode_path: str | None = None,
    partial: bool = False,
):
    """y = x W^T + bias: the sliced GEMV where the layer has that layout (engine/ops/sliced.py),
    else the fused GEMV for few tokens, dequant + cuBLAS GEMM otherwise. decode_path
    "dequant": one token takes dequant + GEMM too (what load-time tuning found fastest for the
    layer, engine/layers.py tune_decode). ``partial``: the sliced GEMV may return a Partial."""
    tokens = x.numel() // spec.in_features
    if sliced is not None and tokens <= min(sliced.max_tokens, GEMV_MAX_TOKENS):
        return gemv_sliced(x, bias, sliced, tensors, partial)
    if tokens <= fused_tokens(spec) and not (tokens == 1 and decode_path == "dequant"):
        indices, centroids, res, _, _, perm, _, scale, wbias = tensors
        return torch.ops.vptq.gemv(x, indices, centroids, res, perm, scale, wbias, bias, meta(spec))
    rows = _rows_per_chunk(spec, centroids_bytes=tensors[1].element_size())
    if rows >= spec.num_indices:
        return F.linear(x, dequant(tensors, spec), bias)
    out = x.new_empty((*x.shape[:-1], spec.out_features))  # [..., N]
    for r0 in range(0, spec.num_indices, rows):
        r1 = min(r0 + rows, spec.num_indices)
        n0, n1 = r0 * spec.vector_len, min(r1 * spec.vector_len, spec.out_features)
        part = replace(spec, out_features=n1 - n0)
        sliced = (tensors[0][:, r0:r1].contiguous(), *tensors[1:])
        out[..., n0:n1] = F.linear(x, dequant(sliced, part), None if bias is None else bias[n0:n1])
    return out


def _rows_per_chunk(spec: VQLayerSpec, centroids_bytes: int) -> int:
    """Vector-rows of W dequantized at once, so the dense workspace stays within
    DEQUANT_WORKSPACE (layers with outliers are dequantized whole)."""
    if spec.has_outliers:
        return spec.num_indices
    row = spec.vector_len * spec.in_features * centroids_bytes
    return max(1, DEQUANT_WORKSPACE // row)
