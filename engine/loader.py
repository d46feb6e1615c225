"""Build a Transformer from a model folder: VPTQ, GPTQ, or plain fp16/bf16/fp32 safetensors.

The model is built on the meta device, then each state-dict entry is read lazily from the
checkpoint, checked against the shape the config implies, converted and moved to the target
device one tensor at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelArgs
from .formats import gptq
from .formats.checkpoint import REDOWNLOAD, Checkpoint
from .formats.vptq import FormatError, VQLayerSpec, int_kind, layer_table, resolve_layer
from .gptq_linear import GPTQLinear
from .layers import VQLinear, build_sliced_layouts, cpu_weight_dtype, sliced_summary
from .memory import (
    CONTEXT_STEP,
    PREFILL_CHUNK,
    OutOfMemory,
    Shape,
    cpu_largest_context,
    cpu_plan,
    embedding_on_host,
    gib,
    host_available,
    sliced_budget,
)
from .model import Transformer, dense_linear

Progress = Callable[[float, str], None]
log = logging.getLogger(__name__)
EMBEDDING = "model.embed_tokens.weight"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    folder: Path
    quant: str  # "vptq", "gptq" or "dense"
    specs: dict[str, VQLayerSpec]
    weight_bytes: int
    kv_bytes: int = 0
    workspace_bytes: int = 0
    max_context: int = 0  # the largest context the free memory held after the weights
    layout_bytes: int = 0  # the sliced decode layouts (engine/ops/sliced.py) beside the weights
    host_bytes: int = 0  # weights kept in pinned host memory (the input embedding table)
    sliced_layers: tuple[int, int] = (0, 0)  # (layers with the sliced layout, layers eligible)
    note: str = ""  # a choice the load made that the user should hear of (the CPU's dtype)
    prefill_chunk: int = PREFILL_CHUNK  # tokens a prefill piece takes (memory.prefill_chunk)

    @property
    def device(self) -> torch.device:
        return self.model.model.norm.weight.device


def default_dtype(device: str, args: ModelArgs) -> torch.dtype:
    """CPU matmuls are fastest and most exact in float32; GPUs use the checkpoint's dtype."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return torch.bfloat16 if args.torch_dtype == "bfloat16" else torch.float16


