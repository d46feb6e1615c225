"""The sliced layout of a VPTQ layer, built once at load time for csrc/vptq_sliced.cuh.

A 65536-entry codebook (1 MiB at v=8) does not fit in shared memory, and gathering one codeword
per index from L2 is slower than reading the fp16 weight (csrc/KERNELS.md). The weights are
static, so we regroup the lookups once: codebooks are concatenated into one table and cut into
slices of SLICE_BYTES; every lookup becomes a 32-bit entry

    (original column within its column chunk) << 16 | codeword within its slice

and entries are sorted into segments (slice, column chunk, vector-row), within a segment
round-robin over the shared-memory banks of their codewords (``spread_order``). A GPU block
then holds one slice in shared memory and serves all of its rows' lookups in that slice from
there. ``perm`` is folded into the columns. A residual codebook small enough to sit whole in
every block (RES_SMEM_BYTES) rides along as a 16-bit code per entry, its codewords held once for
each lane of a shared-memory wavefront where they fit (``res_copies``); a large one is sliced like
the main codebook, its lookups being entries of their own. Layers reading the same input can
share one launch (``group``).

The price is memory: 4 bytes per lookup (plus 2 for a small residual) on top of the packed
indices, which prefill's dequant still uses. A 2-bit v8 layer's indices take 2 bytes per 8
weights, so the layout adds 2x their size; the loader builds it only where it fits
(engine/loader.py). ``linear_reference`` is the pure-PyTorch twin of the kernel. How a layer is
cut for a GPU (slices, column chunks, row blocks) is planned in engine/sliced_plan.py, which
the app's fit check reads too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..formats.vptq import VQLayerSpec
from ..memory import PAD_TO, SLICED_READ_AHEAD, res_copies
from ..sliced_plan import (  # noqa: F401 (the planners, torch-free; tests reach them here too)
    GPU,
    STATIC_SMEM,
    TOKEN_TILES,
    LayerPlan,
    blocks_per_sm,
    chunk_width,
    held_per_sm,
    largest_row_block,
    launch_shape,
    layer_meta,
    layer_plan,
    layer_shape,
    layout_bytes,
    max_tokens,
    meta_tokens,
    plan_cost,
    planned_shape,
    plans,
    smem_bytes,
    two_per_sm,
)
from .reference import layer_indices


def gpu_of(device) -> GPU:
    """The GPU to plan for: ``device``'s SMs and opt-in shared memory (or the emulated
    generation's, engine/ops/arch.py)."""
    from . import arch

    props = torch.cuda.get_device_properties(device)
    return GPU(props.multi_processor_count, arch.smem_optin(device))


@dataclass
class SlicedLayout:
    entries: torch.Tensor  # int32 [E]
    res_codes: torch.Tensor | None  # int16 [E] (small residual), else None
    offsets: torch.Tensor  # int32 [n_slices * n_chunks * rows + 1]
    table: torch.Tensor  # [n_cw, v]
    res_table: torch.Tensor | None  # [res_cw * res_copies, v]
    counters: torch.Tensor  # int32 [row_blocks], zero between calls
    meta: list[int]  # see csrc/vptq_ops.cpp sliced_layer
    max_tokens: int  # most tokens one call takes on this device (0: none)
    table_is_copy: bool = False  # main and residual codebooks concatenated

    @property
    def nbytes(self) -> int:
        """Bytes beyond the layer's own tensors."""
        parts = [self.entries, self.res_codes, self.offsets, self.counters]
        if self.table_is_copy:
            parts.append(self.table)
        if self.res_table is not None and res_copies(self.meta[2], self.meta[9]) > 1:
            parts.append(self.res_table)  # the copies (csrc/vptq.h res_copies)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def pad_entry(chunk_cols: int) -> int:
    """The padding entry of a layout with chunks of chunk_cols columns: the kernel's zero
    column (xhat there is 0), codeword 0."""
    return chunk_cols << 16


def eligible(spec: VQLayerSpec, gpu: GPU | None = None) -> bool:
    """Layers the sliced GEMV is for: packed, no outliers, and a codebook the layout takes
    (engine/memory.py: larger than the plain GEMV's shared memory, a supported v), with a plan
    that fits ``gpu`` (layer_plan)."""
    return (
        spec.packed
        and not spec.has_outliers
        and spec.in_features <= 1 << 20
        and layout_bytes(spec, gpu=gpu) > 0
    )


