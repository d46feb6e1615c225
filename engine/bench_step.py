"""``python -m engine bench e2e ... --breakdown``: what each part of a decode step costs the step.

A kernel's own duration says little about a step whose kernels start early and overlap
(programmatic dependent launch): what counts is how much shorter the step gets without it. So
each part is replaced by a view of its input or an uninitialised tensor of its output's shape
(no kernel at all), the decode step is captured again and timed, alternating with the whole
step. Timing only: a step without a part computes nonsense, and the model is restored after.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
from collections.abc import Iterator
from unittest import mock

import torch

from .decode import GraphDecoder
from .model import Transformer
from .ops import decode as fused
from .sampling import SamplingParams

POSITION = 600  # the cache position the steps are timed at (keys read by attention)
REPLAYS = 60
PARTS = {  # label: what is taken out
    "RoPE + KV write": ("rope",),
    "attention": ("attention",),
    "RMSNorm": ("norm",),
    "SiLU gate": ("silu",),
    "RoPE, attention, RMSNorm, SiLU": ("rope", "attention", "norm", "silu"),
    "q+k+v projections": ("qkv",),
    "o projection": ("o",),
    "gate+up projections": ("gate_up",),
    "down projection": ("down",),
    "all projections": ("qkv", "o", "gate_up", "down"),
    "lm_head": ("lm_head",),
}


def _empty(n: int):
    """A linear layer's stand-in: an uninitialised [.., n] output, no kernel."""
    return lambda x, **_: x.new_empty((*x.shape[:-1], n))


def _stand_in(y):
    """y where a part's stand-in passes its input on: a Partial (its sums never added) becomes
    an uninitialised tensor of its shape, no kernel."""
    return y.parts.new_empty(y.shape, dtype=y.dtype) if isinstance(y, fused.Partial) else y


@contextlib.contextmanager
def without(model: Transformer, parts: tuple[str, ...]) -> Iterator[None]:
    """The model with ``parts`` (names of PARTS' values) taken out of its decode step; every
    module and function is as before on exit."""
    with contextlib.ExitStack() as stack:

        def patch(target, name: str, value) -> None:
            stack.enter_context(mock.patch.object(target, name, value))

        if "rope" in parts:
            d = model.args.head_dim
            patch(fused, "rope_kv", lambda q, *_: _stand_in(q).view(1, 1, -1, d).transpose(1, 2))
        if "attention" in parts:
            patch(fused, "attention", lambda q, *_: q.transpose(1, 2).reshape(1, 1, -1))
        if "norm" in parts:
            patch(fused, "rms_norm", lambda x, w, eps, residual=None: _stand_in(x)
                  if residual is None else (_stand_in(x),) * 2)  # fmt: skip
        if "silu" in parts:
            patch(fused, "silu_mul", lambda gate, up: _stand_in(gate))
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if "qkv" in parts:
                patch(attn, "fused", None)
                for m in (attn.q_proj, attn.k_proj, attn.v_proj):
                    patch(m, "forward", _empty(m.out_features))
            if "o" in parts:
                patch(attn.o_proj, "forward", _empty(attn.o_proj.out_features))
            if "gate_up" in parts:
                patch(mlp, "fused", None)
                for m in (mlp.gate_proj, mlp.up_proj):
                    patch(m, "forward", _empty(m.out_features))
            if "down" in parts:
                patch(mlp.down_proj, "forward", _empty(mlp.down_proj.out_features))
        if "lm_head" in parts:  # the output layer, lm_head or the tied embedding table
            patch(model, "output", _empty(model.args.vocab_size))
        yield


def step_us(model: Transformer, position: int = POSITION) -> float:
    """Microseconds of one captured greedy decode step at ``position`` (mean of REPLAYS)."""
    dec = GraphDecoder(model)
    with torch.no_grad():
        graph = dec.graph(SamplingParams(temperature=0))
        dec.pos.fill_(position)
        for _ in range(3):
            graph.replay()
        dec.pos.fill_(position)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()  # the position moves on by one a step, as in a real decode
        end.record()
        end.synchronize()
    del graph, dec
    gc.collect()
    return start.elapsed_time(end) * 1000 / REPLAYS


def breakdown(model: Transformer, rounds: int = 2) -> dict[str, list[float]]:
    """Step microseconds, whole ("whole step") and without each part of PARTS, alternated."""
    times: dict[str, list[float]] = {"whole step": [step_us(model)]}
    for _ in range(rounds):
        for label, parts in PARTS.items():
            with without(model, parts):
                times.setdefault(label, []).append(step_us(model))
            times["whole step"].append(step_us(model))
    return times


def print_breakdown(times: dict[str, list[float]], n_layers: int) -> None:
    whole = statistics.mean(times["whole step"])
    width = max(len("without " + label) for label in PARTS)
    print(f"\ndecode step at position {POSITION} (CUDA graph, {REPLAYS} replays) without each "
          "part, alternated with the whole step:")  # fmt: skip
    print(f"{'whole step':>{width}} {whole:9.1f} us ({1e6 / whole:.1f} tok/s; "
          f"{min(times['whole step']):.1f}-{max(times['whole step']):.1f})")  # fmt: skip
    for label in PARTS:
        t = statistics.mean(times[label])
        each = "" if label == "lm_head" else f" ({(whole - t) / n_layers:5.2f} a layer)"
        print(f"{'without ' + label:>{width}} {t:9.1f} us, saves {whole - t:7.1f} us{each}")
