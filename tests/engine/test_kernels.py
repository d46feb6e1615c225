"""The CUDA kernels against the reference ops and the float64 oracle (marker gpu)."""

import os
import zlib

import numpy as np
import pytest
import torch

from engine import ops
from engine.ops import arch, cuda, reference, sliced
from engine.ops.decode import Partial

from .test_sliced import SLICED
from .test_vptq_reference import VARIANTS
from .vq_factory import dequant_args, make_spec, oracle_dense, random_layer

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]
DTYPES = [torch.float16, torch.bfloat16]


def gpu_args(layer, dtype):
    return tuple(
        None if a is None else (a.to(dtype) if a.is_floating_point() else a).cuda()
        for a in dequant_args(layer)
    )


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


LARGE = {  # odd, realistic and padded shapes on top of the reference test's variants
    "8b-q-v8-k65536": dict(k_in=256, n_out=2048, v=8, k=65536),
    # edges of the 65536-entry GEMV: odd K (one index in the last word), N not a multiple of 8
    "v8-k65536-cluster-odd": dict(k_in=1001, n_out=4100, v=8, k=65536, bias=True),
    "v8-k65536-cluster-nonorm": dict(k_in=4096, n_out=512, v=8, k=65536, norm=False, perm=False),
    "v8-k65536-256": dict(k_in=1000, n_out=300, v=8, k=65536, kr=256),
    "v12-k65536-4096-pad": dict(k_in=768, n_out=1028, v=12, k=65536, kr=4096),
    "v16-k65536-65536": dict(k_in=640, n_out=256, v=16, k=65536, kr=65536),
    # the wide GEMV (16- and 32-bit index fields): groups with N not a multiple of 8, v=8 with a
    # 65536-entry residual, and more vector-rows than the resident warps (a warp takes several)
    "v8-k65536-groups-wide": dict(k_in=1024, n_out=1000, v=8, k=65536, g=2, bias=True),
    "v8-k65536-65536": dict(k_in=768, n_out=264, v=8, k=65536, kr=65536),
    "v8-k65536-tall": dict(k_in=512, n_out=20000, v=8, k=65536),
    "v6-k4096": dict(k_in=333, n_out=130, v=6, k=4096),
    # dequant's eight-columns-a-thread kernel: v = 6 with a residual, the last vector-row cut
    # short (130 rows), groups of columns
    "v6-k4096-r256-groups": dict(k_in=336, n_out=130, v=6, k=4096, kr=256, g=2),
    "v10-k2048-r8192": dict(k_in=300, n_out=77, v=10, k=2048, kr=8192),
    "v4-k16-groups": dict(k_in=512, n_out=64, v=4, k=16, g=4),
    "v2-k2-nonorm": dict(k_in=96, n_out=9, v=2, k=2, norm=False, perm=False, bias=True),
}
ALL = {**VARIANTS, **LARGE}
_ORACLES: dict = {}


def layer_and_oracle(name, dtype):
    """One random layer per (variant, dtype) with its float64 oracle, computed once."""
    if (name, dtype) not in _ORACLES:
        layer = random_layer(make_spec(**ALL[name]), seed=len(name), dtype=dtype)
        _ORACLES[name, dtype] = layer, oracle_dense(layer)
    return _ORACLES[name, dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ALL))
