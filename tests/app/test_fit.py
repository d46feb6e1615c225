"""The fit check against figures computed by hand from the published configs.

KV cache per token = 2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16).
Overhead = 768 MiB (CUDA context) + min(largest linear N*K*2 bytes, 128 MiB) (dequant slices)
         + 512 tokens x (4 hidden + 3 intermediate) x 2 bytes (prefill activations)
         + 2 x vocab x 4 bytes (logits).
"""

import os

import pytest

from app.fit import Shape, fit
from engine.sliced_plan import model_layout_bytes

from ..configs import LLAMA_31_8B, LLAMA_31_70B, QWEN_25_72B

GiB = 1 << 30


@pytest.mark.parametrize(
    ("cfg", "kv_per_token", "overhead"),
    [
        # 2*32*8*128*2; 805306368 + 117440512 + 512*(4*4096+3*14336)*2 + 2*128256*4
        (LLAMA_31_8B, 131_072, 984_590_336),
        # 2*80*8*128*2; 805306368 + 134217728 + 512*(4*8192+3*28672)*2 + 2*128256*4
        (LLAMA_31_70B, 327_680, 1_062_184_960),
        # 2*80*8*128*2; 805306368 + 134217728 + 512*(4*8192+3*29568)*2 + 2*152064*4
        (QWEN_25_72B, 327_680, 1_065_127_936),
    ],
)
def test_kv_cache_and_overhead_by_hand(cfg, kv_per_token, overhead):
    shape = Shape.from_config(cfg)
    assert shape.kv_bytes_per_token == kv_per_token
    assert shape.overhead() == overhead


def test_llama_8b_two_bit_fits_an_8_gib_card():
    f = fit(Shape.from_config(LLAMA_31_8B), 4_000_000_000, 8 * GiB, 8192)
    assert (f.free, f.reclaimed, f.host) == (8 * GiB, 0, 0)  # nothing reclaimed or on the host
    assert f.kv_cache == GiB  # 8192 x 128 KiB
    assert f.needed == 4_000_000_000 + GiB + 984_590_336
    assert f.verdict == "fits"  # 6.06 GB of 8.59 GB
    # (8589934592 - 4e9 - 984590336) // 131072 = 27506 -> 27392 in steps of 256
    assert f.max_context == 27392


def test_llama_70b_two_bit_is_tight_on_22_gib():
    f = fit(Shape.from_config(LLAMA_31_70B), 19_500_000_000, 22 * GiB, 4096)
    assert f.kv_cache == 1_342_177_280
    assert f.verdict == "tight"  # 21.90 GB of 23.62 GB: above 90 %
    # (23622320128 - 19.5e9 - 1062184960) // 327680 = 9338 -> 9216
    assert f.max_context == 9216
    assert "Largest context that fits: 9216 tokens" in f.lines()


def test_qwen_72b_does_not_fit_24_gib_and_context_is_capped_by_the_config():
    shape = Shape.from_config(QWEN_25_72B)
    f = fit(shape, 30_000_000_000, 24 * GiB, 4096)
    assert f.verdict == "does not fit" and f.max_context == 0
    assert "The weights alone do not fit" in f.lines()
    roomy = fit(shape, 21_000_000_000, 80 * GiB, 32768)
    assert roomy.verdict == "fits" and roomy.max_context == 32768  # 194557 by memory


def test_parameter_count_of_llama_8b():
    # 32 x (4096*(4096+2*1024) + 4096*4096 + 3*4096*14336 + 2*4096) + 4096 + 2*128256*4096
    assert Shape.from_config(LLAMA_31_8B).parameters() == 8_030_261_248


def test_missing_field_is_named():
    with pytest.raises(ValueError, match=r"config\.json has no 'num_hidden_layers'"):
        Shape.from_config({"hidden_size": 1, "num_attention_heads": 1})


