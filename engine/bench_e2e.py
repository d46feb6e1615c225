"""``python -m engine bench e2e``: a whole model of a real architecture, random weights built
directly on the GPU (no files), run the way the engine runs it: prefill of a 512-token prompt,
then CUDA-graph decode. In the same run, where it fits, the fp16 dense model of the same shape,
and the device's read bandwidth, from which the decode roofline (bytes read per token) follows.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import replace

import torch

from .bench import MODELS, read_bandwidth, scheme_spec
from .bench import model_config as config
from .config import ModelArgs
from .decode import GraphDecoder
from .formats.gptq import GPTQSpec
from .generate import warm_up_prefills
from .gptq_linear import GPTQLinear
from .layers import VQLinear, build_sliced_layouts, decode_paths, sliced_summary
from .loader import EMBEDDING, _assign, free_bytes
from .memory import (
    MAX_PREFILL_CHUNK,
    PREFILL_CHUNK,
    GiB,
    Shape,
    embedding_on_host,
    sliced_budget,
)
from .model import Transformer, dense_linear
from .ops import decode as fused
from .ops import sliced
from .sampling import SamplingParams

ARCHS = MODELS  # the models bench e2e builds (engine/bench.py)
PROMPT = 512
TURN = 37  # tokens of a follow-up message, timed after the first answer: lengths not seen before
PREFILL_RUNS = 3  # prefill timed this many times, the median reported
# GPTQ models beside the VPTQ schemes (bench.SCHEMES): bits, group size, act-order; asymmetric
# gptq_v2 zero points, as GPTQModel writes by default
GPTQ_SCHEMES = {
    "gptq-4bit": (4, 128, False),
    "gptq-4bit-act": (4, 128, True),
    "gptq-3bit": (3, 128, False),
    "gptq-2bit": (2, 128, False),
    "gptq-8bit": (8, 128, False),
}


def build(arch: str, scheme: str | None, context: int, cap: float | None = None) -> Transformer:
    """The model on the GPU with random weights; scheme None: fp16 dense. VPTQ layers get the
    sliced decode layout as far as the memory left for it allows (cap: the process limit in
    bytes), as the loader does."""
    args = ModelArgs.from_hf_config(config(arch), arch)
    gptq = GPTQ_SCHEMES.get(scheme or "")

    def make(name: str, k: int, n: int, bias: bool):
        if scheme is None or name == "lm_head":
            return dense_linear(name, k, n, bias)
        if gptq:
            bits, group = gptq[:2]
            spec = GPTQSpec(k, n, bits, group, sym=False, v2=True, bias=bias)
            return GPTQLinear(spec, torch.float16, name)
        return VQLinear(replace(scheme_spec(scheme, k, n), bias=bias), torch.float16, name)

    with torch.device("meta"):
        model = Transformer(args, make)
    shape = Shape.from_config(config(arch))
    tensors = model.state_dict(keep_vars=True)
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    specs = [m.spec for m in model.modules() if isinstance(m, VQLinear)]
    layouts = sliced.model_bytes(specs, sliced.gpu_of("cuda"))
    on_host = embedding_on_host(shape, weights, context, layouts, _room(cap))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, t in tensors.items():
        if name.endswith(".g_idx"):  # each row's group: in order, or an act-order shuffle
            rows = torch.arange(t.shape[0], device="cuda") // gptq[1]
            w = rows[torch.randperm(t.shape[0], device="cuda", generator=gen)] if gptq[2] else rows
        else:
            w = _random_like(name, t, gen, host=on_host and name == EMBEDDING)
        _assign(model, name, w)
    for m in model.modules():
        if isinstance(m, VQLinear | GPTQLinear):
            m.post_load()
    build_sliced_layouts(model, sliced_budget(_room(cap), shape, context))
    torch.cuda.empty_cache()
    model.setup_caches(1, context)
    return model.eval()


def _room(cap: float | None) -> int:
    """Free GPU bytes, within the process cap ``cap`` (bytes) where there is one."""
    free = free_bytes(torch.device("cuda"))
    return free if cap is None else min(free, int(cap) - torch.cuda.memory_allocated())


def planned_chunk(arch: str, cap: float | None) -> int:
    """The prefill piece the loader would plan now (engine/loader.py, memory.prefill_chunk)."""
    return Shape.from_config(config(arch)).prefill_chunk(_room(cap))


def _random_like(name: str, t: torch.Tensor, gen: torch.Generator, host: bool = False):
    """Random values for a weight on the GPU; host: fp16 values in pinned host memory, drawn on
    the GPU 64 MiB at a time."""
    dev = "cuda"
    if host:
        out = torch.empty(t.shape, dtype=torch.float16, pin_memory=True)
        flat, step = out.view(-1), 32 << 20
        for i in range(0, flat.numel(), step):
            part = torch.empty(min(step, flat.numel() - i), device=dev, dtype=torch.float16)
            flat[i : i + part.numel()].copy_(part.normal_(0, 0.02, generator=gen))
        return out
    if name.endswith("perm"):
        return torch.randperm(t.shape[0], device=dev, generator=gen).to(torch.int16)
    if not t.dtype.is_floating_point:  # packed index words: every bit pattern is valid
        info = torch.iinfo(t.dtype)
        return torch.randint(info.min, info.max, t.shape, device=dev, dtype=t.dtype, generator=gen)
    if "norm" in name or name.endswith("weight_scale"):
        return torch.ones(t.shape, device=dev, dtype=torch.float16)
    out = torch.empty(t.shape, device=dev, dtype=torch.float16)
    return out.normal_(0, 0.02, generator=gen)


def weight_bytes(model: Transformer, device: str = "cuda") -> int:
    """Bytes of the weights on ``device`` (the embedding table may be in host memory)."""
    tensors = model.state_dict().values()
    return sum(b.numel() * b.element_size() for b in tensors if b.device.type == device)


def decode_bytes(model: Transformer) -> int:
    """Bytes a decode step reads for the weights: a layer on the sliced path reads its layout
    instead of its packed indices; of an untied embedding table, one row."""
    total = weight_bytes(model)
    emb = model.model.embed_tokens.weight
    if not model.args.tie_word_embeddings and emb.is_cuda:
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    for m in model.modules():
        if isinstance(m, VQLinear) and m.sliced is not None:
            total += m.sliced.nbytes - m.indices.numel() * m.indices.element_size()
        if isinstance(m, GPTQLinear):  # the zero points, read at load into int32 beside it
            total += m.zeros.numel() * m.zeros.element_size()
    return total


def kv_bytes_read(model: Transformer, tokens: int, start: int = PROMPT) -> float:
    """Bytes of K and V a graph step reads on average while ``measure`` decodes ``tokens``
    tokens after ``start`` prompt tokens: the first comes from the prefill, then the step at
    position start + t (t = 0 .. tokens - 2) reads the cache up to there (within a sliding
    window), not the whole context the cache was sized for."""
    window = model.args.sliding_window
    read = [start + 1 + t for t in range(max(1, tokens - 1))]  # positions a step reads
    mean = sum(min(n, window) if window else n for n in read) / len(read)
    total = 0
    for layer in model.model.layers:
        k = layer.self_attn.cache.k  # [1, kv heads, context, head dim]
        total += 2 * k.numel() // k.shape[2] * k.element_size()  # K and V of one position
    return total * mean


def late_start(context: int, tokens: int) -> int | None:
    """Where ``measure`` decodes ``tokens`` tokens a second time, with the cache filled to the
    end of the context (each step's attention reads all of it): the position of the first, or
    None where the context is too short for that to differ from the decode after the prompt."""
    start = context - tokens
    return start if start >= 4 * PROMPT else None


# Sampling timed beside greedy decoding: the chat's default (app/settings.py DEFAULT_SAMPLING)
# and a model's recommended settings with top-k and a repetition penalty (Qwen2.5's
# generation_config.json), which cost the fused pick two searches where top-p takes one.
SAMPLINGS = {
    "the chat's default sampling": dict(temperature=0.7, top_p=0.95),
    "Qwen2.5's recommended sampling": dict(
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05
    ),
}


def _decode(
    dec: GraphDecoder, logits, seen, p: SamplingParams, tokens: int, pos: int = PROMPT
) -> tuple[float, float]:
    """Graph decode of ``tokens`` tokens after the prompt (the first at ``pos``): (seconds to
    the first token, then decode tok/s)."""
    t0 = time.perf_counter()
    stream = dec.run(logits, pos, seen, p, seed=0, limit=tokens)
    next(stream)
    t_first = time.perf_counter()
    n = 1 + sum(1 for _ in stream)
    return t_first - t0, (n - 1) / (time.perf_counter() - t_first)


def long_prefill(model: Transformer, chunk: int) -> dict:
    """A prompt of MAX_PREFILL_CHUNK tokens (or the whole context, if shorter) prefilled as the
    engine does, in pieces of PREFILL_CHUNK tokens and in pieces of ``chunk``: for each, the
    median time in ms and the peak of GPU memory above what was allocated before, in GiB."""
    n = min(MAX_PREFILL_CHUNK, model.max_seq)
    ids = torch.randint(0, model.args.vocab_size, (1, n), device="cuda")
    out = {"tokens": n}
    for piece in sorted({PREFILL_CHUNK, min(chunk, n)}):

        def run(piece: int = piece) -> None:
            for i in range(0, n, piece):
                model(ids[:, i : i + piece], i, last_only=True)
            torch.cuda.synchronize()

        run()  # the pieces' shapes' first calls
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(PREFILL_RUNS):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - before) / GiB
        out[piece] = (statistics.median(times) * 1000, peak)
    return out


def measure(model: Transformer, tokens: int, chunk: int = PREFILL_CHUNK) -> dict:
    """Prefill a 512-token prompt, then greedy graph decode of ``tokens`` tokens; then the same
    decode with the chat's default sampling (softmax, top-p and a draw in each step's graph);
    then a long prompt's prefill in pieces of 512 and of ``chunk`` tokens (long_prefill)."""
    vocab = model.args.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT), device="cuda")
    seen = torch.zeros(vocab, dtype=torch.bool, device="cuda")
    dec = GraphDecoder(model)
    p = SamplingParams(temperature=0, max_new_tokens=tokens)
    with torch.no_grad():
        model(prompt, 0, last_only=True)  # warm up: cuBLAS plans, kernel first calls
        warm_up_prefills(model, model.max_seq)  # and what the app's load runs (a follow-up's)
        dec.graph(p)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []  # one prefill varied up to 1.7x between runs: the median of three
        for _ in range(PREFILL_RUNS):
            t0 = time.perf_counter()
            logits = model(prompt, 0, last_only=True)[0]
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t_prefill = statistics.median(times)
        first_s, decode_tok_s = _decode(dec, logits, seen, p, tokens)
        late = late_start(model.max_seq, tokens)  # the cache's content there: timing only
        late_tok_s = _decode(dec, logits, seen, p, tokens, late)[1] if late else None
        turn_ms = None  # a chat's next turn: its new tokens after the cached ones, then a token
        if PROMPT + tokens + TURN <= model.max_seq:
            follow = torch.randint(0, vocab, (1, TURN), device="cuda")
            t0 = time.perf_counter()
            turn = model(follow, PROMPT + tokens, last_only=True)[0]
            t_turn = time.perf_counter() - t0
            pos = PROMPT + tokens + TURN
            turn_ms = (t_turn + _decode(dec, turn, seen, p, 1, pos)[0]) * 1000
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        sampled: dict[str, float | str] = {}  # tok/s, or why not
        for label, settings in SAMPLINGS.items():
            chat = SamplingParams(**settings, max_new_tokens=tokens)
            sampled[label] = "this PyTorch cannot draw random numbers inside a CUDA graph"
            if dec.usable(chat):
                try:
                    dec.graph(chat)
                    sampled[label] = _decode(dec, logits, seen, chat, tokens)[1]
                except torch.cuda.OutOfMemoryError:  # the greedy figures stand
                    sampled[label] = "out of GPU memory"
        try:
            long = long_prefill(model, chunk)
        except torch.cuda.OutOfMemoryError as e:  # the figures above stand
            long = {"error": str(e).splitlines()[0]}
    return {
        "prefill_tok_s": PROMPT / t_prefill,
        "ttft_ms": (t_prefill + first_s) * 1000,
        "turn_ttft_ms": turn_ms,
        "decode_tok_s": decode_tok_s,
        "late_start": late,
        "late_tok_s": late_tok_s,
        "sampled_tok_s": sampled,
        "long_prefill": long,
        "peak_torch_gib": peak / GiB,
        "device_used_gib": (total - free) / GiB,
        "weights_gib": weight_bytes(model) / GiB,
        "host_gib": weight_bytes(model, "cpu") / GiB,
        "layout_gib": sliced_summary(model)[1] / GiB,
        "decode_bytes": decode_bytes(model),
        "sliced_layers": sliced_summary(model)[0],
        "paths": decode_paths(model),
    }