def test_dequant_kernel_matches_reference(name, dtype):
    spec = make_spec(**ALL[name])
    if not spec.packed:
        pytest.skip("unpacked indices are packed at load time; the kernels see packed ones")
    layer = random_layer(spec, seed=hash(name) % 1000, dtype=dtype)
    args = gpu_args(layer, dtype)
    want = reference.vptq_dequant(*args, spec=spec, dtype=dtype)
    got = ops.vptq_dequant(args, spec, dtype)
    assert got.dtype == dtype and got.shape == (spec.out_features, spec.in_features)
    # same fp32 math, one rounding: at most one unit in the last place apart
    ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(1e-3)
    assert ((got.float() - want.float()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("name", sorted(ALL))
def test_linear_matches_oracle(name, tokens, dtype):
    spec = make_spec(**ALL[name])
    if not spec.packed:
        pytest.skip("unpacked indices are packed at load time")
    layer, dense = layer_and_oracle(name, dtype)
    args = gpu_args(layer, dtype)
    bias = None if layer.bias is None else torch.tensor(layer.bias).to(dtype).cuda()
    x = torch.randn(tokens, spec.in_features, dtype=torch.float64)
    want = x.numpy() @ dense.T + (0 if layer.bias is None else layer.bias)
    out = torch.full((tokens, spec.out_features), float("nan"), dtype=dtype, device="cuda")
    out[:] = ops.vptq_linear(x.to(dtype).cuda(), bias, args, spec)  # every element written
    assert torch.isfinite(out).all()
    # rounding x and the output to 16 bits dominates: ~1e-3 (fp16), ~8e-3 (bf16)
    assert rel_err(out.double().cpu(), want) < (4e-3 if dtype == torch.float16 else 2e-2)
    # and the kernel is at least as close to the oracle as dequant + cuBLAS in the same dtype,
    # up to the spread of a rounding error's relative norm over few outputs (eps / sqrt(n): a
    # 9-output bf16 layer measured 0.0041 against 1.5 x 0.0016 for one random x)
    ref = reference.vptq_linear(x.to(dtype).cuda(), bias, *args, spec=spec)
    spread = max(1e-4, torch.finfo(dtype).eps / np.sqrt(out.numel()))
    assert rel_err(out.double().cpu(), want) <= 1.5 * rel_err(ref.double().cpu(), want) + spread


def test_fused_path_is_taken_for_few_tokens():
    spec = make_spec(k_in=512, n_out=256, v=8, k=65536)
    assert cuda.fused_tokens(spec) == cuda.GEMV_MAX_TOKENS == 4
    assert cuda.fused_tokens(make_spec(v=4, k=16, v0=4, k0=16, p=8, k_in=96)) == 0  # outliers


def cuda_kernels_run(fn) -> list[str]:
    """The names of the CUDA kernels fn() launches (torch.profiler)."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if "kernel" in e.key]


@pytest.mark.parametrize(
    "name,wide",
    [
        ("8b-q-v8-k65536", True),  # 16-bit index fields
        ("v8-k65536-256", True),  # 24: main and residual
        ("v12-k65536-4096-pad", True),  # 28, v = 12
        ("v16-k65536-65536", True),  # 32, v = 16
        ("v8-k65536-groups-wide", True),
        ("v8-k65536-cluster-odd", False),  # K = 1001: octets would cross a row's end
        ("v6-k4096", False),  # 12-bit fields
    ],
)
def test_plain_gemv_takes_the_wide_kernel_where_it_applies(name, wide):
    """The oracle tests above pass on either plain kernel; this checks that the wide one
    (csrc/vptq_gemv.cuh) is what the community schemes' layers get (csrc/vptq_kernels.cu
    wide_ok), so that those tests cover it, and none under VPTQ_WIDE_GEMV=0 (test_switches.py
    runs this file so)."""
    wide = wide and os.environ.get("VPTQ_WIDE_GEMV") != "0"
    spec = make_spec(**ALL[name])
    layer, _dense = layer_and_oracle(name, torch.float16)
    args = gpu_args(layer, torch.float16)
    x = torch.randn(1, spec.in_features, dtype=torch.float16, device="cuda")
    names = cuda_kernels_run(lambda: ops.vptq_linear(x, None, args, spec))
    assert any("gemv_wide_kernel" in n for n in names) == wide, names
    assert any("gemv_kernel<" in n for n in names) != wide, names


@pytest.mark.parametrize("name", ["8b-q-v8-k65536", "v8-k65536-256", "outliers", "groups"])
def test_opcheck(name):
    spec = make_spec(**ALL[name])
    args = gpu_args(random_layer(spec), torch.float16)
    torch.library.opcheck(torch.ops.vptq.dequant.default, (*args, cuda.meta(spec)))
    if cuda.fused_tokens(spec):
        indices, centroids, res, _, _, perm, _, scale, wbias = args
        x = torch.randn(2, spec.in_features, dtype=torch.float16, device="cuda")
        torch.library.opcheck(
            torch.ops.vptq.gemv.default,
            (x, indices, centroids, res, perm, scale, wbias, None, cuda.meta(spec)),
        )


def replayed(fn):
    """fn() captured in a CUDA graph and replayed: its output (copied out of the graph's
    memory pool, which goes with the graph)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out.clone()


def test_gemv_is_cuda_graph_capturable():
    spec = make_spec(k_in=4096, n_out=1024, v=8, k=65536, kr=256)
    args = gpu_args(random_layer(spec), torch.float16)
    x = torch.randn(1, 4096, dtype=torch.float16, device="cuda")
    eager = ops.vptq_linear(x, None, args, spec)
    assert torch.equal(replayed(lambda: ops.vptq_linear(x, None, args, spec)), eager)


def test_whole_random_model_gpu_matches_cpu(tmp_path):
    from engine.loader import load_model

    from .test_loader import build_vptq_model

    build_vptq_model(tmp_path, torch.float16)
    cpu = load_model(tmp_path, "cpu", torch.float32, max_seq_len=32)
    gpu = load_model(tmp_path, "cuda", torch.float16, max_seq_len=32)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = cpu.model(tokens)
        got = gpu.model(tokens.cuda()).cpu()  # prefill: dequant + GEMM
        steps = [gpu.model(tokens[:, :4].cuda()).cpu()]  # then fused GEMV, one token a step
        steps += [gpu.model(tokens[:, i : i + 1].cuda(), start=i).cpu() for i in range(4, 12)]
    assert rel_err(got, want) < 1e-2
    assert rel_err(torch.cat(steps, 1), want) < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
def test_demo_model_greedy_tokens_match_the_cpu_reference():
    """The demo model (VPTQ-quantized SmolLM2) answers with the same greedy tokens on the GPU
    (kernels, CUDA-graph decode, fp16) as on the CPU reference path in float32."""
    from engine.generate import Session
    from engine.models import resolve_model
    from engine.sampling import SamplingParams

    path = os.environ.get("VPTQ_TEST_DEMO") or resolve_model("demo")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    runs = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float16)):
        session = Session.load(path, device, dtype, max_seq_len=256)
        ids, _ = session.prompt_ids(messages=messages, max_new_tokens=24)
        gen = session.generate(ids, params)
        runs[device] = (gen.tokens, "".join(gen), gen.stats.cuda_graph, session.kernels)
    tokens, text, graph, kernels = runs["cuda"]
    assert kernels == "cuda" and graph
    assert "Paris" in text, text
    assert tokens == runs["cpu"][0], (text, runs["cpu"][1])