def test_fast_decode_layout_of_llama_8b_by_hand():
    """4 bytes per lookup plus at most 15 pad entries and one 4-byte offset per segment
    (slice of 4096 codewords x chunk of 4096 columns x vector-row), and 288 entries of
    read-ahead after the last segment, per decoder projection:
    q, o: 512 rows x 4096 = 2097152 lookups, 16 x 512 = 8192 segments
          -> (2097152 + 15 x 8192 + 288) x 4 + 4 x 8193 = 8914052
    k, v: 128 rows -> (524288 + 15 x 2048 + 288) x 4 + 4 x 2049 = 2229380
    gate, up: 1792 rows -> (7340032 + 15 x 28672 + 288) x 4 + 4 x 28673 = 31196292
    down: 512 rows x 14336, 4 chunks -> (7340032 + 15 x 32768 + 288) x 4 + 4 x 32769 = 31458436
    per layer 116137884, x 32 layers."""
    shape = Shape.from_config(LLAMA_31_8B)
    layout = model_layout_bytes(shape, 8, 65536, 0)
    assert layout == 32 * 116_137_884 == 3_716_412_288
    assert model_layout_bytes(shape, 8, 256, 0) == 0  # 4 KB codebooks: the plain GEMV's
    roomy = fit(shape, 4_000_000_000, 16 * GiB, 8192, layout)
    assert roomy.layout_fits and roomy.verdict == "fits"
    assert "Fast decode layout 3.46 GiB: fits too" in roomy.lines()
    # 8 GiB: the model fits (5.69 GB) but not with 3.72 GB of layout and 256 MiB of slack
    tight = fit(shape, 4_000_000_000, 8 * GiB, 8192, layout)
    assert tight.verdict == "fits" and not tight.layout_fits
    assert any(line.startswith("Fast decode layout 3.46 GiB: no room") for line in tight.lines())
    assert not any("Fast decode" in line for line in fit(shape, 1, 8 * GiB, 8192).lines())


def test_llama_70b_keeps_its_embedding_table_in_host_memory_where_the_gpu_is_short(monkeypatch):
    """With the fast decode layout (17 GB by model_layout_bytes) 70B at 2 bits exceeds 22 GiB:
    the engine then keeps the 128256 x 8192 x 2 byte table on the host, and the fit check
    counts it there; a tied table (also the output head) stays on the GPU."""
    monkeypatch.delenv("VPTQ_EMBED_ON_HOST", raising=False)
    shape = Shape.from_config(LLAMA_31_70B)
    layout = model_layout_bytes(shape, 8, 65536)
    f = fit(shape, 19_500_000_000, 22 * GiB, 4096, layout)
    assert f.host == 128256 * 8192 * 2 == 2_101_346_304
    assert f.weights == 19_500_000_000 - 2_101_346_304
    assert "Weights 16.20 GiB (the embedding table, 1.96 GiB, stays in host memory)" in f.lines()
    # (23622320128 - 17398653696 - 1062184960) // 327680 = 15751 -> 15616
    assert f.max_context == 15616
    assert fit(shape, 19_500_000_000, 22 * GiB, 4096).host == 0  # fits without the layout
    tied = Shape.from_config(LLAMA_31_70B | {"tie_word_embeddings": True})
    assert fit(tied, 19_500_000_000, 22 * GiB, 4096, layout).host == 0
    # vptq::embed_rows reads 16-bit tables: a float32 model keeps its table on the GPU
    f32 = Shape.from_config(LLAMA_31_70B | {"torch_dtype": "float32"})
    assert f32.dtype_bytes == 4 and fit(f32, 19_500_000_000, 22 * GiB, 4096, layout).host == 0
    monkeypatch.setenv("VPTQ_EMBED_ON_HOST", "0")
    assert fit(shape, 19_500_000_000, 22 * GiB, 4096, layout).host == 0


