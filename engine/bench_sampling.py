"""``python -m engine bench sampling``: the pick that ends a decode step, fused and not.

For each sampling setting (greedy, the chat's default, a model's recommendation with top-k and
a repetition penalty, ...) and vocabulary size: the engine's pick (engine/decode.py Picker: one
kernel, ``vptq::greedy_pick`` or ``vptq::sample_pick``, after PyTorch's exponential noise)
against the PyTorch pick it replaces (engine/sampling.py ``sample``, then the bookkeeping),
both captured in a CUDA graph as the decode step runs them, timed in the same run. A pick
reads a row of logits, the noise and the seen mask, a few hundred kilobytes that stay in L2,
so its time is barriers and latency, not bandwidth: each row also prints the GB/s those bytes
would take from DRAM against the device's read rate, which shows how far from that bound it
is.
"""

from __future__ import annotations

import torch

from .bench import start_gpu_bench, time_us
from .decode import Picker
from .ops import decode as fused
from .sampling import SamplingParams, sample

VOCABS = [("llama-3", 128256), ("qwen2.5", 152064)]
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "greedy, penalty 1.05": dict(temperature=0.0, repetition_penalty=1.05),
    "chat default": dict(temperature=0.7, top_p=0.95),
    "demo recommended": dict(temperature=0.7, top_p=0.95, repetition_penalty=1.05),
    "qwen2.5 recommended": dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
    "top-k 40 alone": dict(temperature=1.0, top_k=40),
}
SEEN = 0.02  # the share of the vocabulary a conversation has marked seen


def picks(vocab: int, p: SamplingParams, dtype=torch.float16):
    """The engine's pick and the PyTorch one, each a callable that ends a step on the same
    logits (a chat-like row: a few likely tokens over a long tail), and the bytes the engine's
    reads: the logits, the noise where it samples, the seen mask where it penalises."""
    picker = Picker(vocab, dtype, "cuda")
    picker.set_params(p)
    # the default generator, which a graph captures without being told (bench.time_us)
    picker.gen = gen = torch.cuda.default_generators[torch.cuda.current_device()]
    gen.manual_seed(vocab)
    logits = (torch.randn(1, vocab, device="cuda", generator=gen) * 3).to(dtype)
    picker.seen.copy_(torch.rand(vocab, device="cuda", generator=gen) < SEEN)

    def pytorch():
        nxt = sample(logits.float(), p, gen, picker.seen)
        fused.advance(nxt, picker.token, picker.seen, picker.pos)

    nbytes = vocab * (logits.element_size() + 4 * (p.temperature > 0))
    nbytes += vocab * (p.repetition_penalty != 1.0)  # the seen mask
    return (lambda: picker.pick(logits, p)), pytorch, nbytes


def run_sampling(vocabs: list[tuple[str, int]] | None = None) -> list[dict]:
    """Print and return a row a vocabulary (name, size) and setting."""
    vocabs = vocabs or VOCABS
    peak = start_gpu_bench("sampling")
    probe = torch.zeros(1, max(v for _, v in vocabs), dtype=torch.float16, device="cuda")
    print("the pick that ends a decode step, in a CUDA graph: the engine's (one kernel after "
          "the noise" + ("" if fused.sample_pick_fused(probe) else
                         "; this GPU runs its sampled pick as PyTorch ops") +
          ") against engine/sampling.py sample; GB/s: logits (noise, seen mask) over the "
          "engine's time")  # fmt: skip
    print(f"{'vocabulary':<18} {'setting':<22} {'engine us':>9} {'GB/s':>6} {'%':>4} "
          f"{'PyTorch us':>10} {'PyTorch/engine':>14}")  # fmt: skip
    rows = []
    for vname, vocab in vocabs:
        for sname, kw in SETTINGS.items():
            engine, pytorch, nbytes = picks(vocab, SamplingParams(**kw))
            us = {name: time_us([fn]) for name, fn in (("engine", engine), ("pytorch", pytorch))}
            gbs = nbytes / (us["engine"] * 1e-6) / 1e9
            print(
                f"{f'{vname} {vocab}'.strip():<18} {sname:<22} {us['engine']:>9.1f} {gbs:>6.0f} "
                f"{100 * gbs / (peak / 1e9):>4.0f} {us['pytorch']:>10.1f} "
                f"{us['pytorch'] / us['engine']:>13.2f}x"
            )
            rows.append(dict(vocab=vocab, setting=sname, **us, gbs=gbs))
    return rows
