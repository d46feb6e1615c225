"""The sliced layout (engine/ops/sliced.py) against the float64 oracle, on the CPU: the layout
alone, decoded entry by entry, must give y = x W^T + bias exactly. The kernel that reads it is
checked on the GPU in test_kernels.py."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import memory, sliced_plan
from engine.ops import sliced

from .vq_factory import dequant_args, make_spec, oracle_dense, random_layer

SLICED = {  # every kind of layer the sliced GEMV takes
    "v8-k65536": dict(k_in=96, n_out=40, v=8, k=65536),
    "v8-k65536-chunks": dict(k_in=8300, n_out=16, v=8, k=65536),  # 2 column chunks of 4152
    "v8-k65536-r256": dict(k_in=64, n_out=24, v=8, k=65536, kr=256),  # residual in every block
    "v8-k65536-r65536": dict(k_in=50, n_out=16, v=8, k=65536, kr=65536),  # residual sliced
    "v12-k65536-r4096-pad": dict(k_in=40, n_out=28, v=12, k=65536, kr=4096),
    "v16-k65536": dict(k_in=33, n_out=20, v=16, k=65536),
    "v4-k16384-groups": dict(k_in=60, n_out=10, v=4, k=16384, g=3),
    # small residual codebooks copied once per lane of a wavefront (16 and 32 copies)
    "v4-k16384-r256": dict(k_in=60, n_out=12, v=4, k=16384, kr=256),
    "v2-k65536-r256": dict(k_in=50, n_out=10, v=2, k=65536, kr=256),
    "v8-k4096-nonorm-noperm-bias": dict(
        k_in=70, n_out=9, v=8, k=4096, norm=False, perm=False, bias=True
    ),
    "v6-k8192-odd": dict(k_in=101, n_out=13, v=6, k=8192),
}


OPTIN = 227 << 10  # shared memory one block may opt in to on an H100 or H200
HOPPER = sliced.GPU(num_sms=132, smem_optin=OPTIN)
A100 = sliced.GPU(num_sms=108, smem_optin=163 << 10)
CONSUMER = sliced.GPU(num_sms=128, smem_optin=99 << 10)  # an RTX 4090 (a 3090: 82 SMs)
GPUS = {"a100": A100, "consumer": CONSUMER}
T4 = sliced.GPU(num_sms=40, smem_optin=64 << 10)  # a Tesla T4 (an RTX 2080 Ti: 68 SMs)


def build(name, num_sms=7, ctas_per_sm=2):
    spec = make_spec(**SLICED[name])
    layer = random_layer(spec, seed=len(name), dtype=torch.float64)
    args = dequant_args(layer)
    return spec, layer, args, sliced.build(args, spec, num_sms, OPTIN, ctas_per_sm)


@pytest.mark.parametrize("name", sorted(SLICED))
def test_layout_reproduces_the_oracle(name):
    spec, layer, args, layout = build(name)
    assert sliced.eligible(spec)
    x = torch.randn(3, spec.in_features, dtype=torch.float64)
    bias = None if layer.bias is None else torch.tensor(layer.bias)
    got = sliced.linear_reference(x, layout, args[7], args[8], bias).numpy()
    want = x.numpy() @ oracle_dense(layer).T + (0 if layer.bias is None else layer.bias)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SLICED))
def test_layout_invariants(name):
    spec, _, _, layout = build(name)
    _N, K, v, n_cw, slice_cw, n_slices, chunk_cols, n_chunks, rows, _res_cw, rb, rbs = layout.meta
    lookups = rows * K * (2 if spec.num_res_centroids and layout.res_codes is None else 1)
    assert layout.offsets.numel() == n_slices * n_chunks * rows + 1
    # the kernel reads a batch (9 x 16 entries) past up to 9 x 16 entries beyond a segment's
    # end without a bound check (csrc/vptq_sliced.cuh kBatch, kRowLanes)
    tail = memory.SLICED_READ_AHEAD
    assert layout.entries.numel() == int(layout.offsets[-1]) + tail and tail >= 2 * 9 * 16
    sizes = layout.offsets.diff()
    assert (sizes >= 0).all() and (
        sizes % memory.PAD_TO == 0
    ).all()  # a half-warp takes 16 at a time
    assert memory.PAD_TO == 16
    end = int(layout.offsets[-1])
    pad_entry = sliced.pad_entry(chunk_cols)  # the zero column, codeword 0
    assert (layout.entries[end:] == pad_entry).all()  # the read-ahead tail
    if layout.res_codes is not None:
        assert layout.res_codes.numel() == layout.entries.numel()
    e = layout.entries[:end].long() & 0xFFFFFFFF
    pad = (e >> 16) == chunk_cols
    assert (e[pad] == pad_entry).all() and int((~pad).sum()) == lookups
    assert int(pad.sum()) <= (memory.PAD_TO - 1) * sizes.numel()
    assert int((e & 0xFFFF).max()) < slice_cw and int((e[~pad] >> 16).max()) < chunk_cols
    assert (n_slices - 1) * slice_cw < n_cw <= n_slices * slice_cw
    assert slice_cw * v * 2 <= memory.SLICE_BYTES and slice_cw % 8 == 0
    # within a segment the padding comes last, and the real entries go round-robin over the
    # banks of their codewords: by rank within their bank, then by bank (spread_order)
    seg = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    same = seg[1:] == seg[:-1]
    assert not (pad[:-1] & ~pad[1:])[same].any()
    unit, nb = sliced.bank_groups(v)
    real = ~pad
    r_seg, r_e = seg[real], e[real]
    bank = (r_e & 0xFFFF) * (v * 2 // unit) % nb
    seen: dict = {}
    rank = []
    for k in (r_seg * nb + bank).tolist():  # place of each entry among its segment's in its bank
        rank.append(seen.get(k, 0))
        seen[k] = rank[-1] + 1
    order = torch.tensor(rank) * nb + bank
    assert (order[1:] > order[:-1])[r_seg[1:] == r_seg[:-1]].all()
    # every row is in exactly one row block, and the blocks fill the machine without a 2nd wave
    parts = n_slices * n_chunks  # blocks a row block takes
    assert rb * rbs >= rows > rb * (rbs - 1) and rbs * parts <= max(7 * 2, parts)
    assert layout.counters.numel() == rbs and not layout.counters.any()
    assert layout.nbytes >= 4 * lookups
    if layout.res_codes is not None:
        assert not layout.res_codes[:end][pad].any()


def test_layout_bytes_is_what_build_adds():
    for name in SLICED:
        spec, _, _, layout = build(name)
        estimate = sliced.layout_bytes(spec, elem=8)  # these tables are float64
        assert estimate >= layout.nbytes - layout.counters.numel() * 4
        assert estimate <= 1.1 * layout.nbytes + 4096


def test_small_codebooks_stay_on_the_plain_path():
    assert not sliced.eligible(make_spec(k=256, v=8))  # 4 KB: the plain GEMV's shared memory
    assert not sliced.eligible(make_spec(v0=4, k0=16, p=8, k_in=96, k=65536))  # outliers
    assert sliced.eligible(make_spec(k=65536, v=8))


def test_the_gpu_oracle_layers_cover_the_pairs_edge_cases():
    """On Hopper the sliced GEMV runs in clusters of two blocks that share a slice copy where
    both serve the same part (csrc/vptq_sliced.cuh bulk_copy_start). test_kernels.py's oracle
    test, on an H100 or H200 (132 SMs), must meet the two exceptions: a grid of odd size, padded
    with a block that returns at once, and pairs that straddle two parts (odd row_blocks)."""

    def blocks(name):
        layout = build(name, num_sms=132)[3]
        return sliced.parts(layout.meta), layout.meta[11]

    parts, row_blocks = blocks("v12-k65536-r4096-pad")
    assert parts * row_blocks % 2 == 1  # 25 x 3: the pad
    parts, row_blocks = blocks("v8-k65536")
    assert parts % 2 == 0 and row_blocks % 2 == 1  # 16 x 5: twins, and pairs straddling parts


def test_launch_shape_never_needs_a_second_wave():
    for rows in (1, 5, 128, 1792, 3584):
        for n_slices in (1, 3, 16, 32, 300):
            rb, rbs = sliced.launch_shape(rows, n_slices, 132, 2)
            assert rb * rbs >= rows and rb * (rbs - 1) < rows
            assert rbs * n_slices <= max(264, n_slices)


def test_a_plan_costs_its_fullest_block_and_a_wave_overhead_for_each_wave():
    """plan_cost by hand: 132 SMs running two blocks each take 264 blocks in one wave, 265 in
    two; one block an SM, 132 a wave."""
    wave = sliced_plan.WAVE_LOOKUPS
    assert sliced.plan_cost(264, 1000, 132, 2) == wave + 1000
    assert sliced.plan_cost(265, 1000, 132, 2) == 2 * (wave + 1000)
    assert sliced.plan_cost(133, 500, 132, 1) == 2 * (wave + 500)
    assert sliced.plan_cost(396, 500, 132, 1) == 3 * (wave + 500)


def test_a_lone_block_of_a_kernel_built_for_two_costs_its_measured_rate():
    """held_per_sm by hand: v16 without a small residual holds two blocks an SM by its
    registers, unless the shape's shared memory leaves room for one (a 64 KiB slice, 4096
    columns of xhat and 896 rows of 16 accumulators: 137 KiB); v8 with a small residual holds
    one either way. plan_cost then counts a lone block's lookups at 2 x ONE_BLOCK_RATE."""
    rate = 2 * sliced_plan.ONE_BLOCK_RATE
    assert sliced.held_per_sm(16, 2048, 0, 896, 4096, OPTIN) == (1, rate)
    assert sliced.held_per_sm(16, 2048, 0, 224, 8192, OPTIN) == (2, 1.0)
    assert sliced.held_per_sm(8, 4096, 256, 64, 4096, OPTIN) == (1, 1.0)
    wave = sliced_plan.WAVE_LOOKUPS
    assert sliced.plan_cost(256, 1240, 132, 1, rate) == pytest.approx(2 * (wave + 1000))