def test_llama_8b_two_bit_on_the_cpu_by_hand():
    """Without a GPU every layer is expanded to float32 (engine/layers.py): Llama-3.1-8B has
    8,030,261,248 parameters (32 x (4096 x (4096 + 2 x 1024) + 4096 x 4096 + 3 x 4096 x 14336
    + 2 x 4096) + 4096 + 2 x 128256 x 4096), 32,121,044,992 bytes as float32. The packed layers
    are at most twice the files' bytes beyond the two bf16 128256 x 4096 tables (2 x 1,050,673,152
    bytes). KV cache: 2 x 32 x 8 x 128 x 4 bytes a token; workspace: 117,440,512 (the largest
    layer) + 512 x (4 x 4096 + 3 x 14336) x 4 + 2 x 128256 x 4 = 240,101,376."""
    from app.fit import cpu_fit

    shape = Shape.from_config(LLAMA_31_8B)
    files = 4_000_000_000
    f = cpu_fit(shape, files, True, 4096, 38 * GiB)
    assert f.need.dense == 32_121_044_992
    assert f.need.packed == 2 * (files - 2 * 1_050_673_152) == 3_797_307_392
    assert f.need.kv_cache == 262_144 * 4096 == GiB
    assert f.need.workspace == 240_101_376
    total = 32_121_044_992 + 3_797_307_392 + GiB + 240_101_376  # 34.68 GiB
    assert f.need.total == total and f.verdict == "tight"  # above 90% of 38 GiB
    # (38 GiB - (total - 1 GiB)) // 256 KiB = 17714 tokens -> 17664 in steps of 256
    assert f.max_context == 17664
    assert f.lines() == [
        "On the CPU it takes about 34.68 GiB of memory (the weights as float32 29.92 GiB, their "
        "packed form up to 3.54 GiB, a KV cache of 4096 tokens 1.00 GiB, workspace 0.22 GiB)",
        "Needed 34.68 GiB of 38.00 GiB available",
        "Largest context that fits: 17664 tokens",
    ]
    small = cpu_fit(shape, files, True, 4096, 16 * GiB)
    assert small.verdict == "does not fit" and small.max_context == 0
    assert small.lines()[-1] == "The weights alone do not fit"
    unknown = cpu_fit(shape, files, True, 4096, None)
    assert unknown.verdict is None and len(unknown.lines()) == 1 and unknown.max_context == 0
    # a dense fp16 checkpoint holds no packed layers beside its float32 copy
    assert cpu_fit(shape, 16_060_522_496, False, 4096, None).need.packed == 0


def test_a_gptq_model_on_the_cpu_counts_its_packed_tensors_as_a_load_holds_them():
    """Llama-3.1-8B in 4-bit GPTQ, groups of 128, listed with its config: the int32 codes stay
    as the files hold them; per layer sum(groups x N) = 32 x (4096 + 1024 + 1024 + 4096 + 14336 +
    14336) + 112 x 4096 = 1,703,936 zero points and scales, 54,525,952 for 32 layers; the zero
    points grow from 4 bits to int32 (+3.5 bytes each: 190,840,832), the bf16 scales to float32
    (+2 bytes each: 109,051,904). Counted at twice the files' bytes, as where the listing does
    not say the width, it would be 3.6 GB more than a load holds."""
    from app.browser import _cpu_fit
    from app.hub import Scheme

    shape = Shape.from_config(LLAMA_31_8B)
    files = 5_700_000_000
    tables = 2 * 1_050_673_152  # the embedding and the output layer, bf16
    known = Scheme("Meta-Llama-3.1-8B-Instruct", 8.0, None, None, None, True, 4, 128)
    f = _cpu_fit(shape, known, files, 4096, None)
    assert f.need.packed == files - tables + 190_840_832 + 109_051_904 == 3_898_546_432
    unknown = Scheme("Meta-Llama-3.1-8B-Instruct", 8.0, None, None, None, True, None, None)
    assert _cpu_fit(shape, unknown, files, 4096, None).need.packed == 2 * (files - tables)


def test_the_fast_decode_layout_is_planned_for_the_gpu_nvml_names():
    """An RTX 4090 (compute capability 8.9, 16384 CUDA cores: 128 SMs of 99 KiB a block) cuts
    Llama-3.1-8B's v8-k65536-256 layouts in half slices (engine/sliced_plan.py layer_plan):
    each projection has twice its 16 slices x column chunks x rows segments, each at most 15
    entries of padding (6 bytes with the residual code) and an offset (4 bytes) more:
    q, o: 16 x 1 x 512 = 8192; k, v: 2048; gate, up: 16 x 1792 = 28672; down: 16 x 4 x 512 =
    32768 -> 2 x 8192 + 2 x 2048 + 2 x 28672 + 32768 = 110592 segments x 94 bytes = 10395648
    a layer, x 32 layers."""
    from app.gpu import GpuInfo
    from engine.sliced_plan import GPU

    def card(capability, cores):
        return GpuInfo(0, "GPU-1", "card", 24 * GiB, 0, 24 * GiB, 0, 40, None, capability, cores)

    rtx4090 = card((8, 9), 16384).plan_gpu
    assert rtx4090 == GPU(num_sms=128, smem_optin=99 << 10)
    assert card((8, 6), 10496).plan_gpu == GPU(82, 99 << 10)  # RTX 3090
    assert card((8, 0), 6912).plan_gpu == GPU(108, 163 << 10)  # A100
    assert card((7, 5), 2560).plan_gpu == GPU(40, 64 << 10)  # Tesla T4
    assert card((9, 0), 16896).plan_gpu == GPU(132, 227 << 10)  # H100 SXM
    # Blackwell: an RTX 5090 (170 SMs) plans as a GeForce card, a B200 (148 SMs) as Hopper;
    # a generation the table does not know plans as an H100 (None)
    assert card((12, 0), 21760).plan_gpu == GPU(170, 99 << 10)
    assert card((10, 0), 18944).plan_gpu == GPU(148, 227 << 10)
    assert card((13, 0), 20000).plan_gpu is None and card(None, None).plan_gpu is None
    shape = Shape.from_config(LLAMA_31_8B)
    hopper = model_layout_bytes(shape, 8, 65536, 256)
    assert model_layout_bytes(shape, 8, 65536, 256, rtx4090) - hopper == 32 * 10_395_648
    assert model_layout_bytes(shape, 8, 65536, 256, card((9, 0), 16896).plan_gpu) == hopper
    # v8-k65536-4096: on the RTX 4090 most layers' 64 KiB residual codebook is sliced with the
    # main one (two lookups a weight), a third more than the Hopper estimate
    big = model_layout_bytes(shape, 8, 65536, 4096, rtx4090)
    assert 1.3 < big / model_layout_bytes(shape, 8, 65536, 4096) < 1.36
    f = fit(shape, 4_000_000_000, 20 * GiB, 8192, big)
    assert f.layout_fits and f"Fast decode layout {big / GiB:.2f} GiB: fits too" in f.lines()