# ---- the sliced GEMV (csrc/vptq_sliced.cuh) ----

SLICED_LARGE = {  # real shapes, many row blocks and slices; oracle: the float64 reference op
    "8b-k-v8-k65536": dict(k_in=4096, n_out=1024, v=8, k=65536),
    "8b-down-v8-k65536-chunks": dict(k_in=14336, n_out=512, v=8, k=65536),
    "v8-k65536-r256": dict(k_in=4096, n_out=2056, v=8, k=65536, kr=256, bias=True),
    "v8-k65536-r65536": dict(k_in=1024, n_out=1024, v=8, k=65536, kr=65536),
    "v12-k65536-r4096": dict(k_in=4096, n_out=1028, v=12, k=65536, kr=4096),
    "v16-k65536-r65536": dict(k_in=2048, n_out=512, v=16, k=65536, kr=65536),
    "v8-k65536-noperm-nonorm": dict(k_in=4096, n_out=512, v=8, k=65536, norm=False, perm=False),
}


def device_layout(spec, args, ctas_per_sm=None):
    props = torch.cuda.get_device_properties(0)
    return sliced.build(args, spec, props.multi_processor_count, arch.smem_optin(), ctas_per_sm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("name", sorted(SLICED))
def test_sliced_gemv_matches_oracle(name, tokens, dtype):
    spec = make_spec(**SLICED[name])
    if (name, dtype) not in _ORACLES:
        layer = random_layer(spec, seed=len(name), dtype=dtype)
        _ORACLES[name, dtype] = layer, oracle_dense(layer)
    layer, dense = _ORACLES[name, dtype]
    args = gpu_args(layer, dtype)
    layout = device_layout(spec, args)
    if tokens > layout.max_tokens:
        pytest.skip(f"{tokens} tokens take dequant + GEMM for this layer")
    bias = None if layer.bias is None else torch.tensor(layer.bias).to(dtype).cuda()
    # a fixed x per case: a random one made the 10-output bf16 layer fail the bound below for
    # about one draw in 300 (simulated with sliced.linear_reference rounded to bf16)
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{tokens}".encode()))
    x = torch.randn(tokens, spec.in_features, dtype=torch.float64, generator=g)
    want = x.numpy() @ dense.T + (0 if layer.bias is None else layer.bias)
    out = cuda.gemv_sliced(x.to(dtype).cuda(), bias, layout, args)
    assert out.shape == (tokens, spec.out_features) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out.double().cpu(), want) < (4e-3 if dtype == torch.float16 else 2e-2)
    ref = reference.vptq_linear(x.to(dtype).cuda(), bias, *args, spec=spec)
    # the spread of a rounding error's norm over few outputs, as in test_linear_matches_oracle
    spread = max(1e-4, torch.finfo(dtype).eps / np.sqrt(out.numel()))
    assert rel_err(out.double().cpu(), want) <= 1.5 * rel_err(ref.double().cpu(), want) + spread
    again = cuda.gemv_sliced(x.to(dtype).cuda(), bias, layout, args)
    assert torch.equal(out, again)  # deterministic, and the tickets were reset
    assert not layout.counters.any()
    # the sums left to the reader: the bias, then each part's (a slice of a column chunk, slice
    # 0's with dot(x, b) over the chunk); added in that order they are the output bit for bit
    part = cuda.gemv_sliced(x.to(dtype).cuda(), bias, layout, args, partial=True)
    assert isinstance(part, Partial) and part.dtype == dtype
    assert part.parts.shape == (sliced.parts(layout.meta) + 1, tokens, spec.out_features)
    bias0 = torch.zeros(tokens, spec.out_features) if bias is None else bias.float().cpu()
    assert torch.equal(part.parts[0].cpu(), bias0.expand(tokens, -1))
    assert torch.equal(part.whole(), out)
    assert not layout.counters.any()  # no tickets taken