def test_row_blocks_whose_accumulators_leave_room_for_one_block_are_halved():
    """Llama-3.1-70B gate at v16-k65536-65536 on an H100: one wave's row blocks (896 rows, two
    chunks of 4096) leave shared memory for one block an SM, which took 158.6 us; the plan takes
    224-row blocks in two waves of two blocks an SM instead (98.9 us; csrc/KERNELS.md session
    59). The 8B gate, whose one-wave row blocks keep two, keeps its plan; so do the kernels that
    hold one block an SM anyway, and GPUs where half-size row blocks would not keep two."""
    gate = make_spec(k_in=8192, n_out=28672, v=16, k=65536, kr=65536)
    plan = sliced.layer_plan(gate, HOPPER)
    one_wave = sliced.layer_meta(gate, plan, HOPPER, ctas_per_sm=2)
    meta = sliced.layer_meta(gate, plan, HOPPER)
    assert one_wave[6:] == [4096, 2, 1792, 0, 896, 2]
    assert not sliced.two_per_sm(16, 2048, 0, 896, 4096, OPTIN)
    assert meta[6:] == [8192, 1, 1792, 0, 224, 8]  # 512 blocks: two waves of 264
    assert sliced.two_per_sm(16, 2048, 0, 224, 8192, OPTIN)
    assert sliced.layer_meta(gate, plan, HOPPER, ctas_per_sm=4) == meta
    small_gate = make_spec(k_in=4096, n_out=14336, v=16, k=65536, kr=65536)
    small_plan = sliced.layer_plan(small_gate, HOPPER)
    assert sliced.layer_meta(small_gate, small_plan, HOPPER) == sliced.layer_meta(
        small_gate, small_plan, HOPPER, ctas_per_sm=2
    )
    assert sliced.plans(8, 256, None) == [1, 2] and sliced.plans(16, 0, None) == [2]
    # nor where two's row blocks keep two blocks an SM but leave some SMs idle (Qwen2.5-7B down
    # at v8-k65536-65536: 192 blocks of a wave of 264), which four would fill better by the cost
    # model alone: not measured
    down = make_spec(k_in=18944, n_out=3584, v=8, k=65536, kr=65536)
    down_plan = sliced.layer_plan(down, HOPPER)
    two = sliced.layer_meta(down, down_plan, HOPPER, ctas_per_sm=2)
    assert sliced.layer_meta(down, down_plan, HOPPER) == two and two[10:] == [224, 2]
    for gpu in (A100, CONSUMER):  # half-size row blocks hold one block an SM there too
        p = sliced.layer_plan(gate, gpu)
        assert sliced.layer_meta(gate, p, gpu) == sliced.layer_meta(gate, p, gpu, ctas_per_sm=2)


def test_layers_are_planned_for_the_blocks_an_sm_runs_at_once():
    """A residual layer's kernel, and one of v = 12, holds one block an SM (csrc/vptq_sliced.cuh):
    a launch planned as one wave is at most num_sms blocks, where a 2-bit v8 or v16 layer's is
    two blocks an SM."""
    for v, kr, per_sm in ((8, 0, 2), (8, 256, 1), (16, 0, 2), (12, 0, 1)):
        spec = make_spec(k_in=64, n_out=4096, v=v, k=65536, kr=kr)
        args = dequant_args(random_layer(spec, seed=v + kr, dtype=torch.float64))
        layout = sliced.build(args, spec, 132, OPTIN)
        assert sliced.blocks_per_sm(v, layout.meta[9]) == per_sm
        parts = sliced.parts(layout.meta)  # the blocks of a row block
        blocks = layout.meta[11] * parts
        assert blocks <= 132 * per_sm < blocks + parts, (v, kr)  # one full wave
    assert sliced.blocks_per_sm(6, 0) == 2 and sliced.blocks_per_sm(12, 4096) == 1
    assert sliced.blocks_per_sm(16, 1024) == 1  # a small residual: a lane takes whole codewords


# Session 22 on the H200 (`bench kernels --arch llama-3.1-8b --tokens 1 --scheme S`, Llama-3.1-8B
# shapes), us a launch planned for one block an SM (one wave) / for two (two waves):
# v8-k65536-256 q 14.9 / 20.1, gate 32.7 / 38.9, down 33.0 / 40.7, q+k+v 20.7 / 23.9;
# v12-k65536-4096 q 19.1 / 27.7, gate 45.2 / 50.8, down 65.3 / 52.0, q+k+v 33.2 / 32.1,
# gate+up 90.5 (not shared) / 86.5. (v16-k65536-65536, before its kernel held two blocks an
# SM: q 18.5 / 24.1, down 50.0 / 50.1, gate 52.3 / 50.1.)
SCHEMES = {  # v, small residual codewords, table codewords, lookups a (vector-row, column)
    "v8-k65536-256": (8, 256, 65536, 1),
    "v12-k65536-4096": (12, 4096, 65536, 1),
}
SHAPES = {  # (K, N) of each layer
    "q": [(4096, 4096)],
    "gate": [(4096, 14336)],
    "down": [(14336, 4096)],
    "q+k+v": [(4096, 4096), (4096, 1024), (4096, 1024)],
    "gate+up": [(4096, 14336)] * 2,
}
MEASURED_PLANS = [
    ("v8-k65536-256", "q", 1), ("v8-k65536-256", "gate", 1), ("v8-k65536-256", "down", 1),
    ("v8-k65536-256", "q+k+v", 1),
    ("v12-k65536-4096", "q", 1), ("v12-k65536-4096", "gate", 1), ("v12-k65536-4096", "down", 2),
    ("v12-k65536-4096", "q+k+v", 2), ("v12-k65536-4096", "gate+up", 2),
]  # fmt: skip


