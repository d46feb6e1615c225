"""How the sliced GEMV's launches are planned (engine/ops/sliced.py builds the layouts,
csrc/vptq_sliced.cuh runs them): a layer's slices, column chunks and row blocks for a GPU's SMs
and shared memory, and what its layout takes. Free of torch, so the app's fit check
(app/browser.py) plans for the user's GPU as the engine will."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .memory import (
    CHUNK_COLS,
    MAX_CHUNK_COLS,
    PAD_TO,
    Shape,
    projections,
    res_copies,
    slice_codewords,
    sliced_layer_bytes,
    small_residual,
)


@dataclass(frozen=True)
class LayerDims:
    """What planning reads of a VPTQ layer: the fields of the same names in
    engine/formats/vptq.py VQLayerSpec, which planning takes as well."""

    in_features: int
    out_features: int
    vector_len: int
    num_centroids: int
    num_res_centroids: int = 0
    group_num: int = 1

    @property
    def num_indices(self) -> int:  # vector-rows along the output dimension
        return -(-self.out_features // self.vector_len)


CTAS_OVERRIDE = os.environ.get("VPTQ_SLICED_CTAS_PER_SM")  # blocks per SM, for tuning runs


def blocks_per_sm(v: int, res_cw: int) -> int:
    """The one-token sliced kernel's blocks an SM runs at once: two where 64 registers hold its
    loop (without a small residual codebook, v <= 8, or v = 16 whose lanes take half a codeword
    each; csrc/vptq_sliced.cuh's __launch_bounds__), else one, its 72-113 registers a thread
    leaving room for one block of 512 threads."""
    return 2 if (v <= 8 or v == 16) and res_cw == 0 else 1


# Launches are planned for two blocks an SM (one wave where the SM holds two). A kernel that
# holds one runs such a plan in two waves, and each wave pays the blocks' fixed costs (the
# slice and residual codebook copies, xhat, the end) again: Llama-3.1-8B v8-k65536-256 took 149
# us a block that way against 128 planned for one wave (H200, csrc/KERNELS.md session 22). But
# one wave of 50-100 blocks a row block leaves SMs idle (v12-k65536-4096 down: 65 us in one wave
# of 100 blocks, 52 in two of 250). So for such a kernel both plans are costed, in lookups of
# the fullest block plus WAVE_LOOKUPS a wave, and the cheaper taken (the one wave on a tie):
# that picks the faster plan of every launch measured there but v16 gate (one wave, 4% slower).
WAVE_LOOKUPS = 8192


# A kernel whose registers leave an SM room for two blocks gets one where a launch's shared
# memory holds one (two_per_sm: the accumulators of large row blocks), and an SM then runs its
# lookups at about 0.62 of the rate it gets with two. Llama-3.1-70B gate at v16-k65536-65536
# (H100, csrc/KERNELS.md session 59): planned for two blocks an SM, 896-row blocks whose
# accumulators left room for one took 158.6 us (256 blocks, two waves of one an SM); planned for
# four, 224-row blocks keeping two, 98.9 us (512 blocks, two waves of two); planned for one, one
# wave of 64 blocks, 212.8 us.
ONE_BLOCK_RATE = 0.62


def plan_cost(
    blocks: int, lookups_per_block: float, num_sms: int, per_sm: int, rate: float = 1.0
) -> float:
    """A launch of ``blocks`` on SMs that each run ``per_sm`` at once, in waves; ``rate``: how
    fast a block's lookups go against those of a launch the kernel was built for (held_per_sm)."""
    waves = -(-blocks // (num_sms * per_sm))
    return waves * (WAVE_LOOKUPS + lookups_per_block / rate)


def held_per_sm(
    v: int, slice_cw: int, res_cw: int, row_block: int, chunk_cols: int, smem_optin: int
) -> tuple[int, float]:
    """(blocks an SM holds of a one-token launch of this shape, plan_cost's rate for them): what
    the kernel's registers allow (blocks_per_sm) unless the shape's shared memory leaves room for
    fewer. A lone block of a kernel built for two runs at ONE_BLOCK_RATE of the SM's rate with
    two, so its lookups go at 2 x ONE_BLOCK_RATE of a block's among two."""
    per_sm = blocks_per_sm(v, res_cw)
    if per_sm == 2 and not two_per_sm(v, slice_cw, res_cw, row_block, chunk_cols, smem_optin):
        return 1, 2 * ONE_BLOCK_RATE
    return per_sm, 1.0


def _given(ctas_per_sm: int | None) -> int:
    return ctas_per_sm or (int(CTAS_OVERRIDE) if CTAS_OVERRIDE else 0)


def plans(v: int, res_cw: int, ctas_per_sm: int | None) -> list[int]:
    """The blocks an SM to plan a launch for, to be costed by plan_cost: ``ctas_per_sm`` where
    given (tests), else VPTQ_SLICED_CTAS_PER_SM where set, else what the kernel holds and two
    (and four where planned_shape finds that two leave room for one)."""
    given = _given(ctas_per_sm)
    return [given] if given else sorted({blocks_per_sm(v, res_cw), 2})


TOKEN_TILES = (1, 2, 4, 8)
STATIC_SMEM = 1024  # room for the kernel's static shared arrays (csrc/vptq.h kSlicedStaticSmem)


@dataclass(frozen=True)
class GPU:
    """What a device gives the sliced GEMV: its SMs, and the shared memory one block may opt in
    to (engine/ops/arch.py smem_optin: 227 KiB on an H100 or H200, 163 on an A100, 99 on an RTX
    3090 or 4090)."""

    num_sms: int
    smem_optin: int


@dataclass(frozen=True)
class LayerPlan:
    """How a layer's layout is cut: codewords a slice (a block's share of the codebook in shared
    memory), and whether a residual codebook sits whole beside each slice (small) or is sliced
    with the main one (two lookups a weight). ``waves``: the launch takes more row blocks than
    one wave of blocks, each as large as its shared memory holds (largest_row_block), where no
    one-wave plan fits."""

    slice_cw: int
    small: bool
    waves: bool = False


MIN_SLICE_CODEWORDS = 256


def layer_plan(
    spec: LayerDims, gpu: GPU | None = None, ctas_per_sm: int | None = None
) -> LayerPlan | None:
    """The layout's plan on ``gpu`` (None: the full slice, as every Hopper GPU takes it).
    Where the full slice (and a small residual codebook with its copies) leaves a block too
    little shared memory for one token, as the 99 KiB of an RTX 3090 or 4090 do for
    v8-k65536-256, the slices are halved, or the residual codebook sliced, whichever leaves the
    fewest entries to read (padding and all, estimated); failing all of those, the same with
    row blocks beyond one wave (LayerPlan.waves: a GPU of few SMs and 64 KiB, a Tesla T4 or an
    RTX 2080); None where nothing fits. That the full slice fits is checked on the layer's
    planned launch."""
    v, g, kr = spec.vector_len, spec.group_num, spec.num_res_centroids
    base = LayerPlan(slice_codewords(v), small_residual(v, kr, g))
    if gpu is None:
        return base
    return _fitting_plan(spec, base, gpu, ctas_per_sm)


@functools.lru_cache(maxsize=4096)
def _fitting_plan(
    spec: LayerDims, base: LayerPlan, gpu: GPU, ctas_per_sm: int | None
) -> LayerPlan | None:
    best = None
    for waves in (False, True):
        for small in (True, False) if base.small else (False,):
            slice_cw = base.slice_cw
            while slice_cw >= MIN_SLICE_CODEWORDS:
                plan = LayerPlan(slice_cw, small, waves)
                meta = layer_meta(spec, plan, gpu, ctas_per_sm)
                if meta_tokens(meta, gpu.smem_optin) >= 1:
                    if plan == base:
                        return base
                    segments = meta[5] * meta[7] * meta[8]
                    cell = 2 if spec.num_res_centroids and not small else 1
                    per_segment = meta[8] * meta[1] * cell / segments  # padded to PAD_TO each
                    entries = segments * max(per_segment + (PAD_TO - 1) / 2, PAD_TO)
                    best = min(best or (entries, plan), (entries, plan), key=lambda e: e[0])
                slice_cw = slice_cw // 2 // 8 * 8
        if best is not None:
            return best[1]
    return None


def layer_meta(
    spec: LayerDims, plan: LayerPlan, gpu: GPU, ctas_per_sm: int | None = None
) -> list[int]:
    """The layout's meta (csrc/vptq_ops.cpp sliced_layer) for ``plan`` on ``gpu``: [N, K, v,
    n_cw, slice_cw, n_slices, chunk_cols, n_chunks, rows, res_cw, row_block, row_blocks]."""
    v, g, k, kr = spec.vector_len, spec.group_num, spec.num_centroids, spec.num_res_centroids
    K, rows = spec.in_features, spec.num_indices
    res_cw = g * kr if plan.small and kr else 0
    cell = 2 if kr and not plan.small else 1  # a sliced residual: two lookups a weight
    n_cw = g * (k + (kr if cell == 2 else 0))
    n_slices = -(-n_cw // plan.slice_cw)
    chunk_cols, row_block, row_blocks = planned_shape(
        K, rows, v, plan.slice_cw, res_cw, n_slices, cell, gpu.num_sms, gpu.smem_optin,
        ctas_per_sm, plan.waves,
    )  # fmt: skip
    return [spec.out_features, K, v, n_cw, plan.slice_cw, n_slices, chunk_cols,
            -(-K // chunk_cols), rows, res_cw, row_block, row_blocks]  # fmt: skip


def meta_tokens(meta: list[int], smem_optin: int) -> int:
    """max_tokens of a layout's meta (its own launch's, or a shared launch's row block)."""
    return max_tokens(meta[2], meta[4], meta[9], meta[10], meta[6], smem_optin)


def smem_bytes(
    v: int, slice_cw: int, res_cw: int, row_block: int, tokens_tile: int, chunk_cols: int
) -> int:
    """Mirrors plan() in csrc/vptq_sliced.cuh."""

    def a16(n: int) -> int:
        return (n + 15) & ~15

    return (
        a16(slice_cw * v * 2)
        + a16(res_cw * res_copies(v, res_cw) * v * 2)
        + a16((chunk_cols + 1) * tokens_tile * 4)
        + a16(row_block * v * tokens_tile * 4)
    )


def max_tokens(
    v: int, slice_cw: int, res_cw: int, row_block: int, chunk_cols: int, smem_optin: int
) -> int:
    """Most tokens one call takes (0: none): v x tokens accumulators <= 32 per lane, and the
    shared memory fits beside STATIC_SMEM (sliced_supported() in csrc/vptq_sliced.cu)."""
    room = smem_optin - STATIC_SMEM
    fits = [
        nt
        for nt in TOKEN_TILES
        if v * nt <= 32 and smem_bytes(v, slice_cw, res_cw, row_block, nt, chunk_cols) <= room
    ]
    return max(fits, default=0)


def two_per_sm(
    v: int, slice_cw: int, res_cw: int, row_block: int, chunk_cols: int, smem_optin: int
) -> bool:
    """Whether two one-token blocks fit an SM's shared memory: an SM has 1 KiB more than one
    block may opt in to, and each block takes its static arrays and 1 KiB the system reserves."""
    block = smem_bytes(v, slice_cw, res_cw, row_block, 1, chunk_cols) + STATIC_SMEM + 1024
    return 2 * block <= smem_optin + 1024


def chunk_width(K: int, v: int, slice_cw: int, res_cw: int, row_block: int, smem_optin: int) -> int:
    """Input columns per chunk: what a block's shared memory holds of xhat. Each chunk has its
    own blocks (one per slice and row block) and its own terms of the sums, which the kernel
    reading the output adds, so a chunk costs blocks of the wave and terms, not a barrier.
    (Until session 16 a block walked all chunks, and each chunk end was a block-wide barrier
    behind the slowest warp plus a round of loads: Llama-3.1-8B's down projection in 4 chunks
    of 4096 took 29.0 us where gate, with as many lookups in 1 chunk, took 22.7, in 2 chunks of
    7168 26.0; H200, csrc/KERNELS.md session 10.) Chunks are as wide as MAX_CHUNK_COLS, K split
    evenly (a multiple of 8), where that keeps the layer's token tiles and its two blocks per
    SM; else CHUNK_COLS."""
    base = (
        max_tokens(v, slice_cw, res_cw, row_block, CHUNK_COLS, smem_optin),
        two_per_sm(v, slice_cw, res_cw, row_block, CHUNK_COLS, smem_optin),
    )
    n = -(-K // MAX_CHUNK_COLS)
    while n * CHUNK_COLS < K:
        width = (-(-K // n) + 7) // 8 * 8
        now = (
            max_tokens(v, slice_cw, res_cw, row_block, width, smem_optin),
            two_per_sm(v, slice_cw, res_cw, row_block, width, smem_optin),
        )
        if now == base:
            return width
        n += 1
    return CHUNK_COLS


def largest_row_block(v: int, slice_cw: int, res_cw: int, smem_optin: int) -> int:
    """The most vector-rows a block's accumulators hold for one token beside its slice and a
    CHUNK_COLS chunk of xhat (0: none). One wave's row blocks (launch_shape) outgrow it on a GPU
    of few SMs and little shared memory: Llama-3.1-8B's gate on a Tesla T4 (40 SMs, 64 KiB) took
    1792 vector-rows a block, 56 KiB of accumulators, and had no plan at all."""
    room = smem_optin - STATIC_SMEM
    most = max(0, (room - smem_bytes(v, slice_cw, res_cw, 0, 1, CHUNK_COLS)) // (v * 4))
    while most and smem_bytes(v, slice_cw, res_cw, most, 1, CHUNK_COLS) > room:
        most -= 1  # the accumulators' 16-byte alignment
    return most


def launch_shape(rows: int, n_parts: int, num_sms: int, ctas_per_sm: int) -> tuple[int, int]:
    """(row_block, row_blocks): about ctas_per_sm blocks per SM in one wave, never more; a row
    block takes n_parts blocks."""
    row_blocks = max(1, min(rows, (num_sms * ctas_per_sm) // n_parts))
    row_block = -(-rows // row_blocks)
    return row_block, -(-rows // row_block)


def layer_shape(
    K: int,
    rows: int,
    v: int,
    slice_cw: int,
    res_cw: int,
    n_slices: int,
    num_sms: int,
    ctas_per_sm: int,
    smem_optin: int,
    waves: bool = False,
) -> tuple[int, int, int]:
    """(chunk_cols, row_block, row_blocks) of a layer's own launch. A block serves one slice of
    one column chunk, so the chunks share the wave with the slices; wider row blocks take more
    accumulators, which may narrow the chunks: the two are settled together. ``waves``: row
    blocks no larger than largest_row_block, in as many waves as that takes."""
    n_chunks = 1
    most = largest_row_block(v, slice_cw, res_cw, smem_optin) if waves else 0
    for _ in range(4):
        row_block, row_blocks = launch_shape(rows, n_slices * n_chunks, num_sms, ctas_per_sm)
        if 0 < most < row_block:  # as few waves as that takes, their row blocks even
            row_blocks = -(-rows // most)
            row_block = -(-rows // row_blocks)
        chunk_cols = chunk_width(K, v, slice_cw, res_cw, row_block, smem_optin)
        if -(-K // chunk_cols) == n_chunks:
            break
        n_chunks = -(-K // chunk_cols)
    return chunk_cols, row_block, row_blocks


def planned_shape(
    K: int,
    rows: int,
    v: int,
    slice_cw: int,
    res_cw: int,
    n_slices: int,
    cell_lookups: int,
    num_sms: int,
    smem_optin: int,
    ctas_per_sm: int | None = None,
    waves: bool = False,
) -> tuple[int, int, int]:
    """layer_shape for the cheaper plan (``plans``, ``plan_cost``). ``cell_lookups``: lookups a
    (vector-row, column) has in the layout's table, 2 where the residual codebook is sliced.
    Where the kernel holds two blocks an SM but one wave's row blocks leave its shared memory
    room for one (their accumulators), row blocks half as large in two waves (planned for four
    an SM) are weighed too, if those keep two."""

    def cost(c: int) -> tuple[float, int, tuple[int, int, int], int]:
        chunk_cols, row_block, row_blocks = shape = layer_shape(
            K, rows, v, slice_cw, res_cw, n_slices, num_sms, c, smem_optin, waves
        )
        blocks = row_blocks * n_slices * -(-K // chunk_cols)
        lookups = row_block * chunk_cols * cell_lookups / n_slices
        per_sm, rate = held_per_sm(v, slice_cw, res_cw, row_block, chunk_cols, smem_optin)
        return plan_cost(blocks, lookups, num_sms, per_sm, rate), c, shape, per_sm

    options = [cost(c) for c in plans(v, res_cw, ctas_per_sm)]
    if not _given(ctas_per_sm) and blocks_per_sm(v, res_cw) == 2:
        (two,) = options  # what plans gives a kernel that holds two blocks an SM
        if two[3] == 1 and (four := cost(4))[3] == 2:
            options.append(four)
    return min(options)[2]


def layout_bytes(spec: LayerDims, elem: int = 2, gpu: GPU | None = None) -> int:
    """What a layer's layout takes (engine/ops/sliced.py build adds it) on ``gpu``, an upper
    bound (engine/memory.py sliced_layer_bytes); 0 where it takes none or no plan fits ``gpu``.
    ``elem``: bytes per codebook element."""
    plan = layer_plan(spec, gpu)
    if plan is None:
        return 0
    return sliced_layer_bytes(
        spec.in_features, spec.out_features, spec.vector_len, spec.num_centroids,
        spec.num_res_centroids, spec.group_num, elem, plan.slice_cw, plan.small,
    )  # fmt: skip


def model_layout_bytes(shape: Shape, v: int, k: int, kr: int = 0, gpu: GPU | None = None) -> int:
    """The layouts of every decoder projection of a VPTQ model of this shape on ``gpu`` (None:
    as an H100 or H200 plans them)."""
    per_layer = sum(layout_bytes(LayerDims(a, b, v, k, kr), gpu=gpu) for a, b in projections(shape))
    return shape.layers * per_layer


# Shared memory a block may opt in to, by compute capability (the CUDA C++ Programming Guide's
# table of technical specifications), and CUDA cores an SM: what the app reads from NVML, made
# a GPU to plan for (app/gpu.py). The ones before Hopper are those the engine can be built as
# (engine/ops/arch.py): Turing (7.5: Tesla T4, RTX 20 series; the oldest CUDA 13 compiles
# for), Ampere and Ada. Blackwell's data-centre parts (10.x) have Hopper's 227 KiB, its
# GeForce and workstation parts (12.x: RTX 5090, RTX PRO 6000, DGX Spark) an RTX 4090's 99.
SMEM_OPTIN = {(7, 5): 64 << 10, (8, 0): 163 << 10, (8, 6): 99 << 10, (8, 7): 163 << 10,
              (8, 9): 99 << 10, (9, 0): 227 << 10, (10, 0): 227 << 10, (10, 3): 227 << 10,
              (12, 0): 99 << 10, (12, 1): 99 << 10}  # fmt: skip
CORES_PER_SM = {(7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
                (10, 0): 128, (10, 3): 128, (12, 0): 128, (12, 1): 128}  # fmt: skip


def gpu_for(capability: tuple[int, int] | None, cuda_cores: int | None) -> GPU | None:
    """The GPU to plan for from what NVML tells of it; None where it tells too little (the
    fit check then plans as for an H100)."""
    if capability not in SMEM_OPTIN or not cuda_cores:
        return None
    return GPU(cuda_cores // CORES_PER_SM[capability], SMEM_OPTIN[capability])