def model_bytes(specs, gpu: GPU | None = None) -> int:
    """layout_bytes of every eligible layer among ``specs``: the whole model's layouts."""
    return sum(layout_bytes(s, gpu=gpu) for s in specs if eligible(s, gpu))


def choose(specs: list[VQLayerSpec], budget: int, gpu: GPU | None = None) -> list[int]:
    """Which layers get the layout within ``budget`` bytes: largest first, each needing its
    scratch on top while it is built; a layer too large for what is left is skipped and smaller
    ones still fit."""
    chosen = []
    for i in sorted(range(len(specs)), key=lambda i: -layout_bytes(specs[i], gpu=gpu)):
        need = layout_bytes(specs[i], gpu=gpu)
        if need > 0 and need + scratch_bytes(specs[i]) <= budget:  # 0: no plan fits
            chosen.append(i)
            budget -= need
    return chosen


def scratch_bytes(spec: VQLayerSpec) -> int:
    """Temporary memory build() needs on top (int32 codes, columns, segments and sort keys, the
    int64 sort orders), budgeted at 32 bytes a lookup. The GPU peak was not measured (on the CPU
    it is about 63); running out while building is survived (engine/layers.py arrange)."""
    return 32 * spec.num_indices * spec.in_features * (2 if spec.num_res_centroids else 1)


def _indices32(indices: torch.Tensor, spec: VQLayerSpec, rows_per_step: int = 256):
    """(main, residual) indices as int32 [G, R, S], unpacked a few rows at a time so the int64
    temporaries of unpacking stay small beside a loaded model."""
    main, res = [], []
    for r0 in range(0, spec.num_indices, rows_per_step):
        i1, i2 = layer_indices(indices[:, r0 : r0 + rows_per_step], spec)
        main.append(i1.to(torch.int32))
        if i2 is not None:
            res.append(i2.to(torch.int32))
    return torch.cat(main, 1), (torch.cat(res, 1) if res else None)


def parts(meta: list[int]) -> int:
    """Blocks a row block of the layout takes, one for each slice of each column chunk, and
    terms of its partial sums (csrc/vptq.h SlicedLayer::parts)."""
    return meta[5] * meta[7]


def bank_groups(v: int) -> tuple[int, int]:
    """(bytes per shared-memory load of a codeword, lanes served per wavefront) for length v:
    the kernel loads a codeword 16 bytes at a time where it can (vptq_device.cuh load_code),
    and a wavefront serves 128 bytes."""
    unit = 16 if v % 8 == 0 else 8 if v % 4 == 0 else 4
    return unit, 128 // unit


X_BANKS = 32  # shared-memory banks: one token's fp32 xhat of column c sits in bank c % 32