@pytest.mark.parametrize("ctas_per_sm", [1, 2, 4])  # 4: half-size row blocks in two waves
@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("name", sorted(SLICED_LARGE))
def test_sliced_gemv_real_shapes(name, tokens, ctas_per_sm):
    spec = make_spec(**SLICED_LARGE[name])
    layer = random_layer(spec, seed=3, dtype=torch.float16)
    args = gpu_args(layer, torch.float16)
    layout = device_layout(spec, args, ctas_per_sm)
    # many slices, and many row blocks where a wave has room for more than one a part (the
    # halved slices of a 64 KiB GPU, VPTQ_CUDA_ARCH=75, fill a wave alone: launch_shape)
    wave = torch.cuda.get_device_properties(0).multi_processor_count * ctas_per_sm
    several = wave // sliced.parts(layout.meta) > 1 and layout.meta[8] > 1
    assert layout.meta[5] > 1 and (layout.meta[11] > 1 or not several)
    if tokens > layout.max_tokens:
        pytest.skip("too many tokens for this layer's shared memory")
    bias = None if layer.bias is None else torch.tensor(layer.bias).half().cuda()
    x = torch.randn(tokens, spec.in_features, device="cuda")
    out = cuda.gemv_sliced(x.half(), bias, layout, args)
    args64 = tuple(None if a is None or not a.is_floating_point() else a.double() for a in args)
    args64 = tuple(a if a64 is None else a64 for a, a64 in zip(args, args64, strict=True))
    want = reference.vptq_linear(x.double(), bias if bias is None else bias.double(), *args64,
                                 spec=spec)  # fmt: skip
    assert rel_err(out.double().cpu(), want.cpu()) < 4e-3