def test_the_models_page_fit_takes_the_residual_layout_and_gptq_zero_points():
    """What the Models page's fit adds to the weights, per scheme: a VPTQ model's fast decode
    layout with its residual codebook (the RTX 4090's v8-k65536-256 layout above, 32 x
    10,395,648 bytes more than the Hopper plan) and no GPTQ zero points; a 4-bit GPTQ model's
    zero points unpacked at load (the CPU test above: 190,840,832 bytes) and no layout. The
    engine's own model counts as room."""
    from app.browser import _gpu_fit
    from app.gpu import GpuInfo
    from app.hub import Scheme

    shape = Shape.from_config(LLAMA_31_8B)
    gpu = GpuInfo(
        0, "GPU-1", "RTX 4090", 24 * GiB, 4 * GiB, 20 * GiB, 0, 40, 3 * GiB, (8, 9), 16384
    )
    vptq = Scheme("Meta-Llama-3.1-8B-Instruct", 8.0, 8, 65536, 256)
    f = _gpu_fit(shape, vptq, 3_000_000_000, gpu, 8192)
    hopper = model_layout_bytes(shape, 8, 65536, 256)
    assert f.fast_layout - hopper == 32 * 10_395_648 and f.unpacked == 0
    assert (f.free, f.reclaimed) == (23 * GiB, 3 * GiB)
    gptq = Scheme("Meta-Llama-3.1-8B-Instruct", 8.0, None, None, None, True, 4, 128)
    g = _gpu_fit(shape, gptq, 5_700_000_000, gpu, 8192)
    assert (g.fast_layout, g.unpacked) == (0, 190_840_832)


def test_gpus_read_the_compute_capability_and_cores_from_nvml():
    """app/gpu.py Gpus.read against a fake NVML: the capability and CUDA cores give the plan's
    GPU; a driver that answers neither leaves the plan to the Hopper default."""
    from types import SimpleNamespace

    from app.gpu import Gpus
    from engine.sliced_plan import GPU

    class Nvml:
        NVML_TEMPERATURE_GPU = 0

        def __init__(self, old=False):
            self.old = old

        def nvmlDeviceGetCount(self):
            return 1

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetMemoryInfo(self, h):
            return SimpleNamespace(total=24 * GiB, used=GiB, free=23 * GiB)

        def nvmlDeviceGetUUID(self, h):
            return b"GPU-42"

        def nvmlDeviceGetName(self, h):
            return "NVIDIA GeForce RTX 4090"

        def nvmlDeviceGetUtilizationRates(self, h):
            return SimpleNamespace(gpu=7)

        def nvmlDeviceGetTemperature(self, h, sensor):
            return 41

        def nvmlDeviceGetCudaComputeCapability(self, h):
            if self.old:
                raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")
            return 8, 9

        def nvmlDeviceGetNumGpuCores(self, h):
            if self.old:
                raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
            return 16384

    for old, want in ((False, GPU(128, 99 << 10)), (True, None)):
        gpus = Gpus.__new__(Gpus)
        gpus.nvml, gpus.error, gpus.driver = Nvml(old), None, "570.00"
        (info,) = gpus.read()
        assert gpus.error is None and info.uuid == "GPU-42" and info.free == 23 * GiB
        assert info.capability == (None if old else (8, 9))
        assert info.cuda_cores == (None if old else 16384)
        assert info.plan_gpu == want


