"""Batch-1 decode as one CUDA graph: every layer, then sampling, then the next token and
position written back into the graph's own input buffers. The host never waits for a token
before launching the next step: token ids come back through pinned memory, one step behind.

One graph per sampling setting, a few kept, all sharing one memory pool. Where the sampled
pick is the fused kernel (fused.sample_pick_fused), it reads temperature, top-p and min-p from
a tensor the graph holds, so one graph serves every value of them; elsewhere (top-k, a
repetition penalty, the PyTorch pick of older GPUs) the settings are baked into the graph.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Iterator

import torch

from .model import Transformer
from .ops import decode as fused
from .sampling import SamplingParams, sample

log = logging.getLogger("engine.decode")
MAX_GRAPHS = 4
LAG = 2  # steps in flight before the host reads a token


def graph_key(p: SamplingParams, pick_in_place: bool) -> tuple:
    """What tells one captured step from another: greedy steps are all alike; so are the fused
    sampled picks (pick_in_place), which read their settings from the graph's tensor."""
    if p.temperature == 0 and p.repetition_penalty == 1.0:
        return ("greedy",)
    if pick_in_place and p.top_k == 0 and p.repetition_penalty == 1.0:
        return ("sampled",)
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)


class GraphDecoder:
    """Captured decode steps for one model on one GPU."""

    def __init__(self, model: Transformer):
        self.model = model
        dev = model.cos.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)  # in: token; out: next
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # in: its position; out: +1
        self.seen = torch.zeros(model.args.vocab_size, dtype=torch.bool, device=dev)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=dev)  # for fused.greedy_pick
        # temperature, top-p, min-p: what the fused sampled pick reads (run() sets them)
        self.params = torch.zeros(3, dtype=torch.float64, device=dev)
        # whether the sampled pick is the fused kernel, which reads them (graph_key): asked of
        # an empty tensor of the logits' shape, type and device
        logits = torch.empty(0, model.args.vocab_size, dtype=model.model.norm.weight.dtype)
        self.pick_in_place = fused.sample_pick_fused(logits.to(dev))
        self.gen = torch.Generator(device=dev)
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.rng_in_graph = hasattr(torch.cuda.CUDAGraph, "register_generator_state")

    def _step(self, p: SamplingParams) -> None:
        logits = self.model.decode(self.token, self.pos, cast=False)  # [1, V]
        if p.temperature == 0 and p.repetition_penalty == 1.0:  # greedy: one kernel ends it
            fused.greedy_pick(logits, self.token, self.seen, self.pos, self.ticket)
            return
        if p.top_k == 0 and p.repetition_penalty == 1.0 and self.pick_in_place:
            # the chat's sampling in one kernel, with the noise sample() would draw from the
            # same generator, so the same tokens
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            noise.exponential_(1.0, generator=self.gen)
            fused.sample_pick(  # the settings from self.params (graph_key)
                logits,
                noise,
                self.token,
                self.seen,
                self.pos,
                p.temperature,
                p.top_p,
                p.min_p,
                self.params,
            )
            return
        nxt = sample(logits.float(), p, self.gen, self.seen)  # [1]
        fused.advance(nxt, self.token, self.seen, self.pos)

    def graph(self, p: SamplingParams) -> torch.cuda.CUDAGraph:
        key = graph_key(p, self.pick_in_place)
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        # Warm-up steps write one KV entry at the last position, which no kept token occupies
        # yet (a token's KV is written when it is fed, before anything reads it). run() sets
        # token, position and seen-mask afterwards, so nothing else needs restoring.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: kernels choose their configurations
            for _ in range(2):
                self.pos.fill_(self.model.max_seq - 1)
                self._step(p)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        if self.rng_in_graph:
            g.register_generator_state(self.gen)
        with torch.cuda.graph(g, pool=self.pool):
            self._step(p)
        self.graphs[key] = g
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return g

    def capture(self, p: SamplingParams) -> None:
        """The graph for ``p``, captured now (the warm-up) rather than at its first run."""
        self._set_params(p)
        self.graph(p)

    def _set_params(self, p: SamplingParams) -> None:
        """The settings the fused sampled pick reads, before any step reads them."""
        self.params.copy_(torch.tensor([p.temperature, p.top_p, p.min_p], dtype=torch.float64))

    def usable(self, p: SamplingParams) -> bool:
        """Sampling with noise needs the generator registered with the graph (torch >= 2.5)."""
        return p.temperature == 0 or self.rng_in_graph

    def run(
        self, logits: torch.Tensor, pos: int, seen: torch.Tensor, p: SamplingParams, seed: int,
        limit: int,
    ) -> Iterator[int]:  # fmt: skip
        """Yield up to ``limit`` tokens: the one sampled from the prefill ``logits`` ([1, V],
        its position is ``pos``), then one per graph step. Stop iterating at any time: steps
        already launched only wrote KV entries beyond what the caller keeps."""
        self._set_params(p)
        g = self.graph(p)  # capturing draws random numbers: seed after it
        self.gen.manual_seed(seed)
        self.seen.copy_(seen)
        self.token.copy_(sample(logits, p, self.gen, self.seen).view(1, 1))
        self.seen.index_fill_(0, self.token.view(1), True)
        self.pos.fill_(pos)
        host = torch.empty(LAG + 1, dtype=torch.long, pin_memory=True)
        pending: deque[tuple[int, torch.cuda.Event]] = deque()
        launched = -1  # -1: the first token, sampled above
        while True:
            while launched < limit - 1 and len(pending) < LAG:
                if launched >= 0:
                    g.replay()
                slot = launched % (LAG + 1)
                host[slot : slot + 1].copy_(self.token.view(1), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                pending.append((slot, ev))
                launched += 1
            if not pending:
                return
            slot, ev = pending.popleft()
            ev.synchronize()
            yield int(host[slot])
