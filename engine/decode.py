"""Batch-1 decode as one CUDA graph: every layer, then sampling, then the next token and
position written back into the graph's own input buffers. The host never waits for a token
before launching the next step: token ids come back through pinned memory, one step behind.

One graph per sampling setting, a few kept, all sharing one memory pool. Where the sampled
pick is the fused kernel (fused.sample_pick_fused), it reads every setting from a tensor the
graph holds, so one graph serves them all; elsewhere (the PyTorch pick of older GPUs) the
settings are baked into the graph. For heads whose attention is faster on the tensor cores from
some position on (fused.tensor_core_attention_from: 70B's from 8192), a run that gets there
takes a second graph with that attention from that position.
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
    picks (pick_in_place), which read their settings from the graph's tensor, sampled or
    greedy with a repetition penalty (which draws no noise)."""
    if p.temperature == 0 and p.repetition_penalty == 1.0:
        return ("greedy",)
    if pick_in_place:
        return ("sampled",) if p.temperature > 0 else ("greedy", "penalised")
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty)


class Picker:
    """The end of a decode step on the GPU: the next token picked from the logits, and the
    state one step hands the next (its token, position and seen mask), all on the device."""

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device | str):
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # in: token; out: next
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # in: its position; out: +1
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)  # for fused.greedy_pick
        # temperature, top-p, min-p, top-k, repetition penalty: what the fused sampled pick
        # reads (set_params)
        self.params = torch.zeros(5, dtype=torch.float64, device=device)
        # whether the sampled pick is the fused kernel, which reads them (graph_key): asked of
        # an empty tensor of the logits' shape, type and device
        self.pick_in_place = fused.sample_pick_fused(
            torch.empty(0, vocab, dtype=dtype, device=device)
        )
        self.gen = torch.Generator(device=device)

    def set_params(self, p: SamplingParams) -> None:
        """The settings the fused sampled pick reads, before any step reads them."""
        settings = [p.temperature, p.top_p, p.min_p, p.top_k, p.repetition_penalty]
        self.params.copy_(torch.tensor(settings, dtype=torch.float64))

    def pick(self, logits: torch.Tensor, p: SamplingParams) -> None:
        """token = the pick from ``logits`` ([1, V]) under ``p``; seen[token] = True; pos += 1."""
        if p.temperature == 0 and p.repetition_penalty == 1.0:  # greedy: one kernel ends it
            fused.greedy_pick(logits, self.token, self.seen, self.pos, self.ticket)
            return
        if self.pick_in_place:
            # any sampling in one kernel, with the noise sample() would draw from the same
            # generator, so the same tokens (none for a greedy pick, as sample())
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            if p.temperature > 0:
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
                p.top_k,
                p.repetition_penalty,
            )
            return
        nxt = sample(logits.float(), p, self.gen, self.seen)  # [1]
        fused.advance(nxt, self.token, self.seen, self.pos)


class GraphDecoder(Picker):
    """Captured decode steps for one model on one GPU."""

    def __init__(self, model: Transformer):
        dtype = model.model.norm.weight.dtype
        super().__init__(model.args.vocab_size, dtype, model.cos.device)
        self.model = model
        self.graphs: OrderedDict[tuple, torch.cuda.CUDAGraph] = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.rng_in_graph = hasattr(torch.cuda.CUDAGraph, "register_generator_state")
        a = model.args
        self.tensor_cores_from = fused.tensor_core_attention_from(
            a.n_heads, a.n_kv_heads, a.head_dim, dtype, model.cos.device
        )

    def _step(self, p: SamplingParams, tensor_cores: bool) -> None:
        logits = self.model.decode(self.token, self.pos, cast=False, tensor_cores=tensor_cores)
        self.pick(logits, p)

    def graph(self, p: SamplingParams, tensor_cores: bool = False) -> torch.cuda.CUDAGraph:
        """The captured step for ``p``; ``tensor_cores``: its attention on the tensor cores."""
        key = graph_key(p, self.pick_in_place) + (("tensor cores",) if tensor_cores else ())
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
                self._step(p, tensor_cores)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        if self.rng_in_graph:
            g.register_generator_state(self.gen)
        with torch.cuda.graph(g, pool=self.pool):
            self._step(p, tensor_cores)
        self.graphs[key] = g
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return g

    def capture(self, p: SamplingParams, tensor_cores: bool = False) -> None:
        """The graph for ``p`` (``tensor_cores``: the one with that attention), captured now (the
        warm-up) rather than at its first run."""
        self.set_params(p)
        self.graph(p, tensor_cores)

    def usable(self, p: SamplingParams) -> bool:
        """Sampling with noise needs the generator registered with the graph (torch >= 2.5)."""
        return p.temperature == 0 or self.rng_in_graph

    def run(
        self, logits: torch.Tensor, pos: int, seen: torch.Tensor, p: SamplingParams, seed: int,
        limit: int,
    ) -> Iterator[int]:  # fmt: skip
        """Yield up to ``limit`` tokens: the one sampled from the prefill ``logits`` ([1, V],
        its position is ``pos``), then one per graph step. Stop iterating at any time: steps
        already launched only wrote KV entries beyond what the caller keeps. Steps at positions
        from ``tensor_cores_from`` on replay the graph whose attention runs on the tensor
        cores, captured here (before anything is set) where this run gets there."""
        self.set_params(p)
        g = self.graph(p)  # capturing draws random numbers: seed after it
        switch = self.tensor_cores_from
        g_tc = None
        if switch is not None and pos + limit - 2 >= switch:  # the last step's position
            g_tc = self.graph(p, tensor_cores=True)
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
                if launched >= 0:  # a step on the token at position pos + launched
                    (g if g_tc is None or pos + launched < switch else g_tc).replay()
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