def test_gpus_list_processes_and_the_engines_share_from_nvml(monkeypatch):
    """app/gpu.py against a fake NVML: a GPU's processes, compute and graphics merged by pid at
    their larger figure, biggest first (what the Models window offers to close); the engine's
    own bytes by its pid, 0 where it holds none there, unknown without a pid or where NVML
    fails; load devices to CUDA numbers."""
    from types import SimpleNamespace as P

    from app import gpu as G

    class Nvml:
        NVML_TEMPERATURE_GPU = 0
        fail = False

        def nvmlDeviceGetCount(self):
            return 1

        def nvmlDeviceGetHandleByIndex(self, i):
            return i

        def nvmlDeviceGetMemoryInfo(self, h):
            return P(total=24 * GiB, used=5 * GiB, free=19 * GiB)

        def nvmlDeviceGetUUID(self, h):
            return "GPU-1"

        def nvmlDeviceGetName(self, h):
            return "Card"

        def nvmlDeviceGetComputeRunningProcesses(self, h):
            if self.fail:
                raise RuntimeError("NVML_ERROR_UNKNOWN")
            return [P(pid=10, usedGpuMemory=GiB), P(pid=20, usedGpuMemory=3 * GiB),
                    P(pid=30, usedGpuMemory=None)]  # fmt: skip

        def nvmlDeviceGetGraphicsRunningProcesses(self, h):
            return [P(pid=10, usedGpuMemory=2 * GiB), P(pid=40, usedGpuMemory=GiB // 2)]

    nvml = Nvml()
    gpus = G.Gpus.__new__(G.Gpus)
    gpus.nvml, gpus.error, gpus.driver = nvml, None, "570.00"
    assert gpus.available
    names = {10: "game", 20: "trainer", 30: "idle", 40: "desktop"}
    real_name = G._process_name
    monkeypatch.setattr(G, "_process_name", lambda pid: names[pid])
    assert gpus.processes(0) == [
        (20, "trainer", 3 * GiB), (10, "game", 2 * GiB), (40, "desktop", GiB // 2),
        (30, "idle", 0),
    ]  # fmt: skip
    assert [g.engine_bytes for g in gpus.read(engine_pid=20)] == [3 * GiB]
    assert [g.engine_bytes for g in gpus.read(engine_pid=30)] == [0]  # NVML gives no figure
    assert [g.engine_bytes for g in gpus.read(engine_pid=99)] == [0]  # not on this GPU
    assert [g.engine_bytes for g in gpus.read()] == [None]  # no engine yet
    nvml.fail = True
    assert gpus.processes(0) == [] and [g.engine_bytes for g in gpus.read(20)] == [None]
    gpus.nvml = None  # no driver
    assert not gpus.available and gpus.processes(0) == [] and gpus.read(20) == []
    assert real_name(os.getpid()) and real_name(2**22 + 7) == "process"  # /proc/PID/comm
    assert [G.device_index(d) for d in ("cpu", "cuda", "cuda:0", "cuda:2")] == [None, 0, 0, 2]


def test_the_verdicts_edges_to_the_byte():
    """Exactly 90% of the free memory still fits, a byte more is tight; exactly all of it is
    tight, a byte more does not fit; the fast layout fits with exactly its slack left."""
    from app.fit import Fit, verdict
    from engine.memory import SLICED_SLACK

    assert verdict(900, 1000) == "fits" and verdict(901, 1000) == "tight"
    assert verdict(1000, 1000) == "tight" and verdict(1001, 1000) == "does not fit"
    parts = dict(weights=4 * GiB, kv_cache=GiB, overhead=GiB // 2, context=8192, max_context=8192)
    room = 5 * GiB + GiB // 2 + 3 * GiB + SLICED_SLACK  # needed + layout + slack
    assert Fit(**parts, free=room, fast_layout=3 * GiB).layout_fits
    assert not Fit(**parts, free=room - 1, fast_layout=3 * GiB).layout_fits