WAVES = {  # layers whose row blocks take several waves on the GPU named (sliced_plan.py)
    "narrow-on-4-sms": (dict(k_in=256, n_out=12288, v=8, k=65536), sliced.GPU(4, 64 << 10)),
    "8b-gate-on-a-t4": (dict(k_in=4096, n_out=14336, v=8, k=65536), sliced.GPU(40, 64 << 10)),
}


@pytest.mark.parametrize("name", sorted(WAVES))
def test_sliced_gemv_in_several_waves_of_row_blocks(name):
    """Where one wave's row blocks do not fit a GPU of few SMs and 64 KiB a block (a Tesla T4,
    an RTX 2080), the plan takes row blocks in several waves (LayerPlan.waves): that launch,
    run here, gives the float64 reference's sums, and leaves its tickets reset."""
    spec_args, gpu = WAVES[name]
    spec = make_spec(**spec_args)
    assert sliced.layer_plan(spec, gpu).waves
    layer = random_layer(spec, seed=11, dtype=torch.float16)
    args = gpu_args(layer, torch.float16)
    layout = sliced.build(args, spec, gpu.num_sms, gpu.smem_optin)
    assert layout.meta[11] * sliced.parts(layout.meta) > 2 * gpu.num_sms
    assert layout.max_tokens >= 1
    x = torch.randn(layout.max_tokens, spec.in_features, device="cuda")
    out = cuda.gemv_sliced(x.half(), None, layout, args)
    args64 = tuple(None if a is None or not a.is_floating_point() else a.double() for a in args)
    args64 = tuple(a if a64 is None else a64 for a, a64 in zip(args, args64, strict=True))
    want = reference.vptq_linear(x.double(), None, *args64, spec=spec)
    assert rel_err(out.double().cpu(), want.cpu()) < 4e-3
    assert not layout.counters.any()


# Run in a fresh process, where no launch has yet raised the kernel's shared-memory limit:
# threads, each on its own stream with its own copy of a layer (its own tickets), all launch
# at once, half with a layer that needs more shared memory than the other half's. Each prints
# whether its sums equal the same call made alone afterwards.
_THREADED = """
import dataclasses, sys, threading
import torch
from engine import ops
from engine.ops import cuda, sliced
from tests.engine.vq_factory import dequant_args, make_spec, random_layer

assert ops.prepare("cuda")[0] == "cuda"
props = torch.cuda.get_device_properties(0)
layers = []
for k_in in (4096, 14336):  # the second's larger xhat chunk needs more shared memory
    spec = make_spec(k_in=k_in, n_out=512, v=8, k=65536)
    args = tuple(None if a is None else (a.half() if a.is_floating_point() else a).cuda()
                 for a in dequant_args(random_layer(spec, seed=k_in, dtype=torch.float16)))
    layout = sliced.build(args, spec, props.multi_processor_count,
                          props.shared_memory_per_block_optin)
    x = torch.randn(1, k_in, dtype=torch.float16, device="cuda")
    layers.append((layout, args, x))
smem = [sliced.smem_bytes(*(l.meta[i] for i in (2, 4, 9, 10)), 1, l.meta[6]) for l, _, _ in layers]
print("smem", *smem)
n = 8
start, outs = threading.Barrier(n), [None] * n
def go(i):
    layout, args, x = layers[i % 2]
    mine = dataclasses.replace(layout, counters=layout.counters.clone())
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        start.wait()
        outs[i] = [cuda.gemv_sliced(x, None, mine, args) for _ in range(20)]
    stream.synchronize()
threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
for i in range(n):
    layout, args, x = layers[i % 2]
    alone = cuda.gemv_sliced(x, None, layout, args)
    print("thread", i, all(torch.equal(o, alone) for o in outs[i]))
"""