@pytest.mark.parametrize("scheme,layers,faster", MEASURED_PLANS)
def test_the_launch_plan_is_the_one_measured_faster(scheme, layers, faster):
    v, res_cw, n_cw, cells = SCHEMES[scheme]
    slice_cw = memory.slice_codewords(v)
    n_slices = -(-n_cw // slice_cw)

    def layout(K, N, ctas_per_sm=None):
        rows = -(-N // v)
        shape = sliced.planned_shape(
            K, rows, v, slice_cw, res_cw, n_slices, cells, 132, OPTIN, ctas_per_sm
        )
        chunk_cols, row_block, row_blocks = shape
        meta = [N, K, v, n_cw, slice_cw, n_slices, chunk_cols, -(-K // chunk_cols), rows,
                res_cw, row_block, row_blocks]  # fmt: skip
        empty = torch.zeros(0, dtype=torch.int32)
        return sliced.SlicedLayout(
            empty, None, empty, empty, None, empty, meta, max_tokens=1, table_is_copy=cells == 2
        )

    if len(SHAPES[layers]) == 1:
        ((K, N),) = SHAPES[layers]
        assert layout(K, N, 1).meta[6:] != layout(K, N, 2).meta[6:]  # two plans to choose from
        assert layout(K, N).meta[6:] == layout(K, N, faster).meta[6:]
    else:
        group = [layout(K, N) for K, N in SHAPES[layers]]
        assert sliced.group_plan(group, 132)[0] == faster
        assert sliced.worth_sharing(group, 132, OPTIN)  # shared, as measured


KERNEL = re.compile(
    r"sliced_gemv_kernelI(?:6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELb([01])ELb([01])E"
)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_blocks_per_sm_matches_the_registers_ptxas_gives_the_kernels(tmp_path):
    """blocks_per_sm, which plans every sliced launch, against the compiler: each one-token
    instance of the kernel (every v, with and without a small residual codebook) takes at most
    64 registers without spilling where it plans two blocks an SM (2 x 512 threads fill the
    register file), and more where it plans one."""
    import torch.utils.cpp_extension as ext

    repo = Path(__file__).parents[2]
    out = subprocess.run(
        ["nvcc", "-std=c++17", "-O3", "-c", str(repo / "csrc" / "vptq_sliced_1.cu"),
         "-o", str(tmp_path / "s.o"), "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
         *(f"-I{p}" for p in ext.include_paths())],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seen = set()
    for entry in out.stderr.split("Compiling entry function")[1:]:
        m = KERNEL.search(entry.splitlines()[0])
        if not m:
            continue
        v, nt, res, _ = map(int, m.groups())
        regs = int(re.search(r"Used (\d+) registers", entry).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", entry).group(1))
        assert nt == 1
        if sliced.blocks_per_sm(v, res) == 2:
            assert regs <= 64 and spills == 0, (v, res, regs, spills)
        else:
            assert regs > 64, (v, res, regs)
        seen.add((v, res))
    assert seen == {(v, r) for v in (2, 4, 6, 8, 10, 12, 16) for r in (0, 1)}


@pytest.mark.parametrize(
    "K,rows,want",
    [
        # (K, vector-rows): (chunk_cols, row_block, row_blocks) on 132 SMs, 2 blocks each,
        # v=8, 16 slices of 4096 codewords: 264 // (16 x chunks) row blocks
        (4096, 1792, (4096, 112, 16)),  # Llama-3.1-8B gate alone: one chunk
        (14336, 512, (7168, 64, 8)),  # 8B down: 2 chunks of 7168, 32 parts a row block
        (28672, 1024, (7168, 256, 4)),  # 70B down: 4 chunks, 64 parts
        (18944, 448, (6320, 90, 5)),  # Qwen2.5-7B down: 3 chunks (18944 / 3 rounded up to 8)
    ],
)
def test_layer_shape_gives_the_chunks_blocks_of_their_own(K, rows, want):
    shape = sliced.layer_shape(K, rows, 8, 4096, 0, 16, 132, 2, OPTIN)
    assert shape == want
    chunk_cols, row_block, row_blocks = shape
    parts = 16 * -(-K // chunk_cols)
    assert row_blocks * parts <= 264 and row_block * row_blocks >= rows  # one wave, every row
    assert sliced.two_per_sm(8, 4096, 0, row_block, chunk_cols, OPTIN)


def test_max_tokens_follows_shared_memory():
    spec = make_spec(k_in=96, n_out=40, v=16, k=65536)
    layer = random_layer(spec, dtype=torch.float16)
    args = dequant_args(layer)
    assert sliced.build(args, spec, 132, OPTIN).max_tokens == 2  # v x tokens <= 32
    # a consumer GPU's 99 KB: 64 KB of codebook + 2 x 16 KB of xhat
    assert sliced.build(args, spec, 132, 99 << 10).max_tokens == 2
    assert sliced.build(args, spec, 132, 90 << 10).max_tokens == 1
    # to the byte, as sliced_supported() in csrc/vptq_sliced.cu: the tile whose shared memory
    # and the static arrays are exactly the opt-in fits, a byte less takes the next one down
    need = sliced.smem_bytes(8, 4096, 0, 32, 4, 128) + sliced_plan.STATIC_SMEM
    assert sliced.max_tokens(8, 4096, 0, 32, 128, need) == 4
    assert sliced.max_tokens(8, 4096, 0, 32, 128, need - 1) == 2


def test_choose_fills_the_budget_largest_first():
    big, small = make_spec(k_in=4096, n_out=4096, k=65536), make_spec(k_in=1024, n_out=512, k=65536)
    specs = [small, big, small]
    need_big, need_small = sliced.layout_bytes(big), sliced.layout_bytes(small)
    scratch_big, scratch_small = sliced.scratch_bytes(big), sliced.scratch_bytes(small)
    everything = need_big + scratch_big + 2 * need_small + scratch_small
    assert sliced.choose(specs, everything) == [1, 0, 2]
    assert sliced.choose(specs, need_big + scratch_big - 1) == [0, 2]  # big skipped, small fit
    assert sliced.choose(specs, need_small + scratch_small) == [0]
    assert sliced.choose(specs, 0) == [] and sliced.choose(specs, -(1 << 30)) == []


def test_copy_index_counts_equal_keys_in_input_order():
    key = torch.tensor([3, 1, 3, 3, 1, 0, 3], dtype=torch.int32)
    assert sliced._copy_index(key).tolist() == [0, 0, 1, 2, 1, 0, 3]
    assert sliced._copy_index(key[:0]).tolist() == []


def test_spread_order_by_hand():
    # one segment, v=8 (16-byte codewords: codeword bank = codeword % 8), columns 0..5 with
    # codewords 0, 8, 1, 16, 9, 2: codeword banks 0, 0, 1, 0, 1, 2; xhat banks rotated by 4 per
    # codeword bank, (column - 4 x bank) % 32: 0, 1, 30, 3, 0, 29
    cw = torch.tensor([0, 8, 1, 16, 9, 2], dtype=torch.int32)
    col = torch.arange(6, dtype=torch.int32)
    packed = col << 16 | cw
    seg = torch.zeros(6, dtype=torch.int32)
    order = sliced.spread_order(seg, packed, 8, 1, 4096)
    # bank 0 by xhat bank: 0, 1, 3; bank 1: 4 (0), 2 (30); bank 2: 5. Then round-robin: rank 0
    # of banks 0, 1, 2, rank 1 of banks 0, 1, rank 2 of bank 0
    assert order.tolist() == [0, 4, 5, 1, 2, 3]
    # two segments stay apart, each spread on its own
    seg2 = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.int32)
    assert sliced.spread_order(seg2, packed, 8, 2, 4096).tolist() == [3, 4, 5, 2, 0, 1]


def test_spread_order_cycles_through_the_xhat_banks():
    # codeword bank 0 only; columns 5, 32, 40, 0: xhat banks 5, 0, 8, 0. Columns 32 and 0
    # share bank 0: 32 (first in the input) is its copy 0, column 0 its copy 1, so column 0
    # comes after every copy 0 (column order would put it first)
    col = torch.tensor([5, 32, 40, 0], dtype=torch.int32)
    packed = col << 16 | torch.tensor([0, 8, 16, 24], dtype=torch.int32)
    order = sliced.spread_order(torch.zeros(4, dtype=torch.int32), packed, 8, 1, 4096)
    assert order.tolist() == [1, 0, 2, 3]


def warp_runs(layout) -> torch.Tensor:
    """The xhat columns a warp reads at once, [runs, 32]: mini-group u of the segments of rows
    2p and 2p + 1 side by side (csrc/vptq_sliced.cuh; the shorter one's lanes read the zero
    column once it has ended). Needs an even row_block, so that pairs start at even rows."""
    _N, _K, _v, _n_cw, _slice_cw, n_slices, chunk_cols, n_chunks, rows, _r, row_block, _rbs = (
        layout.meta
    )
    assert row_block % 2 == 0 and rows % 2 == 0
    off = layout.offsets.long()
    col = (layout.entries.long() & 0xFFFFFFFF) >> 16
    runs = []
    for first in range(0, n_slices * n_chunks * rows, 2):  # segments of rows 2p and 2p + 1
        a, b = col[off[first] : off[first + 1]], col[off[first + 1] : off[first + 2]]
        n = max(a.numel(), b.numel())
        pair = torch.full((2, n), chunk_cols, dtype=torch.long)
        pair[0, : a.numel()], pair[1, : b.numel()] = a, b
        runs.append(pair.view(2, -1, 16).transpose(0, 1).reshape(-1, 32))
    return torch.cat(runs)


def wavefronts(runs: torch.Tensor, banks: int) -> float:
    """Shared-memory wavefronts of loads made at once, [loads, lanes] addresses in units of
    a bank (group): the most distinct addresses in one of ``banks`` (a bank serves equal
    addresses at once), averaged over the loads."""
    key, _ = (runs % banks * (1 << 20) + runs).sort(dim=1)
    new = torch.ones_like(key, dtype=torch.bool)
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    per_bank = torch.zeros(key.shape[0], banks, dtype=torch.long)
    per_bank.scatter_add_(1, key >> 20, new.long())
    return per_bank.max(1).values.double().mean().item()


def xhat_wavefronts(layout) -> float:
    """Wavefronts of one token's xhat loads (4 bytes, 32 banks), per warp-wide run."""
    return wavefronts(warp_runs(layout), 32)


def test_spread_order_spreads_the_xhat_loads_over_the_banks(monkeypatch):
    # a v=8 layer of the Llama-3.1-8B q shape, 16 slices: about 256 lookups a segment
    spec = make_spec(k_in=4096, n_out=1024, v=8, k=65536)
    layer = random_layer(spec, seed=5, dtype=torch.float16)
    args = dequant_args(layer)
    spread = xhat_wavefronts(sliced.build(args, spec, 132, OPTIN))

    def by_column(seg, packed, v, n_seg, chunk_cols, res=None):  # the order before session 11
        unit, nb = sliced.bank_groups(v)
        sb = (seg * nb + (packed & 0xFFFF) * (v * 2 // unit) % nb).long()
        order = torch.argsort(sb * chunk_cols + (packed >> 16))
        sb = sb[order]
        first = torch.cat([sb.new_zeros(1), torch.bincount(sb).cumsum(0)])
        rank = torch.arange(sb.numel()) - first[sb]
        return order[torch.argsort(((sb // nb) * 2 * chunk_cols + rank) * nb + sb % nb)]

    monkeypatch.setattr(sliced, "spread_order", by_column)
    plain = xhat_wavefronts(sliced.build(args, spec, 132, OPTIN))
    # warp-wide runs of two rows' 16 entries each (3.35 and 2.96 with runs of one row's 32)
    assert spread < 3.2 < plain < 3.5, (plain, spread)


def residual_wavefronts(layout) -> float:
    """Wavefronts of the residual codewords' 16-byte loads (v = 8, one copy of the codebook),
    per quarter-warp: eight lanes, eight bank groups."""
    codes = layout.res_codes[: int(layout.offsets[-1])].long() & 0xFFFF
    return wavefronts(codes.view(-1, 8), 8)  # segments are padded to 16: no straddling


def test_spread_order_spreads_the_residual_loads_where_the_codebook_has_one_copy(monkeypatch):
    # v8-k65536-4096: a 64 KB residual codebook, too large to copy per lane (res_copies 1)
    spec = make_spec(k_in=4096, n_out=1024, v=8, k=65536, kr=4096)
    assert sliced.res_copies(8, 4096) == 1
    args = dequant_args(random_layer(spec, seed=5, dtype=torch.float16))
    spread = residual_wavefronts(sliced.build(args, spec, 132, OPTIN))
    orig = sliced.spread_order
    monkeypatch.setattr(sliced, "spread_order", lambda *a: orig(*a[:5]))  # the xhat order
    plain = residual_wavefronts(sliced.build(args, spec, 132, OPTIN))
    assert spread < 2.3 < 2.45 < plain < 2.65, (plain, spread)  # counted: 2.17 and 2.55


def test_group_row_blocks_fill_one_wave_by_work():
    # Llama-3.1-8B q, k, v (512, 128, 128 vector-rows) and gate, up (1792 each), 16 slices
    assert sliced.group_row_blocks([512, 128, 128], [16, 16, 16], 132, 2) == [10, 3, 3]
    assert sliced.group_row_blocks([1792, 1792], [16, 16], 132, 2) == [8, 8]
    for rows, slices in (([5, 1, 3000], [4, 40, 16]), ([7, 7], [300, 1])):
        shares = sliced.group_row_blocks(rows, slices, 132, 2)
        assert all(1 <= b <= r for b, r in zip(shares, rows, strict=True))
        assert sum(b * s for b, s in zip(shares, slices, strict=True)) <= max(264, sum(slices))


def test_group_gives_each_layer_its_own_split():
    layouts = [build(n)[3] for n in ("v8-k65536", "v8-k65536", "v8-k65536")]
    plan = sliced.group(layouts, 132, OPTIN)
    for a, meta, counters in zip(layouts, plan.metas, plan.counters, strict=True):
        assert meta[:10] == a.meta[:10]  # the layout itself is shared, not copied
        row_block, row_blocks = meta[10:]
        assert row_block * row_blocks >= a.meta[8] > row_block * (row_blocks - 1)
        assert counters.numel() == row_blocks and not counters.any()
    assert plan.max_tokens == min(sliced.GROUP_TOKENS, *(a.max_tokens for a in layouts))
    from engine.ops import cuda

    assert sliced.GROUP_TOKENS <= cuda.GEMV_MAX_TOKENS  # a group never takes more than one
    assert not sliced.groupable(layouts[:1]) and not sliced.groupable(layouts * 2)
    assert not sliced.groupable([layouts[0], build("v16-k65536")[3]])  # another v
    assert not sliced.groupable([layouts[0], build("v8-k65536-chunks")[3]])  # another K
    with pytest.raises(ValueError):
        sliced.group([layouts[0], build("v8-k65536-r256")[3]], 132, OPTIN)  # residual


# (v, slices per layer, q+k+v faster shared, gate+up faster shared): the H200 measurements of
# session 6 (`bench kernels --arch llama-3.1-8b`, 1 token) behind sliced.MAX_SHARED_TAIL
MEASURED_SHARING = {
    "v8-k65536-0": (8, 16, True, True),
    "v8-k65536-256": (8, 16, True, True),
    "v8-k65536-65536": (8, 32, True, False),
    "v12-k65536-4096": (12, 25, True, True),
    "v16-k65536-65536": (16, 64, False, False),
}


@pytest.mark.parametrize("scheme", sorted(MEASURED_SHARING))
def test_layers_share_a_launch_where_that_was_measured_faster(scheme):
    v, slices, qkv, gate_up = MEASURED_SHARING[scheme]
    rows_qkv = [-(-4096 // v), -(-1024 // v), -(-1024 // v)]  # Llama-3.1-8B q, k, v
    rows_gu = [-(-14336 // v)] * 2
    tail = sliced.shared_tail(rows_qkv, [slices] * 3, v, 132, 2)
    assert (tail <= sliced.MAX_SHARED_TAIL) == qkv
    assert (
        sliced.shared_tail(rows_gu, [slices] * 2, v, 132, 2) <= sliced.MAX_SHARED_TAIL
    ) == gate_up


def test_worth_sharing_needs_groupable_layouts_and_a_short_tail(monkeypatch):
    layouts = [build("v8-k65536")[3] for _ in range(3)]
    assert sliced.worth_sharing(layouts, 132, OPTIN)
    assert not sliced.worth_sharing(layouts[:1], 132, OPTIN)  # one layer is no group
    monkeypatch.setattr(sliced, "MAX_SHARED_TAIL", 0)
    assert not sliced.worth_sharing(layouts, 132, OPTIN)


@pytest.mark.parametrize(
    "K, v, slice_cw, res_cw, row_block, want",
    [
        (4096, 8, 4096, 0, 32, 4096),  # one chunk
        (5000, 8, 4096, 0, 32, 5000),  # one chunk, wider than CHUNK_COLS
        (8192, 8, 4096, 0, 32, 8192),
        (14336, 8, 4096, 0, 32, 7168),  # Llama-3.1-8B down: 2 chunks instead of 4
        (28672, 8, 4096, 0, 32, 7168),  # Llama-3.1-70B down: 4 instead of 7
        (8300, 8, 4096, 0, 32, 4152),  # 4150 rounded up to a multiple of 8
        # xhat for 2 tokens of 8192 columns (64 KiB) beside a 96 KiB residual codebook and the
        # 64 KiB slice leaves no room: 2-token calls would be lost
        (8192, 12, 2728, 4096, 32, 4096),
        (14336, 12, 2728, 4096, 32, 7168),  # 7168 columns still fit 2 tokens
        # one token: 64 KiB slice + 32 KiB xhat + 300 x 16 x 4 B of accumulators (+ 2 KiB) is
        # more than half an SM's 228 KiB: one block per SM instead of two
        (8192, 16, 2048, 0, 300, 4096),
        (8192, 16, 2048, 0, 200, 8192),
        # three chunks of 8192 keep one block per SM; four of 6144 give two back
        (24576, 16, 2048, 0, 300, 6144),
    ],
)
def test_chunk_width_by_hand(K, v, slice_cw, res_cw, row_block, want):
    assert sliced.chunk_width(K, v, slice_cw, res_cw, row_block, OPTIN) == want


def fake_layout(N, K, v, rows, row_block, chunk_cols, n_slices=16):
    meta = [N, K, v, 65536, 65536 // n_slices, n_slices, chunk_cols, -(-K // chunk_cols), rows,
            0, row_block, -(-rows // row_block)]  # fmt: skip
    empty = torch.zeros(0, dtype=torch.int32)
    return sliced.SlicedLayout(empty, None, empty, empty, None, empty, meta, max_tokens=4)


def test_worth_sharing_keeps_two_blocks_per_sm():
    # 16 SMs: each layer alone gets 2 row blocks (300 rows), a shared launch 1 (600 rows). With
    # 8192-column chunks, 64 KiB slice + 32 KiB xhat + 600 x 8 x 4 B of accumulators (+ 2 KiB)
    # is more than half of an SM's 228 KiB: one block per SM instead of two.
    wide = [fake_layout(4800, 8192, 8, 600, 300, 8192) for _ in range(2)]
    assert sliced.two_per_sm(8, 4096, 0, 300, 8192, OPTIN)
    # to the byte: an SM holds 1 KiB more than a block's opt-in, a block its dynamic shared
    # memory, the static arrays and 1 KiB the system reserves
    block = sliced.smem_bytes(8, 4096, 0, 300, 1, 8192) + sliced_plan.STATIC_SMEM + 1024
    assert [sliced.two_per_sm(8, 4096, 0, 300, 8192, 2 * block - 1024 - d) for d in (0, 1)] == [
        True, False,
    ]  # fmt: skip
    assert not sliced.two_per_sm(8, 4096, 0, 600, 8192, OPTIN)
    assert not sliced.worth_sharing(wide, 16, OPTIN)
    # 4096-column chunks keep two blocks per SM. Two chunks make 32 parts (blocks) a row block:
    # on 32 SMs each layer alone gets 2 row blocks of 192 rows, a shared launch 1 of 384, whose
    # last block sums 384 x 8 x 32 values: just within MAX_SHARED_TAIL
    narrow = [fake_layout(3072, 8192, 8, 384, 192, 4096) for _ in range(2)]
    assert sliced.group_row_blocks([384, 384], [32, 32], 32, 2) == [1, 1]
    assert sliced.two_per_sm(8, 4096, 0, 384, 4096, OPTIN)
    assert sliced.shared_tail([384, 384], [32, 32], 8, 32, 2) == sliced.MAX_SHARED_TAIL
    assert sliced.worth_sharing(narrow, 32, OPTIN)
    longer = [fake_layout(3200, 8192, 8, 400, 200, 4096) for _ in range(2)]  # 400 x 8 x 32
    assert not sliced.worth_sharing(longer, 32, OPTIN)


def test_bench_block_sum_takes_separate_launches_where_the_engine_does(capsys):
    from engine import bench

    alone = {"q": 16, "k": 12, "v": 12, "o": 16, "gate": 28, "up": 28, "down": 37}
    rows = [dict(arch="a", scheme="s", tokens=1, proj=p, best_us=us, cublas_us=10.0)
            for p, us in alone.items()]  # fmt: skip
    shared = [dict(arch="a", scheme="s", tokens=1, proj="q+k+v", shared_us=21.0)]
    bench._print_shared(rows, shared)
    out = capsys.readouterr().out
    assert "q+k+v 21.0 us" in out and "gate+up separate 56.0 us" in out
    assert "130/    70" in out  # 21 + 56 + o 16 + down 37 against 7 x 10


def _uniform_model(tmp_path):
    from engine.loader import load_model

    from .test_loader import SCHEMES, build_vptq_model

    build_vptq_model(tmp_path, torch.float16, schemes={p: dict(v=8, k=65536) for p in SCHEMES})
    model = load_model(tmp_path, "cpu", torch.float16, max_seq_len=16).model
    from engine.layers import VQLinear

    return model, [m for m in model.modules() if isinstance(m, VQLinear)]


def test_arrange_builds_layouts_and_shared_launches(tmp_path):
    from engine import layers as L

    model, linears = _uniform_model(tmp_path)
    assert L.arrange(model, linears, 1 << 40, 132, OPTIN) == len(linears) == 14
    blocks = [b for b in model.modules() if hasattr(b, "shared_input")]
    assert all(b.fused is not None for b in blocks)
    for b in blocks:
        assert b.fused.plan.layouts == [m.sliced for m in b.shared_input()]
    # nothing fits: no layouts, no shared launches
    model, linears = _uniform_model(tmp_path / "again")
    assert L.arrange(model, linears, 0, 132, OPTIN) == 0
    assert all(m.sliced is None for m in linears)
    assert all(b.fused is None for b in model.modules() if hasattr(b, "shared_input"))


def test_out_of_memory_while_arranging_keeps_what_was_built(tmp_path, monkeypatch, caplog):
    from engine import layers as L

    model, linears = _uniform_model(tmp_path)
    real, calls = sliced.build, []

    def build_until_full(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kw)

    monkeypatch.setattr(sliced, "build", build_until_full)
    assert L.arrange(model, linears, 1 << 40, 132, OPTIN) == 2
    assert sum(m.sliced is not None for m in linears) == 2 and len(calls) == 3
    assert "out of memory arranging" in caplog.text and "12 layers keep the plain" in caplog.text
    # shared launches only where every member has its layout
    for b in model.modules():
        if hasattr(b, "shared_input"):
            assert (b.fused is not None) == all(m.sliced is not None for m in b.shared_input())


def test_tune_decode_keeps_the_fastest_path_of_each_shape(tmp_path, monkeypatch):
    """Fake timings per (shape, path): a path replaces the sliced GEMV only when more than 5%
    faster, the layers of that shape then give their layouts back; layers in a shared launch
    are not timed."""
    from engine import layers as L

    monkeypatch.setenv("VPTQ_SLICED_GROUPS", "0")
    model, linears = _uniform_model(tmp_path)
    assert L.arrange(model, linears, 1 << 40, 132, OPTIN) == 14
    times = {  # (in, out) -> seconds per path
        (48, 48): {"sliced": 1.0, "gemv": 0.5, "dequant": 0.8},  # q and o: the plain GEMV
        (48, 24): {"sliced": 1.0, "gemv": 1.2, "dequant": 0.5},  # k and v: dequant + GEMM
        (48, 80): {"sliced": 1.0, "gemv": 2.0, "dequant": 3.0},  # gate and up: sliced
        (80, 48): {"sliced": 1.0, "gemv": 0.96, "dequant": 2.0},  # down: within the margin
    }
    seen = []

    def timer(group, path):
        spec = group[0].spec
        seen.append((spec.in_features, spec.out_features, path, len(group)))
        return times[(spec.in_features, spec.out_features)][path]

    chosen = L.tune_decode(model, timer)
    assert chosen == {"48x48 v8": "gemv", "48x24 v8": "dequant", "48x80 v8": "sliced",
                      "80x48 v8": "sliced"}  # fmt: skip
    assert sorted(set(seen)) == sorted(
        (k, n, p, 4 if (k, n) != (80, 48) else 2) for (k, n), ps in times.items() for p in ps
    )
    by_name = {m.name.rsplit(".", 1)[-1]: m for m in linears}
    for name, path in [("q_proj", "gemv"), ("o_proj", "gemv"), ("k_proj", "dequant"),
                       ("v_proj", "dequant")]:  # fmt: skip
        assert by_name[name].sliced is None and by_name[name].decode_path == path
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert by_name[name].sliced is not None and by_name[name].decode_path is None
    # with shared launches q, k, v and gate, up are not timed: only o and down
    monkeypatch.setenv("VPTQ_SLICED_GROUPS", "1")
    model, linears = _uniform_model(tmp_path / "shared")
    L.arrange(model, linears, 1 << 40, 132, OPTIN)
    seen.clear()
    L.tune_decode(model, timer)
    assert {(k, n, g) for k, n, _, g in seen} == {(48, 48, 2), (80, 48, 2)}


def test_dequant_is_a_decode_candidate_only_for_small_layers():
    from engine import layers as L

    from .vq_factory import make_spec

    assert L.decode_candidates(make_spec(k_in=4096, n_out=1024, v=16, k=65536, kr=65536)) == [
        "sliced", "gemv", "dequant"
    ]  # fmt: skip
    big = make_spec(k_in=4096, n_out=14336, v=8, k=65536)  # 112 MiB dense
    assert L.decode_candidates(big) == ["sliced", "gemv"]


def test_a_failure_to_time_the_decode_paths_keeps_the_sliced_gemv(tmp_path, monkeypatch, caplog):
    from engine import layers as L

    model, linears = _uniform_model(tmp_path)
    L.arrange(model, linears, 1 << 40, 132, OPTIN)

    def broken(model):
        raise RuntimeError("CUDA error: the launch timed out\nmore")

    monkeypatch.setattr(L, "tune_decode", broken)
    assert L.tune_or_keep(model) == {}
    assert "timing the one-token decode paths failed (CUDA error: the launch timed out)" in (
        caplog.text
    )
    assert all(m.sliced is not None and m.decode_path is None for m in linears)
    monkeypatch.setenv("VPTQ_TUNE_DECODE", "0")
    monkeypatch.setattr(L, "tune_decode", lambda model: 1 / 0)  # not called
    assert L.tune_or_keep(model) == {}


def test_the_benchmark_sums_the_path_the_engine_takes():
    """bench kernels' block sums use what load-time tuning picks at one token (the H200 v16
    figures of csrc/KERNELS.md session 7) and the faster of GEMV and dequant + GEMM otherwise."""
    from engine.bench import engine_path

    from .vq_factory import make_spec

    q = make_spec(k_in=4096, n_out=4096, v=16, k=65536, kr=65536)  # 32 MiB dense: all three
    row = dict(tokens=1, gemv_us=34.7, plain_gemv_us=29.8, dequant_gemm_us=41.9)
    assert engine_path(row, q, has_layout=True) == "plain_gemv"
    k = make_spec(k_in=4096, n_out=1024, v=16, k=65536, kr=65536)
    row = dict(tokens=1, gemv_us=21.4, plain_gemv_us=27.5, dequant_gemm_us=18.0)
    assert engine_path(row, k, has_layout=True) == "dequant_gemm"
    row = dict(tokens=1, gemv_us=21.4, plain_gemv_us=27.5, dequant_gemm_us=20.9)  # within 5%
    assert engine_path(row, k, has_layout=True) == "gemv"
    gate = make_spec(k_in=4096, n_out=14336, v=16, k=65536, kr=65536)  # too large for dequant
    row = dict(tokens=1, gemv_us=77.1, plain_gemv_us=105.1, dequant_gemm_us=20.0)
    assert engine_path(row, gate, has_layout=True) == "gemv"
    row = dict(tokens=4, gemv_us=70.0, plain_gemv_us=60.0, dequant_gemm_us=65.0)  # no tuning
    assert engine_path(row, q, has_layout=True) == "dequant_gemm"
    assert engine_path(dict(tokens=512, dequant_gemm_us=55.0), q, has_layout=True) == (
        "dequant_gemm"
    )


@pytest.mark.parametrize(
    "name, copies",
    [("v8-k65536-r256", 8), ("v4-k16384-r256", 16), ("v2-k65536-r256", 32),
     ("v12-k65536-r4096-pad", 1), ("v8-k65536", 1)],
)  # fmt: skip
def test_a_small_residual_codebook_is_copied_once_per_lane_of_a_wavefront(name, copies):
    """res_copies (csrc/vptq.h): lane i reads copy i % copies of each residual codeword, so
    the copies are each codeword `copies` times in a row, and the shared memory holds them."""
    spec, _, args, layout = build(name)
    assert sliced.res_copies(spec.vector_len, layout.meta[9]) == copies
    if not spec.num_res_centroids:
        assert layout.res_table is None
        return
    res = args[2].reshape(-1, spec.vector_len)  # the residual codebook as the checkpoint has it
    assert layout.meta[9] == res.shape[0]  # held whole in every block, not sliced
    assert torch.equal(layout.res_table, res.repeat_interleave(copies, 0))
    # 128 bytes of copies a codeword: each lane of a wavefront its own bank(s)
    assert copies == 1 or copies * spec.vector_len * 2 == 128
    without = sliced.smem_bytes(spec.vector_len, layout.meta[4], 0, layout.meta[10], 1,
                                layout.meta[6])  # fmt: skip
    with_res = sliced.smem_bytes(*(layout.meta[i] for i in (2, 4, 9, 10)), 1, layout.meta[6])
    assert with_res - without == -(-res.numel() * 2 * copies // 16) * 16


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_res_copies_mirrors_the_kernels_rule(tmp_path):
    """engine/memory.py res_copies against csrc/vptq.h res_copies, compiled and run on the
    host (no GPU needed)."""
    repo = Path(__file__).parents[2]
    grid = [(v, r) for v in (2, 4, 6, 8, 10, 12, 16) for r in (0, 1, 16, 255, 256, 257, 512, 4096)]
    src = tmp_path / "copies.cu"
    src.write_text(
        '#include <cstdio>\n#include "vptq.h"\nint main() {\n'
        + "".join(f'  std::printf("%d\\n", vptq::res_copies({v}, {r}));\n' for v, r in grid)
        + "  return 0;\n}\n"
    )
    exe = tmp_path / "copies"
    subprocess.run(["nvcc", "-std=c++17", f"-I{repo / 'csrc'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True)  # fmt: skip
    got = [int(line) for line in subprocess.run([exe], capture_output=True, text=True,
                                                check=True).stdout.split()]  # fmt: skip
    assert got == [sliced.res_copies(v, r) for v, r in grid]
    assert {8, 16, 32, 1} <= set(got)


def test_a_consumer_gpu_takes_half_slices_where_the_full_one_and_the_residual_copies_overflow():
    """Llama-3.1-8B's q in v8-k65536-256 on an RTX 4090 (99 KiB a block, 1 KiB of it static):
    the full plan takes 64 KiB of slice (4096 codewords x 16 bytes), 32 KiB of residual copies
    (256 codewords x 8 copies x 16 bytes), 16400 bytes of xhat (4097 floats) and 2 KiB of
    accumulators (row blocks of 64 rows x 8 x 4 bytes): 116752 bytes, over 100352. Half
    slices, with twice the parts and so row blocks of 128 rows, take 86032."""
    spec = make_spec(k_in=4096, n_out=4096, v=8, k=65536, kr=256)
    full = sliced.LayerPlan(slice_cw=4096, small=True)
    assert sliced.layer_plan(spec) == sliced.layer_plan(spec, HOPPER) == full
    assert sliced.layer_plan(spec, A100) == full
    meta = sliced.layer_meta(spec, full, CONSUMER)
    assert meta[4:6] == [4096, 16] and meta[9:11] == [256, 64]
    assert sliced.smem_bytes(8, 4096, 256, 64, 1, 4096) == 116752 > (99 << 10) - 1024
    assert sliced.meta_tokens(meta, CONSUMER.smem_optin) == 0
    half = sliced.layer_plan(spec, CONSUMER)
    assert half == sliced.LayerPlan(slice_cw=2048, small=True)
    meta = sliced.layer_meta(spec, half, CONSUMER)
    assert meta[4:6] == [2048, 32] and meta[9:11] == [256, 128]
    assert sliced.smem_bytes(8, 2048, 256, 128, 1, 4096) == 86032
    assert sliced.meta_tokens(meta, CONSUMER.smem_optin) == 1
    # the size bound counts the 16 more segments of each of the 512 rows: 15 entries of
    # padding at most (6 bytes each with the residual code) and an offset each
    extra = sliced.layout_bytes(spec, gpu=CONSUMER) - sliced.layout_bytes(spec)
    assert extra == 8192 * (15 * 6 + 4)
    # gate in v8-k65536-4096: its 64 KiB residual codebook leaves no room for a slice and its
    # accumulators, so it is sliced with the main codebook (69632 codewords in 17 slices)
    gate = make_spec(k_in=4096, n_out=14336, v=8, k=65536, kr=4096)
    assert sliced.layer_plan(gate, A100) == full
    assert sliced.layer_plan(gate, CONSUMER) == sliced.LayerPlan(slice_cw=4096, small=False)
    meta = sliced.layer_meta(gate, sliced.layer_plan(gate, CONSUMER), CONSUMER)
    assert meta[3:6] == [69632, 4096, 17] and meta[9] == 0


# The test layers whose plan on an older GPU is not the full one (the rest keep it)
REPLANNED = {
    ("v8-k65536-r256", "consumer"): sliced.LayerPlan(4096, small=False),
    ("v4-k16384-r256", "consumer"): sliced.LayerPlan(4096, small=True),
    ("v2-k65536-r256", "consumer"): sliced.LayerPlan(8192, small=True),
    ("v12-k65536-r4096-pad", "consumer"): sliced.LayerPlan(2728, small=False),
    ("v12-k65536-r4096-pad", "a100"): sliced.LayerPlan(2728, small=False),
}


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("name", sorted(SLICED))
def test_layouts_planned_for_an_older_gpu_reproduce_the_oracle_and_fit_it(name, gpu):
    """On the shared memory of an A100 or an RTX 4090 a layout is cut finer or its residual
    sliced (layer_plan) where the full plan leaves no room for a token; the layout still gives
    x W^T exactly, takes at least one token there, and stays within its size bound."""
    g = GPUS[gpu]
    spec = make_spec(**SLICED[name])
    plan = sliced.layer_plan(spec, g)
    assert plan == REPLANNED.get((name, gpu), sliced.layer_plan(spec))
    layer = random_layer(spec, seed=len(name), dtype=torch.float64)
    args = dequant_args(layer)
    layout = sliced.build(args, spec, g.num_sms, g.smem_optin)
    assert layout.meta[4] == plan.slice_cw and (layout.meta[9] > 0) == (
        plan.small and spec.num_res_centroids > 0
    )
    assert layout.table_is_copy == (spec.num_res_centroids > 0 and not plan.small)
    assert layout.max_tokens >= 1
    v, slice_cw, res_cw, row_block, chunk_cols = (layout.meta[i] for i in (2, 4, 9, 10, 6))
    smem = sliced.smem_bytes(v, slice_cw, res_cw, row_block, layout.max_tokens, chunk_cols)
    assert smem + sliced.STATIC_SMEM <= g.smem_optin
    x = torch.randn(2, spec.in_features, dtype=torch.float64)
    bias = None if layer.bias is None else torch.tensor(layer.bias)
    got = sliced.linear_reference(x, layout, args[7], args[8], bias).numpy()
    want = x.numpy() @ oracle_dense(layer).T + (0 if layer.bias is None else layer.bias)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    estimate = sliced.layout_bytes(spec, elem=8, gpu=g)
    assert layout.nbytes - layout.counters.numel() * 4 <= estimate <= 1.1 * layout.nbytes + 4096


def test_where_one_wave_of_row_blocks_does_not_fit_they_take_several():
    """Llama-3.1-8B's gate on a Tesla T4 (40 SMs, 64 KiB a block): one wave's row blocks of
    1792 vector-rows take 56 KiB of accumulators, beside a slice of any size and a chunk of
    xhat (16 KiB), so no one-wave plan fits; row blocks as large as the rest of the shared
    memory holds, in several waves, do. Where a one-wave plan fits, it is kept."""
    gate = make_spec(k_in=4096, n_out=14336, v=8, k=65536)
    for slice_cw in (4096, 2048, 1024, 512, 256):
        one_wave = sliced.layer_meta(gate, sliced.LayerPlan(slice_cw, False), T4)
        assert sliced.meta_tokens(one_wave, T4.smem_optin) == 0
    plan = sliced.layer_plan(gate, T4)
    assert plan == sliced.LayerPlan(slice_cw=2048, small=False, waves=True)
    meta = sliced.layer_meta(gate, plan, T4)
    n_slices, rows, row_block, row_blocks = meta[5], meta[8], meta[10], meta[11]
    # the accumulators (32 bytes a vector-row) take what a 32 KiB slice, 4097 floats of xhat
    # (16400 bytes, aligned) and the static 1 KiB leave
    room = (64 << 10) - (32 << 10) - 16400 - 1024
    assert sliced.largest_row_block(8, 2048, 0, T4.smem_optin) == room // 32 == 479
    exact = sliced.smem_bytes(8, 2048, 0, 479, 1, memory.CHUNK_COLS) + 1024  # to the byte
    assert [sliced.largest_row_block(8, 2048, 0, exact - d) for d in (0, 1)] == [479, 478]
    assert (row_block, row_blocks) == (448, 4) and rows == 1792  # 4 even row blocks of <= 479
    assert row_blocks * n_slices > 2 * T4.num_sms  # more blocks than a wave
    assert sliced.meta_tokens(meta, T4.smem_optin) == 1
    assert sliced.smem_bytes(8, 2048, 0, row_block, 1, meta[6]) + 1024 <= 64 << 10
    for gpu in (HOPPER, A100, CONSUMER):  # one wave fits there: those plans are as they were
        assert not sliced.layer_plan(gate, gpu).waves
    # a layout in waves gives x W^T exactly (a narrow layer on a 4-SM GPU of 64 KiB)
    small = sliced.GPU(num_sms=4, smem_optin=64 << 10)
    spec = make_spec(k_in=256, n_out=12288, v=8, k=65536)  # 1536 vector-rows
    assert sliced.layer_plan(spec, small).waves
    layer = random_layer(spec, seed=5, dtype=torch.float64)
    args = dequant_args(layer)
    layout = sliced.build(args, spec, small.num_sms, small.smem_optin)
    assert layout.meta[11] > 1 and layout.counters.numel() == layout.meta[11]
    assert layout.max_tokens >= 1
    x = torch.randn(2, spec.in_features, dtype=torch.float64)
    got = sliced.linear_reference(x, layout, args[7], args[8], None).numpy()
    np.testing.assert_allclose(got, x.numpy() @ oracle_dense(layer).T, rtol=1e-12, atol=1e-12)


def test_a_layer_no_plan_fits_gets_no_layout():
    """16 KiB a block holds not even a chunk's xhat (16 KiB): no plan, so the layer is not
    eligible there, counts no bytes, is never chosen, and build refuses it."""
    tiny = sliced.GPU(num_sms=7, smem_optin=16 << 10)
    spec, _, args, _ = build("v8-k65536")
    assert sliced.eligible(spec) and sliced.eligible(spec, CONSUMER)
    assert sliced.layer_plan(spec, tiny) is None and not sliced.eligible(spec, tiny)
    assert sliced.layout_bytes(spec, gpu=tiny) == 0 == sliced.model_bytes([spec, spec], tiny)
    assert sliced.model_bytes([spec, spec], CONSUMER) == 2 * sliced.layout_bytes(spec, gpu=CONSUMER)
    assert sliced.choose([spec], 1 << 40, tiny) == [] and sliced.choose([spec], 1 << 40) == [0]
    with pytest.raises(ValueError, match="does not take this layer"):
        sliced.build(args, spec, tiny.num_sms, tiny.smem_optin)


def _planned(spec, gpu):
    """A layout with its meta and no entries, for the launch planners."""
    plan = sliced.layer_plan(spec, gpu)
    meta = sliced.layer_meta(spec, plan, gpu)
    empty = torch.zeros(0, dtype=torch.int32)
    return sliced.SlicedLayout(
        entries=empty, res_codes=None, offsets=empty, table=empty, res_table=None,
        counters=torch.zeros(meta[11], dtype=torch.int32), meta=meta,
        max_tokens=sliced.meta_tokens(meta, gpu.smem_optin),
        table_is_copy=spec.num_res_centroids > 0 and not plan.small,
    )  # fmt: skip


def test_layers_do_not_share_a_launch_whose_row_blocks_leave_no_room_for_a_token():
    """Llama-3.1-8B's gate and up in v8-k65536-4096 on an A100 each take a token alone, but a
    shared launch's row blocks of twice the rows would need more shared memory than a block
    has; q, k and v share one."""
    gate = make_spec(k_in=4096, n_out=14336, v=8, k=65536, kr=4096)
    pair = [_planned(gate, A100), _planned(gate, A100)]
    assert [a.max_tokens for a in pair] == [1, 1]
    assert sliced.groupable(pair) and sliced.group(pair, 108, A100.smem_optin).max_tokens == 0
    assert not sliced.worth_sharing(pair, 108, A100.smem_optin)
    q, kv = (make_spec(k_in=4096, n_out=n, v=8, k=65536, kr=4096) for n in (4096, 1024))
    three = [_planned(q, A100), _planned(kv, A100), _planned(kv, A100)]
    assert sliced.worth_sharing(three, 108, A100.smem_optin)
    assert sliced.group(three, 108, A100.smem_optin).max_tokens == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_the_kernel_takes_the_tokens_the_planner_gives_on_each_gpu(tmp_path):
    """meta_tokens against csrc/vptq_sliced.cu sliced_supported (the check before a launch),
    compiled and run on the host, for the plans of Llama-3.1-8B's projections in each scheme
    with a residual codebook on an H100, an A100, an RTX 4090 and a Tesla T4 (full slices, half
    slices, sliced residuals, row blocks in waves): the kernel takes T tokens exactly where the
    planner's tile of T fits."""
    repo = Path(__file__).parents[2]
    cases, waves = [], 0
    for kr in (0, 256, 4096):
        for k_in, n_out in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)):
            spec = make_spec(k_in=k_in, n_out=n_out, v=8, k=65536, kr=kr)
            for gpu in (HOPPER, A100, CONSUMER, T4):
                plan = sliced.layer_plan(spec, gpu)
                cases.append((sliced.layer_meta(spec, plan, gpu), gpu.smem_optin))
                waves += plan.waves
    assert waves >= 3  # on the T4: gate, up and more, in row blocks of several waves
    kinds = {(m[4], m[9] > 0, m[3]) for m, _ in cases}  # slice, small residual, codewords
    assert {(4096, True, 65536), (2048, True, 65536), (4096, False, 69632)} <= kinds
    stub = "cudaError_t launch_sliced_tile{0}(const SlicedGroup&, const void*, int, DType, " \
        "cudaStream_t) {{ return cudaErrorNotSupported; }}\n"  # fmt: skip
    fields = "N K v n_cw slice_cw n_slices chunk_cols n_chunks rows res_cw row_block row_blocks"
    body = ""
    for meta, optin in cases:
        body += "  { vptq::SlicedLayer L; "
        body += "".join(f"L.{f} = {m}; " for f, m in zip(fields.split(), meta, strict=True))
        body += f'for (int t = 1; t <= 8; ++t) std::printf("%d ", vptq::sliced_supported(L, t, {optin})); }}\n'  # noqa: E501
    src = tmp_path / "supported.cu"
    src.write_text(
        '#include <cstdio>\n#include "vptq.h"\nnamespace vptq {\n'
        + "".join(stub.format(nt) for nt in (1, 2, 4, 8))
        + "}\nint main() {\n"
        + body
        + "  return 0;\n}\n"
    )
    exe = tmp_path / "supported"
    subprocess.run(["nvcc", "-std=c++17", f"-I{repo / 'csrc'}", "-gencode",
                    "arch=compute_90a,code=sm_90a", str(src), str(repo / "csrc" / "vptq_sliced.cu"),
                    "-o", str(exe)], check=True, capture_output=True)  # fmt: skip
    out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split()
    got = np.array([int(b) for b in out]).reshape(len(cases), 8)

    def tile(t):
        return next(nt for nt in sliced.TOKEN_TILES if nt >= t)

    want = [[int(tile(t) <= sliced.meta_tokens(m, o)) for t in range(1, 9)] for m, o in cases]
    assert got.tolist() == want
    assert got[:, 0].all()  # every plan takes one token


@pytest.mark.parametrize("gpu", [None, "a100", "consumer"])
def test_the_apps_estimate_is_what_the_engine_counts(gpu):
    """The app's fit check (engine/sliced_plan.py model_layout_bytes, torch-free, from the
    config and the name's scheme) against the engine's own count of a loaded model's layouts
    (sliced.layout_bytes of each layer's VQLayerSpec), Llama-3.1-8B in every benchmarked scheme."""
    from engine import bench_e2e
    from engine.bench import SCHEMES
    from engine.memory import Shape, projections
    from engine.sliced_plan import model_layout_bytes

    g = GPUS.get(gpu)
    shape = Shape.from_config(bench_e2e.config("llama-3.1-8b"))
    for scheme, (v, k, kr) in SCHEMES.items():
        specs = [bench_e2e.scheme_spec(scheme, a, b) for a, b in projections(shape)]
        engine = shape.layers * sum(sliced.layout_bytes(s, gpu=g) for s in specs)
        assert model_layout_bytes(shape, v, k, kr, g) == engine > 0, scheme


def test_hopper_keeps_the_full_plan_of_every_benchmarked_layer():
    """On an H100 or H200 (132 SMs, 227 KiB a block) every projection of Llama-3.1-8B and 70B
    in every benchmarked scheme keeps the full slice and its residual kind: the plans measured
    in csrc/KERNELS.md are the ones layer_plan gives there."""
    from engine import bench_e2e
    from engine.bench import SCHEMES
    from engine.memory import Shape, projections

    for arch in ("llama-3.1-8b", "llama-3.1-70b"):
        shape = Shape.from_config(bench_e2e.config(arch))
        for scheme in SCHEMES:
            for a, b in projections(shape):
                spec = bench_e2e.scheme_spec(scheme, a, b)
                assert sliced.layer_plan(spec, HOPPER) == sliced.layer_plan(spec), (arch, scheme)
                assert sliced.layer_plan(spec, sliced.GPU(114, OPTIN)) == sliced.layer_plan(spec)


def test_the_shared_memory_of_a_call_counted_by_hand():
    """smem_bytes as csrc/vptq_sliced.cuh plan() lays it out: the codebook slice, the residual
    copies, the activations of a chunk plus a zero column, the accumulators; each part rounded
    up to 16 bytes."""
    # 4096 x 8 fp16 codewords; (128 + 1) x 4 tokens fp32; 32 rows x 8 x 4 tokens fp32
    assert sliced.smem_bytes(8, 4096, 0, 32, 4, 128) == 65536 + 2064 + 4096
    # 999 x 6 x 2 = 11988 -> 12000; 35 x 2 x 4 = 280 -> 288; 7 x 6 x 2 x 4 = 336
    assert sliced.smem_bytes(6, 999, 0, 7, 2, 34) == 12000 + 288 + 336
