"""GPU memory arithmetic from config.json: KV cache per token, runtime overhead, parameter
count. Standard library only: the engine sizes its KV cache with it and the app's fit check
(app/fit.py) uses the same numbers.

The engine keeps the KV cache in the model's dtype (2 bytes for fp16/bf16), K and V for every
layer and KV head. Prefill of more than a few tokens dequantizes the largest linear layer to a
dense fp16 workspace before its GEMM, so that layer's N x K x 2 bytes is part of the overhead,
beside the CUDA context and the prefill activations.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, replace

MiB = 1 << 20
GiB = 1 << 30
# What an engine process holds on the GPU beyond PyTorch's own memory: the CUDA context, and
# the kernels of cuBLAS, flash attention and ours, loaded as they are first used. H100, torch
# 2.11 + CUDA 13 (csrc/KERNELS.md session 43): 619 MiB for the context, 693 MiB once all of
# them ran (NVML's used memory minus torch's reserved); the rest is the allocator's slack.
CUDA_CONTEXT = 768 * MiB
PREFILL_CHUNK = 512  # tokens per prefill step that the memory plan always leaves room for
# A longer prompt is prefilled in pieces, and each piece expands every layer's weights again
# (vptq::dequant, ~10 ms a piece for Llama-3.1-8B at 2 bits, ~100 ms for 70B): where the GPU
# has room beside everything else, pieces of up to this many tokens (prefill_chunk).
MAX_PREFILL_CHUNK = 4096
# Prefill dequantizes a layer in slices of at most this. 16 MiB slices made a 512-token prefill
# of Llama-3.1-8B at 2 bits CPU-bound (H200: 80 ms, 88 ms of host time for 36 ms of kernels,
# 27 dequant + GEMM + copy rounds per layer); at 128 MiB every 8B projection is one round.
DEQUANT_WORKSPACE = 128 * MiB
CONTEXT_STEP = 256  # the largest context is reported in these steps

# The sliced decode layout (engine/ops/sliced.py, csrc/vptq_sliced.cu): its constants live here
# so that the app's fit check can size it without torch.
SLICE_BYTES = 64 * 1024  # codebook bytes per GPU block (shared memory)
CHUNK_COLS = 4096  # input columns per chunk, at least (sizes below assume this many chunks)
MAX_CHUNK_COLS = 8192  # at most (engine/sliced_plan.py chunk_width)
PAD_TO = 16  # segment lengths are multiples of this (csrc/vptq_sliced.cuh kRowLanes)
SLICED_READ_AHEAD = 288  # padding entries after the last segment (csrc/vptq.h kSlicedReadAhead)
RES_SMEM_BYTES = 96 * 1024  # residual codebooks up to this size sit whole in every block
MIN_BOOK_BYTES = 40 * 1024  # smaller codebooks fit the plain GEMV's shared memory already
SLICED_VECTOR_LENS = (2, 4, 6, 8, 10, 12, 16)
SLICED_SLACK = 256 * MiB  # left free beside the sliced layouts (allocator rounding, graphs)


class OutOfMemory(MemoryError):
    """The model or the requested context does not fit; the message has the numbers."""


@dataclass(frozen=True)
class Shape:
    """The parts of config.json that decide memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    dtype_bytes: int = 2
    tied: bool = False  # the input embedding table is the output head too

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        cfg = cfg.get("text_config", cfg)
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                layers=int(cfg["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(cfg["intermediate_size"]),
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab=int(cfg["vocab_size"]),
                max_context=int(cfg.get("max_position_embeddings") or 4096),
                dtype_bytes=4 if cfg.get("torch_dtype", cfg.get("dtype")) == "float32" else 2,
                tied=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ValueError(f"config.json has no {e.args[0]!r}") from None

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def largest_linear(self) -> int:
        """Elements of the largest projection (what dequant-then-GEMM materialises)."""
        q = self.heads * self.head_dim
        return max(self.hidden * q, self.hidden * self.intermediate)

    def workspace(self) -> int:
        """What the engine allocates beside weights and KV cache: the dequantized largest layer
        during prefill, the prefill activations, the logits."""
        acts = PREFILL_CHUNK * (4 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        logits = 2 * self.vocab * 4  # last-token logits and sampling buffers, fp32
        return min(self.largest_linear * 2, DEQUANT_WORKSPACE) + acts + logits

    def prefill_chunk(self, free: int) -> int:
        """Tokens per prefill piece where ``free`` GPU bytes are left after the load (weights,
        layouts, KV cache): the workspace holds a piece of PREFILL_CHUNK tokens, and the room
        beyond it and SLICED_SLACK takes the most steps of PREFILL_CHUNK, up to
        MAX_PREFILL_CHUNK, whose activations fit. VPTQ_PREFILL_CHUNK sets it (comparisons)."""
        if os.environ.get("VPTQ_PREFILL_CHUNK"):
            return max(1, int(os.environ["VPTQ_PREFILL_CHUNK"]))
        room = free - self.workspace() - SLICED_SLACK
        # twice the workspace's count a token: a piece's fp32 temporaries (RoPE, the norms)
        per_token = 2 * (4 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        steps = max(0, room) // (per_token * PREFILL_CHUNK)
        return min(MAX_PREFILL_CHUNK, PREFILL_CHUNK * (1 + steps))

    def embedding_bytes(self) -> int:
        """The input embedding table (vocab x hidden)."""
        return self.vocab * self.hidden * self.dtype_bytes

    def overhead(self) -> int:
        return CUDA_CONTEXT + self.workspace()

    def largest_context(self, room: int) -> int:
        """The most tokens of KV cache that ``room`` bytes hold, in steps of CONTEXT_STEP and
        capped by the model's own limit."""
        tokens = max(0, room) // self.kv_bytes_per_token
        return min(tokens - tokens % CONTEXT_STEP, self.max_context)

    def parameters(self, tied: bool = False) -> int:
        """Parameter count of the dense model this config describes."""
        norms = self.layers * 2 * self.hidden + self.hidden
        emb = self.vocab * self.hidden
        return self.linear_parameters() + norms + emb * (1 if tied else 2)

    def linear_parameters(self) -> int:
        """The weights of the decoder layers' projections (what a VPTQ model quantizes)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (q + 2 * kv) + q * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp)


def embedding_on_host(
    shape: Shape, weights: int, context: int, layouts: int, free: int, overhead: int | None = None
) -> bool:
    """Whether the engine keeps the input embedding table in pinned host memory instead of on
    the GPU: where the weights, the KV cache of ``context`` tokens, the overhead (default the
    workspace, for ``free`` measured inside a running engine), every sliced decode layout the
    model could take (``layouts``) and SLICED_SLACK exceed ``free`` GPU bytes, unless the table
    is the output head too (shape.tied) or not of 16-bit values (what vptq::embed_rows reads). A
    decode step reads one row of it over the bus (16 KB for Llama-3.1-70B), and its GPU memory
    (1.96 GiB for 70B) goes to the KV cache and the fast decode layout instead.
    VPTQ_EMBED_ON_HOST=1 or 0 forces it."""
    if shape.tied or shape.dtype_bytes != 2:
        return False
    force = os.environ.get("VPTQ_EMBED_ON_HOST")
    if force in ("0", "1"):
        return force == "1"
    overhead = shape.workspace() if overhead is None else overhead
    need = weights + shape.kv_bytes_per_token * context + overhead + layouts + SLICED_SLACK
    return need > free


def gib(n: int) -> str:
    if n >= 0.1 * GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


def slice_codewords(v: int) -> int:
    """Codewords of length v in one SLICE_BYTES slice (a multiple of 8: 16-byte copies)."""
    return min(65536, (SLICE_BYTES // (2 * v)) // 8 * 8)


def small_residual(v: int, kr: int, groups: int = 1) -> bool:
    """Whether the residual codebooks sit whole in every block (else they are sliced)."""
    return 0 < groups * kr <= 65536 and groups * kr * v * 2 <= RES_SMEM_BYTES


RES_COPY_BYTES = 32768  # csrc/vptq.h kResCopyBytes


def res_copies(v: int, res_cw: int) -> int:
    """Copies of a small residual codebook (res_cw codewords) in the sliced GEMV's shared
    memory: one for each lane a shared-memory wavefront serves where a codeword is one load
    (v = 2, 4, 8) and the copies fit RES_COPY_BYTES, else 1. Lane i reads copy i % copies, so
    the lanes of a wavefront never share a bank. Mirrors res_copies in csrc/vptq.h."""
    unit = 16 if v % 8 == 0 else 8 if v % 4 == 0 else 4  # bytes a load of a codeword takes
    copies = 128 // unit
    fits = res_cw * copies * v * 2 <= RES_COPY_BYTES
    return copies if res_cw > 0 and v * 2 == unit and fits else 1


def sliced_layer_bytes(
    k_in: int,
    n_out: int,
    v: int,
    k: int,
    kr: int = 0,
    groups: int = 1,
    elem: int = 2,
    slice_cw: int | None = None,
    small: bool | None = None,
) -> int:
    """GPU bytes of one layer's sliced decode layout, an upper bound (every segment padded by
    PAD_TO - 1 entries); 0 where the layer does not take it (small codebook, odd vector length).
    ``elem``: bytes per codebook element. ``slice_cw`` and ``small``: the device's plan
    (engine/sliced_plan.py layer_plan) where it differs from the full slice and small_residual."""
    if v not in SLICED_VECTOR_LENS or groups * k * v * 2 <= MIN_BOOK_BYTES:
        return 0
    rows = -(-n_out // v)
    small = small_residual(v, kr, groups) if small is None else small and kr > 0
    copied = kr > 0 and not small  # a large residual is sliced beside the main codebook
    lookups = rows * k_in * (2 if copied else 1)
    per = 4 + (2 if small else 0)  # 32-bit entry (+ 16-bit residual code)
    n_cw = groups * (k + (kr if copied else 0))
    segments = -(-n_cw // (slice_cw or slice_codewords(v))) * -(-k_in // CHUNK_COLS) * rows
    table = elem * v * n_cw if copied else 0
    copies = res_copies(v, groups * kr) if small else 1
    if copies > 1:  # the small residual codebooks, each codeword `copies` times
        table += elem * v * groups * kr * copies
    entries = lookups + (PAD_TO - 1) * segments + SLICED_READ_AHEAD
    return entries * per + 4 * (segments + 1) + table


def sliced_budget(room: int, shape: Shape, context: int) -> int:
    """What the sliced layouts may take of ``room`` free bytes: the KV cache of ``context``
    tokens, the workspace and SLICED_SLACK stay free."""
    return room - shape.kv_bytes_per_token * context - shape.workspace() - SLICED_SLACK


def projections(shape: Shape) -> list[tuple[int, int]]:
    """(in, out) features of a decoder layer's q, k, v, o, gate, up and down projections."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    h, i = shape.hidden, shape.intermediate
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def gptq_group_columns(shape: Shape, group: int) -> int:
    """(group, output column) pairs of a GPTQ model's decoder layers: each has a zero point and
    a scale (group -1: one group a layer)."""
    per_layer = sum((1 if group <= 0 else -(-k // group)) * n for k, n in projections(shape))
    return shape.layers * per_layer


def gptq_zero_bytes(shape: Shape, bits: int, group: int) -> int:
    """What a loaded GPTQ model holds beyond its files: each group's zero points unpacked to
    int32 (engine/gptq_linear.py), in place of the packed qzeros (group -1: one group)."""
    return gptq_group_columns(shape, group) * (32 - bits) // 8


def cpu_half_weights() -> bool:
    """Whether a float32 model on the CPU keeps its decoder layers' weights (expanded where they
    are quantized) and its output layer in float16 (engine/layers.py cpu_linear;
    VPTQ_CPU_WEIGHTS=float32 keeps them in float32): half the memory and the bytes a token
    reads, and PyTorch's float16 matrix-vector product sums in float32. The demo decodes 2.5x
    faster so (23 against 57 ms a step on two cores), its perplexity 23.4973 against 23.4964;
    activations and the KV cache stay float32."""
    return os.environ.get("VPTQ_CPU_WEIGHTS", "float16") != "float32"


@dataclass(frozen=True)
class CpuNeed:
    """What the CPU path holds (engine/layers.py, engine/gptq_linear.py): float32 throughout,
    each quantized layer dequantized once beside its packed tensors; the decoder's layers and
    the output layer in float16 by default (cpu_half_weights)."""

    dense: int  # every parameter as float32 (or the 16-bit values taken where that does not fit)
    packed: int  # the quantized layers' own tensors (indices, codebooks; GPTQ's qweight), at most
    kv_cache: int  # for the context, of the same values
    workspace: int
    context: int
    elem: int = 4  # bytes a value: 4 (float32) or 2 (bfloat16)
    half: bool = False  # float32 with float16 decoder and output layers (cpu_half_weights)

    @property
    def total(self) -> int:
        return self.dense + self.packed + self.kv_cache + self.workspace

    def describe(self) -> str:
        values = "bfloat16" if self.elem == 2 else "float16 and float32" if self.half else "float32"
        parts = f"the weights as {values} {gib(self.dense)}"
        if self.packed:
            parts += f", their packed form up to {gib(self.packed)}"
        parts += f", a KV cache of {self.context} tokens {gib(self.kv_cache)}"
        return f"{gib(self.total)} of memory ({parts}, workspace {gib(self.workspace)})"


def cpu_need(
    shape: Shape,
    weight_bytes: int,
    quantized: bool,
    context: int,
    elem: int = 4,
    half_weights: bool = True,
    *,
    gptq: tuple[int, int] | None = None,
) -> CpuNeed:
    """``shape`` in the checkpoint's dtype; ``weight_bytes``: the checkpoint's tensors; ``elem``:
    bytes a value on the CPU (4: float32, what the engine takes there; 2: bfloat16, where float32
    does not fit); ``half_weights`` False: float32 weights throughout (engine/loader.py
    load_model, for engine/quantize.py); ``gptq``: a GPTQ checkpoint's (bits, group size), where
    known: its packed tensors are then counted as a load holds them."""
    values = replace(shape, dtype_bytes=elem)
    dense = elem * shape.parameters(shape.tied)
    half = elem == 4 and half_weights and cpu_half_weights()
    if half:  # the decoder's layers in float16 (expanded where quantized), and the output
        dense -= 2 * shape.linear_parameters()  # layer: lm_head loaded so, or a tied table's
        out = 2 * shape.vocab * shape.hidden  # float16 copy beside it (engine/model.py output)
        dense += out if shape.tied else -out
    # The files hold the quantized layers, the embedding table and the output head. The layers'
    # floats (codebooks, scales) become float32 and their int32 indices stay: twice their file
    # bytes at most (about 1.1x for the 2-bit community models, 2x for codebook-heavy ones;
    # counted so for 16-bit values too). A GPTQ layer's int32 codes stay as they are, its zero
    # points are unpacked to int32 and its scales take elem bytes (engine/gptq_linear.py).
    plain = shape.embedding_bytes() * (1 if shape.tied else 2)
    files = max(0, weight_bytes - plain) if quantized else 0
    packed = 2 * files
    if quantized and gptq is not None:  # scales grow from the checkpoint's dtype to elem bytes
        bits, group = gptq
        growth = gptq_group_columns(shape, group) * max(0, elem - shape.dtype_bytes)
        packed = files + gptq_zero_bytes(shape, bits, group) + growth
    kv = values.kv_bytes_per_token * context
    return CpuNeed(dense, packed, kv, values.workspace(), context, elem, half)


def cpu_plan(
    shape: Shape,
    weight_bytes: int,
    quantized: bool,
    context: int,
    available: int | None,
    elem: int = 4,
    flexible: bool = True,
    half_weights: bool = True,
    *,
    gptq: tuple[int, int] | None = None,
) -> tuple[CpuNeed, CpuNeed | None]:
    """What a CPU load takes, as the engine chooses it: values of ``elem`` bytes where they fit
    ``available`` (or where that is unknown); else, for float32 and unless a dtype was asked for
    (not ``flexible``), bfloat16. Returns that need and, where bfloat16 was taken, float32's."""
    need = cpu_need(shape, weight_bytes, quantized, context, elem, half_weights, gptq=gptq)
    if available is None or need.total <= available or not flexible or elem <= 2:
        return need, None
    return cpu_need(shape, weight_bytes, quantized, context, 2, half_weights, gptq=gptq), need


def cpu_largest_context(shape: Shape, need: CpuNeed, available: int) -> int:
    """The longest context whose KV cache (of need's values) fits beside the rest of ``need``."""
    room = available - (need.total - need.kv_cache)
    return replace(shape, dtype_bytes=need.elem).largest_context(room)


class MemoryStatusEx(ctypes.Structure):
    """Windows' MEMORYSTATUSEX (two DWORDs, then seven 64-bit sizes: 64 bytes)."""

    _fields_ = [("length", ctypes.c_uint32), ("load", ctypes.c_uint32)] + [
        (name, ctypes.c_uint64)
        for name in ("total_phys", "avail_phys", "total_page", "avail_page", "total_virtual",
                     "avail_virtual", "avail_extended")
    ]  # fmt: skip


def host_available() -> int | None:
    """Memory the system can give a process now without swapping (Linux: MemAvailable;
    Windows: the available physical memory); None where it cannot tell."""
    if sys.platform == "win32":
        st = MemoryStatusEx(length=ctypes.sizeof(MemoryStatusEx))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):
            return int(st.avail_phys)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