def test_sliced_launches_from_several_threads_at_once():
    """The kernel's shared-memory limit is raised under a lock (csrc/vptq_sliced.cuh
    launch_kernel): host threads launching the same kernel instance for the first time, with
    different shared-memory needs, all launch and get the sums a lone launch gets."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _THREADED], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    smem = [int(n) for n in lines[0].split()[1:]]
    assert smem[0] < smem[1], smem  # the two layers do need different limits
    assert [line for line in lines if line.startswith("thread")] == [
        f"thread {i} True" for i in range(8)
    ]


@pytest.mark.parametrize("name", ["v8-k65536-r256", "8b-down-v8-k65536-chunks"])
def test_sliced_opcheck_and_graph_capture(name):
    spec = make_spec(**SLICED_LARGE[name])
    args = gpu_args(random_layer(spec), torch.float16)
    layout = device_layout(spec, args)
    _indices, _centroids, _res, _, _, _perm, _, scale, wbias = args
    bias = torch.randn(spec.out_features, dtype=torch.float16, device="cuda")
    for tokens in (1, 3):
        x = torch.randn(tokens, spec.in_features, dtype=torch.float16, device="cuda")
        torch.library.opcheck(
            torch.ops.vptq.gemv_sliced.default,
            (x, [layout.entries], [layout.res_codes], [layout.offsets], [layout.table],
             [layout.res_table], [scale], [wbias], [bias], [layout.counters], layout.meta),
        )  # fmt: skip
        torch.library.opcheck(
            torch.ops.vptq.gemv_sliced.default,
            (x, [layout.entries], [layout.res_codes], [layout.offsets], [layout.table],
             [layout.res_table], [scale], [wbias], [bias], [layout.counters], layout.meta, True),
        )  # fmt: skip
    x = torch.randn(1, spec.in_features, dtype=torch.float16, device="cuda")
    eager = ops.vptq_linear(x, bias, args, spec, layout)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.vptq_linear(x, bias, args, spec, layout)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


GROUPS = {  # layers sharing x: q, k, v-like; gate, up-like; with a small residual
    "qkv": [dict(k_in=4096, n_out=n, v=8, k=65536, bias=True) for n in (2048, 512, 512)],
    "gate-up-chunks": [dict(k_in=8300, n_out=1000, v=8, k=65536) for _ in range(2)],
    "r256": [dict(k_in=1024, n_out=n, v=8, k=65536, kr=256) for n in (640, 128)],
}


@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_sliced_group_gives_each_layer_what_it_gives_alone(name, tokens):
    specs = [make_spec(**kw) for kw in GROUPS[name]]
    layers = [random_layer(sp, seed=i, dtype=torch.float16) for i, sp in enumerate(specs)]
    args = [gpu_args(layer, torch.float16) for layer in layers]
    layouts = [device_layout(sp, a) for sp, a in zip(specs, args, strict=True)]
    props = torch.cuda.get_device_properties(0)
    plan = sliced.group(layouts, props.multi_processor_count, arch.smem_optin())
    biases = [None if ly.bias is None else torch.tensor(ly.bias).half().cuda() for ly in layers]
    x = torch.randn(tokens, specs[0].in_features, dtype=torch.float16, device="cuda")
    outs = cuda.gemv_sliced_group(x, biases, plan.layouts, args, plan.metas, plan.counters)
    for out, a, layout, bias, layer in zip(outs, args, layouts, biases, layers, strict=True):
        alone = cuda.gemv_sliced(x, bias, layout, a)
        assert torch.equal(out, alone)  # same sums in the same order, other blocks
        want = x.double().cpu().numpy() @ oracle_dense(layer).T + (
            0 if layer.bias is None else layer.bias
        )
        assert rel_err(out.double().cpu(), want) < 4e-3
    assert not any(c.any() for c in plan.counters)
    parts = cuda.gemv_sliced_group(x, biases, plan.layouts, args, plan.metas, plan.counters, True)
    assert all(torch.equal(p.whole(), out) for p, out in zip(parts, outs, strict=True))
    with pytest.raises(RuntimeError, match="2 tokens at most"):
        cuda.gemv_sliced_group(x.repeat(3, 1), biases, plan.layouts, args, plan.metas,
                               plan.counters)  # fmt: skip
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cuda.gemv_sliced_group(x, biases, plan.layouts, args, plan.metas, plan.counters)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, outs, strict=True))


def test_loader_gives_large_codebook_layers_the_sliced_layout(tmp_path, monkeypatch):
    from engine.layers import VQLinear
    from engine.loader import load_model

    from .test_loader import build_vptq_model

    build_vptq_model(tmp_path, torch.float16)
    tuned = load_model(tmp_path, "cuda", torch.float16, max_seq_len=32)
    # load-time tuning may give a layer another one-token path and free its layout
    layers = [m for m in tuned.model.modules() if isinstance(m, VQLinear)]
    assert any(sliced.eligible(m.spec) for m in layers)
    assert all(
        (m.sliced is not None or m.decode_path is not None) == sliced.eligible(m.spec)
        for m in layers
    )
    assert all(m.sliced is None for m in layers if m.decode_path is not None)
    del tuned, layers
    monkeypatch.setenv("VPTQ_TUNE_DECODE", "0")
    gpu = load_model(tmp_path, "cuda", torch.float16, max_seq_len=32)
    layers = [m for m in gpu.model.modules() if isinstance(m, VQLinear)]
    assert all((m.sliced is not None) == sliced.eligible(m.spec) for m in layers)
    # q, k, v differ in scheme here, so no launch is shared
    assert all(m.fused is None for m in gpu.model.modules() if hasattr(m, "shared_input"))
    monkeypatch.setenv("VPTQ_CHAT_SLICED", "0")
    off = load_model(tmp_path, "cuda", torch.float16, max_seq_len=32)
    assert all(m.sliced is None for m in off.model.modules() if isinstance(m, VQLinear))
    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        a = [gpu.model(tokens[:, i : i + 1], start=i) for i in range(6)]
        b = [off.model(tokens[:, i : i + 1], start=i) for i in range(6)]
    assert rel_err(torch.cat(a, 1).cpu(), torch.cat(b, 1).cpu()) < 1e-2


def test_loader_shares_one_launch_among_layers_reading_the_same_input(tmp_path, monkeypatch):
    from engine.loader import load_model

    from .test_loader import SCHEMES, build_vptq_model

    build_vptq_model(tmp_path, torch.float16, schemes={p: dict(v=8, k=65536) for p in SCHEMES})
    # without load-time tuning, which times o and down (and, launched alone, q, k, v, gate, up)
    # and may pick another path on either load: the sums compared here are the sliced GEMV's
    monkeypatch.setenv("VPTQ_TUNE_DECODE", "0")
    gpu = load_model(tmp_path, "cuda", torch.float16, max_seq_len=32)
    blocks = [m for m in gpu.model.modules() if hasattr(m, "shared_input")]
    assert len(blocks) == 4 and all(b.fused is not None for b in blocks)  # attention, MLP x 2
    assert [len(b.fused.linears) for b in blocks[:2]] == [3, 2]
    monkeypatch.setenv("VPTQ_SLICED_GROUPS", "0")
    alone = load_model(tmp_path, "cuda", torch.float16, max_seq_len=32)
    assert all(m.fused is None for m in alone.model.modules() if hasattr(m, "shared_input"))
    tokens = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        a = [gpu.model(tokens[:, i : i + 1], start=i) for i in range(6)]
        c = [alone.model(tokens[:, i : i + 1], start=i) for i in range(6)]
    assert torch.equal(torch.cat(a, 1), torch.cat(c, 1))  # the shared launch changes no sum