def nvml_used_gib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetMemoryInfo(h).used / GiB
    except Exception:
        return None


def run_e2e(
    arch: str,
    scheme: str,
    context: int,
    tokens: int,
    vram_limit: float | None,
    breakdown: bool = False,
) -> None:
    """breakdown: also time the quantized model's decode step without each of its parts
    (engine/bench_step.py) and print that after the table."""
    from . import bench_step, ops

    kind, why = ops.prepare("cuda")
    if kind != "cuda":
        raise SystemExit(f"error: kernels unavailable: {why}")
    peak = read_bandwidth()
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"device: {torch.cuda.get_device_name()}, {total / GiB:.0f} GiB; "
          f"read bandwidth {peak / 1e9:.0f} GB/s")  # fmt: skip
    if vram_limit:
        torch.cuda.set_per_process_memory_fraction(vram_limit * GiB / total)
        print(f"torch capped at {vram_limit:g} GiB (set_per_process_memory_fraction)")
    rows, steps = {}, None
    for label, sch in ((scheme, scheme), ("fp16", None)):
        if sch is None:
            need = 2 * Shape.from_config(config(arch)).parameters()
            free = min(torch.cuda.mem_get_info()[0], (vram_limit or 1e9) * GiB)
            if need > free:
                rows[label] = {"error": f"does not fit: needs {need / GiB:.0f} GiB of weights, "
                               f"{free / GiB:.0f} GiB free"}  # fmt: skip
                continue
        try:
            cap = vram_limit * GiB if vram_limit else None
            model = build(arch, sch, context, cap)
            r = measure(model, tokens, planned_chunk(arch, cap))
            r["roofline_tok_s"] = peak / (r["decode_bytes"] + kv_bytes_read(model, tokens))
            if r["late_start"] is not None:
                kv = kv_bytes_read(model, tokens, r["late_start"])
                r["late_roofline_tok_s"] = peak / (r["decode_bytes"] + kv)
            r["nvml_used_gib"] = nvml_used_gib()
            rows[label] = r
            if breakdown and sch is not None:
                try:
                    steps = bench_step.breakdown(model), model.args.n_layers
                except torch.cuda.OutOfMemoryError as e:  # the measured row stands
                    print(f"breakdown: out of GPU memory ({str(e).splitlines()[0]}); "
                          "a smaller --context leaves it more room")  # fmt: skip
        except torch.cuda.OutOfMemoryError as e:
            rows[label] = {"error": f"does not fit: {str(e).splitlines()[0]}"}
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    _print(arch, context, tokens, rows, scheme)
    if steps is not None:
        bench_step.print_breakdown(*steps)