def _xhat_bank(packed: torch.Tensor, sb: torch.Tensor, nb: int) -> torch.Tensor:
    """The bank of each entry's xhat column, rotated by X_BANKS / nb per codeword bank."""
    xb = packed >> 16
    xb -= (sb % nb) * (X_BANKS // nb)
    return xb.remainder_(X_BANKS)


def _copy_index(key: torch.Tensor) -> torch.Tensor:
    """Each element's place among the elements of equal key (int32; in their order)."""
    order = torch.argsort(key, stable=True)
    ks = key[order]
    ci = torch.arange(ks.numel(), dtype=torch.int32, device=key.device)
    ci -= torch.searchsorted(ks, ks, out_int32=True)  # minus where its run of equal keys starts
    del ks
    out = torch.empty_like(ci)
    out[order] = ci
    return out


def _res_bank(res: torch.Tensor, sb: torch.Tensor, v: int) -> torch.Tensor:
    """The bank group of each entry's small-residual codeword, rotated by one per codeword
    bank."""
    unit, nb = bank_groups(v)
    rb = res * (v * 2 // unit)
    rb -= sb % nb
    return rb.remainder_(nb)


def spread_order(
    seg: torch.Tensor,
    packed: torch.Tensor,
    v: int,
    n_seg: int,
    chunk_cols: int,
    res: torch.Tensor | None = None,
) -> torch.Tensor:
    """The order of the entries: by segment, and within a segment round-robin over the banks
    their codewords start in. Lane i of a half-warp takes entry i of a run of 16 (the other
    half-warp takes the run of the pair's other row; at v = 16 lanes 2i and 2i + 1 take the two
    halves of entry i, so that a quarter-warp reads four whole codewords of four banks), and
    lanes whose codewords share a bank but not an address are served one after another;
    round-robin makes each wavefront's lanes hit different banks while every bank has entries
    left (it removes about half of the shared-memory wavefronts of random order).

    Within a codeword bank the entries go by copy index, then by the bank of their xhat
    column rotated by X_BANKS / nb per codeword bank (copy index: the entry's place among
    those of its segment, codeword bank and rotated column bank): each bank's list cycles
    through the column banks, and the lists of the nb codeword banks start a quarter of the
    way apart, so the lanes of a run mostly read xhat from different banks. Measured with a
    warp a row (H200, csrc/KERNELS.md session 11): 3.35 -> 2.96 xhat wavefronts a run on the
    8B gate layout, 277.6 / 278.0 -> 280.2 / 280.4 tok/s end to end. With two rows a warp the
    two runs read at once come from different rows: 3.15 a warp's run (8B q shape); rotating
    odd rows by half a step more gave 3.14 (session 16, not kept). The sorts are done one at
    a time on int32 keys where they fit, so the peak is that of a single sort, as before.

    res: each entry's small-residual codeword, where the kernel holds that codebook once
    (res_copies 1: too large to copy per lane). Its loads then share banks as the codewords'
    would in random order, so within a codeword bank the entries go by the bank of their
    residual codeword instead, rotated by one per codeword bank (csrc/KERNELS.md session 31:
    v8-k65536-4096 on the 8B q shape, 2.55 -> 2.17 residual wavefronts a quarter-warp, xhat
    3.16 -> 3.38 a warp; its block 136 -> 130 us on an H200)."""
    unit, nb = bank_groups(v)
    sb = seg * nb  # (segment, codeword bank)
    sb += (packed & 0xFFFF) * (v * 2 // unit) % nb
    banks = X_BANKS if res is None else nb  # of what orders the entries of a codeword bank

    def spread(sb: torch.Tensor) -> torch.Tensor:
        return _xhat_bank(packed, sb, nb) if res is None else _res_bank(res, sb, v)

    wide = n_seg * nb * banks >= 2**31
    key = sb.long() if wide else sb.clone()
    key *= banks
    key += spread(sb)
    ci = _copy_index(key)
    del key
    c = int(ci.max()) + 1 if ci.numel() else 1
    key = sb.long() if n_seg * nb * c * banks >= 2**31 else sb.clone()
    key *= c
    key += ci
    del ci
    key *= banks
    key += spread(sb)  # again rather than kept: one tensor less at the peak
    order = torch.argsort(key)  # unique: (segment, codeword bank, copy, column/residual bank)
    del key
    sb = sb[order]
    first = torch.zeros(n_seg * nb + 1, dtype=torch.int32, device=seg.device)
    first[1:] = torch.bincount(sb, minlength=n_seg * nb).cumsum(0, dtype=torch.int32)
    rank = torch.arange(sb.numel(), device=seg.device, dtype=torch.int32)
    rank -= first[sb]  # the entry's place among its segment's entries in its bank
    del first
    bank = sb % nb
    key = (sb // nb).long() if n_seg * 2 * chunk_cols * nb >= 2**31 else sb // nb
    del sb
    key *= 2 * chunk_cols  # a segment may hold main and residual lookups of one column
    key += rank
    key *= nb
    key += bank
    del rank, bank
    return order[torch.argsort(key)]


MAX_GROUP = 3  # layers one launch takes (csrc/vptq.h kMaxGroup)
GROUP_TOKENS = 2  # most tokens a launch of several layers takes (kGroupTokens)


@dataclass
class SlicedGroup:
    """Layers that share their input (q, k, v; gate, up) launched as one sliced GEMV: each
    keeps its layout, and gets here a row-block split of its own so that the blocks of all of
    them fill one wave (row_block and row_blocks of its meta, its counters)."""

    layouts: list[SlicedLayout]
    metas: list[list[int]]
    counters: list[torch.Tensor]
    max_tokens: int  # at most GROUP_TOKENS, which is below cuda.GEMV_MAX_TOKENS


def groupable(layouts: list[SlicedLayout]) -> bool:
    """Whether one launch takes these layouts: 2..MAX_GROUP of them with the same input size,
    vector length and residual kind (csrc/vptq_ops.cpp checks the same)."""
    if not 2 <= len(layouts) <= MAX_GROUP:
        return False
    key = [(a.meta[1], a.meta[2], a.meta[9] > 0) for a in layouts]
    return all(k == key[0] for k in key)


def group_row_blocks(rows: list[int], n_parts: list[int], num_sms: int, ctas_per_sm: int):
    """Row blocks per layer of a group: one each, and the rest of the wave's num_sms *
    ctas_per_sm blocks shared in proportion to each layer's lookups (rows x parts); never more
    than one wave in all unless one row block per layer already is. ``n_parts``: each layer's
    parts (slices x column chunks), the blocks a row block takes."""
    spare = max(0, num_sms * ctas_per_sm - sum(n_parts))
    work = [r * s for r, s in zip(rows, n_parts, strict=True)]
    return [
        min(r, 1 + spare * w // sum(work) // s) for r, s, w in zip(rows, n_parts, work, strict=True)
    ]


def group_plan(
    layouts: list[SlicedLayout], num_sms: int, ctas_per_sm: int | None = None
) -> tuple[int, list[int]]:
    """(blocks an SM, row blocks of each layer) of a shared launch, for the cheaper plan
    (``plans``, ``plan_cost``)."""
    v, res_cw = layouts[0].meta[2], layouts[0].meta[9]
    rows, n_parts = [a.meta[8] for a in layouts], [parts(a.meta) for a in layouts]

    def cost(c: int):
        shares = group_row_blocks(rows, n_parts, num_sms, c)
        blocks = sum(b * s for b, s in zip(shares, n_parts, strict=True))
        fullest = max(
            -(-r // b) * a.meta[6] * (2 if a.table_is_copy else 1) / a.meta[5]
            for a, r, b in zip(layouts, rows, shares, strict=True)
        )
        return plan_cost(blocks, fullest, num_sms, blocks_per_sm(v, res_cw)), c, shares

    _, c, shares = min(cost(c) for c in plans(v, res_cw, ctas_per_sm))
    return c, shares


# A shared launch gives each layer fewer, larger row blocks than its own launch, and the last
# block of a row block sums row_block * v outputs over all parts alone, after the others: a
# serial tail. Measured on the H200 (`bench kernels --arch llama-3.1-8b`, all five schemes, 1
# token, session 6), sharing helped wherever that tail, row_block * v * parts, was at most
# 71.7 K (v12-k65536-4096 gate+up: 132.8 us against 137.6 in two launches) and hurt wherever it
# was 114.7 K or more (v8-k65536-65536 gate+up 108.5 against 91.7; v16-k65536-65536 q+k+v
# 131.8 against 76.5, gate+up 271.5 against 153.3). The bound lies between.
MAX_SHARED_TAIL = 96 * 1024


def shared_tail(rows: list[int], n_parts: list[int], v: int, num_sms: int, ctas_per_sm: int) -> int:
    """The largest row_block * v * parts among the layers of a shared launch."""
    shares = group_row_blocks(rows, n_parts, num_sms, ctas_per_sm)
    return max(-(-r // b) * v * s for r, b, s in zip(rows, shares, n_parts, strict=True))


def worth_sharing(
    layouts: list[SlicedLayout], num_sms: int, smem_optin: int, ctas_per_sm: int | None = None
):
    """Whether these layouts can share a launch and are faster that way: a short enough serial
    tail (MAX_SHARED_TAIL), and the larger row blocks of the shared launch keep two blocks per
    SM wherever each layer's own launch has them (their accumulators are in shared memory)."""
    if not groupable(layouts):
        return False
    ctas_per_sm, shares = group_plan(layouts, num_sms, ctas_per_sm)
    rows, n_parts = [a.meta[8] for a in layouts], [parts(a.meta) for a in layouts]
    if shared_tail(rows, n_parts, layouts[0].meta[2], num_sms, ctas_per_sm) > MAX_SHARED_TAIL:
        return False
    for a, r, share in zip(layouts, rows, shares, strict=True):
        v, slice_cw, chunk_cols, res_cw, own = (a.meta[i] for i in (2, 4, 6, 9, 10))
        alone, shared = (
            two_per_sm(v, slice_cw, res_cw, row_block, chunk_cols, smem_optin)
            for row_block in (own, -(-r // share))
        )
        if alone and not shared:
            return False
        if meta_tokens([*a.meta[:10], -(-r // share)], smem_optin) < 1:
            return False  # the shared row block's accumulators leave no room for a token
    return True


def group(
    layouts: list[SlicedLayout], num_sms: int, smem_optin: int, ctas_per_sm: int | None = None
) -> SlicedGroup:
    if not groupable(layouts):
        raise ValueError("these layers cannot share a sliced launch")
    rows = [a.meta[8] for a in layouts]
    shares = group_plan(layouts, num_sms, ctas_per_sm)[1]
    metas, counters, most = [], [], []
    for a, r, share in zip(layouts, rows, shares, strict=True):
        row_block = -(-r // share)
        row_blocks = -(-r // row_block)
        metas.append([*a.meta[:10], row_block, row_blocks])
        counters.append(torch.zeros(row_blocks, dtype=torch.int32, device=a.entries.device))
        most.append(meta_tokens(metas[-1], smem_optin))
    return SlicedGroup(
        layouts=list(layouts), metas=metas, counters=counters,
        max_tokens=min([GROUP_TOKENS, *most]),
    )  # fmt: skip


def build(
    tensors: tuple,
    spec: VQLayerSpec,
    num_sms: int,
    smem_optin: int,
    ctas_per_sm: int | None = None,
) -> SlicedLayout:
    """The sliced layout of one layer, on the device of its tensors."""
    indices, centroids, res, _, _, perm, _, _, _ = tensors
    gpu = GPU(num_sms, smem_optin)
    if not eligible(spec, gpu):
        raise ValueError(f"the sliced GEMV does not take this layer ({spec}) on {gpu}")
    plan = layer_plan(spec, gpu, ctas_per_sm) or layer_plan(spec, gpu)  # a test's ctas_per_sm
    i1, i2 = _indices32(indices, spec)  # int32 [G, R, S]
    if res is None:  # no residual codebook given: its indices are not read
        spec, i2 = replace(spec, num_res_centroids=0), None
    meta = layer_meta(spec, plan, gpu, ctas_per_sm)
    _, K, v, n_cw, slice_cw, n_slices, chunk_cols, n_chunks, rows, res_cw, _, row_blocks = meta
    g, k, kr, S = spec.group_num, spec.num_centroids, spec.num_res_centroids, spec.group_size
    dev = indices.device
    i32 = torch.int32  # int32 throughout: build() runs beside the loaded model on the GPU
    if kr == 0:
        i2 = None
    small = i2 is not None and plan.small

    base = torch.arange(g, device=dev, dtype=i32).view(g, 1, 1)
    lookups = [(base * k + i1).flatten()]
    del i1
    table = centroids.reshape(-1, v)
    res_code = None
    if i2 is not None and small:
        res_code = (base * kr + i2).flatten()
    elif i2 is not None:
        lookups.append((g * k + base * kr + i2).flatten())
        table = torch.cat([table, res.reshape(-1, v)])
    res_table = None
    if small:  # each codeword res_copies times in a row (engine/memory.py res_copies)
        res_table = res.reshape(-1, v).contiguous()
        copies = res_copies(v, res_table.shape[0])
        if copies > 1:
            res_table = res_table.repeat_interleave(copies, 0)
    table_is_copy = i2 is not None and not small
    del i2
    assert table.shape[0] == n_cw, (table.shape, meta)

    n_seg = n_slices * n_chunks * rows
    column = perm.to(i32) if perm is not None else torch.arange(K, device=dev, dtype=i32)
    n = len(lookups)
    col = column.view(g, 1, S).expand(g, rows, S).flatten().repeat(n)  # original columns
    gid = torch.cat(lookups)
    del lookups
    seg = (gid // slice_cw * n_chunks + col // chunk_cols) * rows
    row = torch.arange(rows, device=dev, dtype=i32).view(1, rows, 1).expand(g, rows, S)
    seg += row.flatten().repeat(n)
    col %= chunk_cols  # the column within its chunk from here on
    packed = col << 16 | gid % slice_cw
    del gid
    del col
    # the residual banks spread by the order where the kernel holds one copy (res_copies)
    one_copy = res_code is not None and res_copies(v, res_cw) == 1
    order = spread_order(seg, packed, v, n_seg, chunk_cols, res_code if one_copy else None)
    packed = packed[order]
    # Each segment padded to a multiple of PAD_TO entries (the kernel's half-warps take 16 at a
    # time) with entries of the zero column chunk_cols, codeword 0 (pad_entry).
    counts = torch.bincount(seg, minlength=n_seg).to(i32)
    seg = seg[order]
    padded = (counts + PAD_TO - 1) // PAD_TO * PAD_TO
    zero = counts.new_zeros(1)
    start = torch.cat([zero, counts.cumsum(0, dtype=i32)])
    offsets = torch.cat([zero, padded.cumsum(0, dtype=i32)])
    del counts, padded
    pos = offsets[seg]
    pos -= start[seg]
    pos += torch.arange(pos.numel(), device=dev, dtype=i32)
    del seg, start
    # and SLICED_READ_AHEAD more at the end: the kernel loads a whole batch of a segment
    # unconditionally, so reading on past the last one stays inside the tensor
    size = int(offsets[-1]) + SLICED_READ_AHEAD
    entries = torch.full((size,), pad_entry(chunk_cols), dtype=i32, device=dev)
    entries[pos] = packed
    del packed
    res_codes = None
    if res_code is not None:
        rc = torch.zeros(entries.numel(), dtype=i32, device=dev)
        rc[pos] = res_code[order]
        res_codes = torch.where(rc >= 32768, rc - 65536, rc).to(torch.int16)
    del order, pos

    return SlicedLayout(
        entries=entries,
        res_codes=res_codes,
        offsets=offsets,
        table=table.contiguous(),
        res_table=res_table,
        counters=torch.zeros(row_blocks, dtype=torch.int32, device=dev),
        meta=meta,
        max_tokens=meta_tokens(meta, smem_optin),
        table_is_copy=table_is_copy,
    )


def linear_reference(
    x: torch.Tensor,
    layout: SlicedLayout,
    scale: torch.Tensor | None,
    wbias: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x W^T + bias from the sliced layout alone, in float64: the kernel's math, entry by
    entry (tests check the layout against the dense oracle with it)."""
    N, K, v, _, slice_cw, _n_slices, chunk_cols, n_chunks, rows = layout.meta[:9]
    xf = x.reshape(-1, K).double()
    xhat = xf * (scale.double() if scale is not None else 1.0)
    counts = (layout.offsets[1:] - layout.offsets[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts)
    n = seg.numel()  # the read-ahead tail beyond the last segment is not part of any
    e = layout.entries[:n].long() & 0xFFFFFFFF
    real = (e >> 16) < chunk_cols  # not padding
    seg, e = seg[real], e[real]
    sl, rest = seg // (n_chunks * rows), seg % (n_chunks * rows)
    chunk, row = rest // rows, rest % rows
    col = chunk * chunk_cols + (e >> 16)
    w = layout.table.double()[sl * slice_cw + (e & 0xFFFF)]  # [E, v]
    if layout.res_codes is not None and layout.res_table is not None:
        copies = res_copies(v, layout.meta[9])
        w = w + layout.res_table.double()[(layout.res_codes[:n].long()[real] & 0xFFFF) * copies]
    contrib = xhat[:, col, None] * w  # [T, E, v]
    y = xf.new_zeros(xf.shape[0], rows, v).index_add_(1, row, contrib)
    y = y.reshape(xf.shape[0], rows * v)[:, :N]
    if wbias is not None:
        y = y + (xf @ wbias.double())[:, None]
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], N)