def check_device(device: str) -> torch.device:
    """``device`` as a torch device PyTorch can use, or a ValueError saying what it sees."""
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this PyTorch is a CPU build" if torch.version.cuda is None else (
                "no NVIDIA driver or GPU is visible")  # fmt: skip
            raise ValueError(f"device '{device}': PyTorch sees no CUDA GPU ({why}); use cpu")
        if (dev.index or 0) >= count:
            raise ValueError(
                f"device '{device}': PyTorch sees {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    return dev


def load_model(
    folder: str | Path,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    max_seq_len: int = 4096,
    progress: Progress | None = None,
    half_weights: bool = True,
) -> LoadedModel:
    """``half_weights``: a float32 model's plain layers on the CPU may hold float16 weights
    (engine/memory.py cpu_half_weights); False keeps the checkpoint's values exactly in float32
    (engine/quantize.py reads them)."""
    folder = Path(folder)
    check_device(device)
    if not folder.is_dir():
        raise FormatError(f"{folder}: no such model folder")
    args, cfg = ModelArgs.from_folder(folder)
    asked, dtype = dtype, dtype or default_dtype(device, args)
    gptq_cfg = gptq.read_config(cfg, folder)
    specs = {} if gptq_cfg else _layer_specs(args, cfg, folder / "config.json")
    ckpt = Checkpoint(folder)
    dev = torch.device(device)
    n_ctx = min(max_seq_len, args.max_position_embeddings)
    note = ""
    if dev.type == "cpu":
        quantized = bool(specs) or gptq_cfg is not None
        dtype, note = _cpu_dtype(
            Shape.from_config(cfg), ckpt.nbytes, quantized, n_ctx, folder, dtype, asked is None,
            half_weights, gptq_cfg and (gptq_cfg.bits, gptq_cfg.group_size),
        )  # fmt: skip

    # A float32 model's plain layers (lm_head among them) keep float16 weights on the CPU, as its
    # expanded quantized ones do (engine/layers.py cpu_weight_dtype).
    half = half_weights and dev.type == "cpu" and cpu_weight_dtype(dtype) != dtype

    def plain(name: str, k: int, n: int, bias: bool) -> nn.Module:
        return dense_linear(name, k, n, bias, torch.float16 if half else None)

    def make(name: str, k: int, n: int, bias: bool) -> nn.Module:
        if gptq_cfg is not None:
            g = gptq_cfg.spec(name, k, n, bias)
            return plain(name, k, n, bias) if g is None else GPTQLinear(g, dtype, name)
        spec = specs.get(name)
        if spec is None:
            return plain(name, k, n, bias)
        if (spec.in_features, spec.out_features) != (k, n):
            raise FormatError(
                f"{folder / 'config.json'}: layer {name} is {spec.in_features}->"
                f"{spec.out_features} in quantization_config but {k}->{n} in the model shape"
            )
        # The bias is the architecture's (Qwen2's q/k/v), as transformers takes it from the
        # module it replaces, whatever the layer's "bias" field says: a checkpoint whose field
        # says false still holds and needs the bias tensor.
        return VQLinear(replace(spec, bias=bias), dtype, name)

    with torch.device("meta"):
        model = Transformer(args, make)
    model.half_weights = half_weights
    shape = replace(Shape.from_config(cfg), dtype_bytes=dtype.itemsize)
    on_host: frozenset[str] = frozenset()
    if dev.type == "cuda":
        if _embedding_on_host(ckpt, shape, specs, dev, n_ctx):
            on_host = frozenset({EMBEDDING})
            log.info("the input embedding table stays in host memory (the GPU is short of room)")
        host = shape.embedding_bytes() if on_host else 0
        _check_weights_fit(ckpt.nbytes - host, folder, dev, shape.workspace())
    nbytes, host_bytes = _fill(model, ckpt, dtype, dev, progress, on_host)
    read = set(model.state_dict()) | ({"lm_head.weight"} if args.tie_word_embeddings else set())
    if unused := unused_tensors(ckpt, read):
        shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
        said = (
            f"{len(unused)} tensor{'s' if len(unused) > 1 else ''} of the checkpoint "
            f"{'are' if len(unused) > 1 else 'is'} not used by the model as built from "
            f"config.json ({shown}): if its answers look wrong, it has parts VPTQ "
            "Chat does not run: choose another model"
        )
        log.warning("%s: %s", folder, said)
        note = f"{note}; {said}" if note else said
    for m in model.modules():
        if isinstance(m, VQLinear | GPTQLinear):
            m.post_load()
    largest = n_ctx
    if dev.type == "cuda":
        _context_that_fits(shape, dev, n_ctx)  # an error with the numbers when it does not fit
        sliced = _build_sliced(model, shape, dev, n_ctx, progress)
        largest = _context_that_fits(shape, dev, n_ctx)
    model.setup_caches(1, n_ctx)
    model.eval()
    chunk = PREFILL_CHUNK
    if dev.type == "cuda":  # the room left now, the KV cache and layouts in place
        chunk = shape.prefill_chunk(free_bytes(dev))
    kv = shape.kv_bytes_per_token * n_ctx
    gptq_layers = any(isinstance(m, GPTQLinear) for m in model.modules())
    quant = "vptq" if specs else "gptq" if gptq_layers else "dense"
    loaded = LoadedModel(model, args, folder, quant, specs, nbytes, kv, shape.workspace(), largest)
    loaded.host_bytes = host_bytes
    loaded.note = note
    loaded.prefill_chunk = chunk
    if dev.type == "cuda":
        loaded.sliced_layers = sliced
        loaded.layout_bytes = sliced_summary(model)[1]
    return loaded


def free_bytes(dev: torch.device) -> int:
    """Free GPU memory including what torch holds cached but unused."""
    free, _ = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


def _embedding_on_host(ckpt, shape: Shape, specs, dev, n_ctx: int) -> bool:
    """memory.embedding_on_host for this model, every eligible layer's sliced layout counted.
    Only where vptq::embed_rows can read the table: with the kernels."""
    from . import ops
    from .ops import sliced

    if not ops.kernels_ready():
        return False
    layouts = sliced.model_bytes(specs.values(), sliced.gpu_of(dev))
    return embedding_on_host(shape, ckpt.nbytes, n_ctx, layouts, free_bytes(dev))


def _check_weights_fit(weights: int, folder: Path, dev: torch.device, workspace: int) -> None:
    need = weights + workspace
    free = free_bytes(dev)
    if need > free:
        raise OutOfMemory(
            f"{folder}: the weights need {gib(weights)} plus {gib(workspace)} of workspace on "
            f"{dev}, but only {gib(free)} is free. Close programs that use the GPU or choose a "
            "model with fewer bits."
        )


def _cpu_dtype(
    shape: Shape,
    weights: int,
    quantized: bool,
    n_ctx: int,
    folder,
    dtype,
    flexible: bool,
    half_weights: bool = True,
    gptq: tuple[int, int] | None = None,
) -> tuple[torch.dtype, str]:
    """On the CPU, where a model larger than the memory would only be killed by the system
    part-way through its load or first answer: the dtype memory.cpu_plan takes (``flexible``: the
    caller asked for none) and a note where that is bfloat16 instead of float32; or an error
    with the numbers."""
    available = host_available()
    need, float32 = cpu_plan(
        shape, weights, quantized, n_ctx, available, dtype.itemsize, flexible, half_weights,
        gptq=gptq,
    )  # fmt: skip
    if available is None or need.total <= available:
        if float32 is None:
            return dtype, ""
        note = (
            f"running in bfloat16: in float32 the model would take {gib(float32.total)} of "
            f"memory, {gib(available)} is available (bfloat16 takes {gib(need.total)}; "
            "prompts are slower on CPUs without AVX-512 BF16)"
        )
        log.info("%s: %s", folder, note)
        return torch.bfloat16, note
    largest = cpu_largest_context(shape, need, available)
    # what a load without --dtype would take: bfloat16 where float32 does not fit
    unasked, _ = cpu_plan(
        shape, weights, quantized, n_ctx, available, 4, True, half_weights, gptq=gptq
    )
    if largest >= CONTEXT_STEP:
        hint = f"The largest context that fits is {largest} tokens."
    elif unasked.total <= available:
        hint = "In bfloat16 it would fit: leave out --dtype and the engine takes bfloat16."
    else:
        hint = "Use an NVIDIA GPU, or a model with fewer parameters."
    raise OutOfMemory(
        f"{folder}: on the CPU this model takes about {need.describe()}, but {gib(available)} "
        f"is available. {hint}"
    )


def _context_that_fits(shape: Shape, dev: torch.device, n_ctx: int) -> int:
    room = free_bytes(dev) - shape.workspace()
    largest = shape.largest_context(room)
    if n_ctx > largest:
        raise OutOfMemory(
            f"a context of {n_ctx} tokens needs {gib(shape.kv_bytes_per_token * n_ctx)} of KV "
            f"cache plus {gib(shape.workspace())} of workspace, but {gib(free_bytes(dev))} is "
            f"free after the weights. The largest context that fits is {largest} tokens."
        )
    return largest


def _build_sliced(model, shape: Shape, dev: torch.device, n_ctx: int, progress) -> tuple[int, int]:
    """The sliced layout (fast decode for 65536-entry codebooks) for as many layers as the
    memory left after the KV cache of ``n_ctx`` tokens allows; VPTQ_CHAT_SLICED=0 turns it off."""
    if os.environ.get("VPTQ_CHAT_SLICED") == "0":
        return 0, 0
    budget = sliced_budget(free_bytes(dev), shape, n_ctx)
    if progress:
        progress(0.99, "arranging codebook lookups for decode")
    built, eligible = build_sliced_layouts(model, budget)
    if eligible:
        log.info("sliced decode layout for %d of %d layers", built, eligible)
    torch.cuda.empty_cache()
    return built, eligible


def _layer_specs(args: ModelArgs, cfg: dict[str, Any], where: Path) -> dict[str, VQLayerSpec]:
    table = layer_table(cfg)
    if table is None:
        qc = cfg.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") not in (None, "vptq"):
            raise FormatError(
                f"{where}: quant_method {qc.get('quant_method')!r} is not supported (VPTQ and "
                "GPTQ are)"
            )
        return {}
    names = [
        f"model.layers.{i}.{part}"
        for i in range(args.n_layers)
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ] + ["lm_head"]
    found = {n: resolve_layer(n, table, str(where)) for n in names}
    return {n: s for n, s in found.items() if s is not None}


def _fill(
    model: Transformer,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    progress: Progress | None,
    on_host: frozenset[str] = frozenset(),
) -> tuple[int, int]:
    """Every tensor to ``device``, those named in on_host to pinned host memory; returns the
    bytes of each (device, host)."""
    entries = list(model.state_dict(keep_vars=True).items())
    total = host = 0
    for i, (name, target) in enumerate(entries):
        t = _read(model, name, ckpt)
        t = _convert(name, t, target, dtype, ckpt)
        if name in on_host:
            _assign(model, name, t.contiguous().pin_memory())
            host += t.numel() * t.element_size()
        else:
            _assign(model, name, t.to(device))
            total += t.numel() * t.element_size()
        if progress is not None and (i % 16 == 0 or i == len(entries) - 1):
            progress((i + 1) / len(entries), "loading weights")
    ckpt.close()
    return total, host


DERIVED = ("rotary_emb.inv_freq",)  # tensors some exporters save that the model computes


def unused_tensors(ckpt: Checkpoint, read: set[str]) -> list[str]:
    """The checkpoint's tensors not in ``read`` (what the model read, and lm_head's copy of a
    tied table, which transformers ignores too): a part of the architecture the config did
    not describe (they were ignored without a word). Not those the model derives (RoPE's
    frequencies), nor all-zero ones (GPTQ exporters' biases of layers without one)."""
    unused = []
    for name in sorted(set(ckpt.where) - read):
        if not name.endswith(DERIVED) and torch.count_nonzero(ckpt.get(name)):
            unused.append(name)
    ckpt.close()
    return unused


def _read(model: nn.Module, name: str, ckpt: Checkpoint) -> torch.Tensor:
    """The tensor from the checkpoint, or its module's stand-in for one that may be absent."""
    if name not in ckpt:
        path, _, attr = name.rpartition(".")
        missing = getattr(model.get_submodule(path), "missing_tensor", None)
        stand_in = missing(attr) if missing else None
        if stand_in is not None:
            return stand_in
    return ckpt.get(name)


def _convert(
    name: str, t: torch.Tensor, target: torch.Tensor, dtype: torch.dtype, ckpt: Checkpoint
) -> torch.Tensor:
    where = ckpt.where.get(name, ckpt.folder)
    if tuple(t.shape) != tuple(target.shape):
        raise FormatError(
            f"{where}: tensor '{name}' has shape {list(t.shape)} but config.json "
            f"implies {list(target.shape)}; the config does not match the weights"
        )
    want = int_kind(target.dtype)
    if want == "float":
        if not t.is_floating_point():
            raise FormatError(
                f"{where}: tensor '{name}' is {t.dtype}, expected floats; " + REDOWNLOAD
            )
        # the model's dtype, or float16 where the module asked for it (a plain layer's weight
        # on the CPU, load_model plain; elsewhere a float16 target is the model's dtype too)
        return t.to(torch.float16 if target.dtype == torch.float16 else dtype)
    if t.element_size() == 2 and want == "int16":  # int16, uint16 or an fp16 bit pattern
        return t.view(torch.int16)
    if want == "int64" and not t.is_floating_point():
        return t.to(torch.int64)
    if t.dtype != target.dtype:
        raise FormatError(
            f"{where}: tensor '{name}' is {t.dtype}, expected {target.dtype}; " + REDOWNLOAD
        )
    return t


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        owner._buffers[attr] = t