def long_prefill_line(long: dict) -> str:
    """long_prefill's result in words: the time and memory peak of each piece size, and the
    ratio of the larger piece's speed to the 512-token one's."""
    if "error" in long:
        return f"long prompt: out of GPU memory ({long['error']})"
    sizes = sorted(k for k in long if isinstance(k, int))
    parts = [f"pieces of {n}: {long[n][0]:.1f} ms (peak +{long[n][1]:.2f} GiB)" for n in sizes]
    line = f"prefill of a {long['tokens']}-token prompt, " + "; ".join(parts)
    if len(sizes) > 1:
        line += f"; {long[sizes[0]][0] / long[sizes[-1]][0]:.2f}x faster in pieces of {sizes[-1]}"
    return line


def _print(arch: str, context: int, tokens: int, rows: dict, scheme: str) -> None:
    print(f"\n{arch}, context {context}, prompt {PROMPT}, {tokens} decoded tokens (greedy)")
    head = ("prefill tok/s", "TTFT ms", "decode tok/s", "roofline tok/s", "% roofline",
            "weights GiB", "peak torch GiB", "used GiB (NVML)")  # fmt: skip
    print(f"{'model':>18} " + " ".join(f"{h:>15}" for h in head))
    for label, r in rows.items():
        if "error" in r:
            print(f"{label:>18} {r['error']}")
            continue
        nvml = r["nvml_used_gib"] if r["nvml_used_gib"] is not None else r["device_used_gib"]
        cells = (r["prefill_tok_s"], r["ttft_ms"], r["decode_tok_s"], r["roofline_tok_s"],
                 100 * r["decode_tok_s"] / r["roofline_tok_s"], r["weights_gib"],
                 r["peak_torch_gib"], nvml)  # fmt: skip
        print(f"{label:>18} " + " ".join(f"{c:15.1f}" for c in cells))
    if "fp16" in rows and "error" not in rows["fp16"] and "error" not in rows[scheme]:
        ratio = rows[scheme]["decode_tok_s"] / rows["fp16"]["decode_tok_s"]
        print(f"decode speed {scheme} / fp16: {ratio:.2f}x")
    for label, r in rows.items():
        if r.get("late_tok_s") is not None:
            at, pct = r["late_start"], 100 * r["late_tok_s"] / r["late_roofline_tok_s"]
            print(f"{label}: decode with the cache filled to the end of the context (steps at "
                  f"positions {at}-{at + tokens - 2}): {r['late_tok_s']:.1f} tok/s, "
                  f"{pct:.0f}% of its roofline")  # fmt: skip
    if all(r.get("late_tok_s") for r in (rows[scheme], rows.get("fp16", {}))):
        ratio = rows[scheme]["late_tok_s"] / rows["fp16"]["late_tok_s"]
        print(f"decode speed at the end of the context {scheme} / fp16: {ratio:.2f}x")
    for label, r in rows.items():
        for name, got in r.get("sampled_tok_s", {}).items():
            got = f"{got:.1f} tok/s" if isinstance(got, float) else got
            sampling = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in SAMPLINGS[name].items())
            print(f"{label}: decode with {name} ({sampling}): {got}")
    for label, r in rows.items():
        if r.get("turn_ttft_ms") is not None:
            print(f"{label}: TTFT of a follow-up turn ({TURN} new tokens after the answer, "
                  f"lengths not seen before): {r['turn_ttft_ms']:.1f} ms")  # fmt: skip
    for label, r in rows.items():
        if "long_prefill" in r:
            print(f"{label}: {long_prefill_line(r['long_prefill'])}")
    glue = "fused kernels" if fused.ENABLED else "PyTorch ops (VPTQ_DECODE_FUSED=0)"
    print(f"norms, RoPE, attention and SiLU in the decode step: {glue}")
    if "error" not in rows[scheme]:
        r = rows[scheme]
        print(f"{scheme}: sliced decode layout on {r['sliced_layers']} layers, "
              f"{r['layout_gib']:+.1f} GiB beside the weights")  # fmt: skip
        tuned = {k: n for k, n in r["paths"].items() if k in ("gemv", "dequant")}
        if tuned:
            print(f"{scheme}: timed faster at one token and taken instead of the sliced GEMV: "
                  + ", ".join(f"{n} layers {k}" for k, n in tuned.items()))  # fmt: skip
    for label, r in rows.items():
        if r.get("host_gib"):
            print(f"{label}: the embedding table ({r['host_gib']:.2f} GiB) in pinned host memory")
