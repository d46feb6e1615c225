"""A loaded model plus tokenizer (Session), and one streamed completion (Generation).

The KV cache is kept between requests: a new prompt that shares a prefix with what the cache
already holds (the usual case in a multi-turn chat) only prefills the new tokens.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import ops
from .loader import LoadedModel, Progress, check_device, load_model
from .memory import PREFILL_CHUNK
from .model import Transformer
from .sampling import SamplingParams, recommended_sampling, sample
from .tokenizer import ContextError, Detokenizer, StopMatcher, Tokenizer

# Tokens of the warm-up prompt: more than the decode GEMVs take (engine/ops/cuda.py
# GEMV_MAX_TOKENS), so that it runs the prefill path: dequant + GEMM, attention.
WARM_UP_TOKENS = 16
# On a GPU a follow-up of this many tokens after it: a chat's next turn (new tokens after cached
# ones) runs kernels the first prompt does not, which CUDA loads at their first use. The random
# 8B 2-bit model (engine/bench_e2e.py build) on an H100, each variant in a fresh process after
# the 16-token prompt: the first 37-token turn after 600 took 80.2 ms and the next 29.8; with
# this follow-up in the warm-up 24.4 and 19.6, and a first 150-token prompt 32.3 against 49.0
# (CUDA_MODULE_LOADING=EAGER without it: 28.9 and 19.7, so it is mostly the loading).
WARM_UP_FOLLOW_UP = 40
log = logging.getLogger("engine")


def warm_up_prefills(model: Transformer, n_ctx: int) -> torch.Tensor:
    """The warm-up's prompt (WARM_UP_TOKENS at position 0) and, on a GPU where the context holds
    both, its follow-up (WARM_UP_FOLLOW_UP after it); returns the prompt's last logits [1, V].
    Also what `bench e2e` runs before it times a follow-up turn, as the app does at load."""
    device = model.model.norm.weight.device
    ids = torch.arange(min(WARM_UP_TOKENS, n_ctx), device=device) % model.args.vocab_size
    logits = model(ids[None], 0, last_only=True)[0]
    if device.type == "cuda" and n_ctx >= WARM_UP_TOKENS + WARM_UP_FOLLOW_UP:
        more = torch.arange(WARM_UP_FOLLOW_UP, device=device) % model.args.vocab_size
        model(more[None], WARM_UP_TOKENS, last_only=True)
    return logits


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the previous request
    dropped_messages: int = 0
    ttft_s: float = 0.0
    cuda_graph: bool = False
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Session:
    def __init__(self, loaded: LoadedModel, tokenizer: Tokenizer, kernels: tuple[str, str]):
        self.loaded = loaded
        self.tok = tokenizer
        self.cached: list[int] = []  # tokens whose keys/values sit in the KV cache
        self.kernels, self.kernels_reason = kernels
        self.decoder = None  # engine.decode.GraphDecoder, made on the first GPU generation
        self.recommended = recommended_sampling(loaded.folder)  # the model's generation_config

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_seq_len: int = 4096,
        progress: Progress | None = None,
    ) -> Session:
        """Load a model; on a GPU the CUDA kernels are built (once) and loaded first."""
        dev = check_device(device)  # before the kernels' build, which a missing GPU would skip
        if dev.type == "cuda":  # graph captures, events and streams follow the current device
            torch.cuda.set_device(dev.index or 0)  # "cuda" is the first GPU, as auto is
        use = os.environ.get("VPTQ_CHAT_KERNELS", "cuda") != "reference"
        kernels = ops.prepare(device, progress, use_kernels=use)
        if kernels[0] != "cuda" and torch.device(device).type == "cuda":
            log.warning("CUDA kernels unavailable, using the slow reference path: %s", kernels[1])
        loaded = load_model(path, device, dtype, max_seq_len, progress)
        if progress:
            progress(1.0, "loading tokenizer")
        session = cls(loaded, Tokenizer(loaded.folder, loaded.args.eos_token_ids), kernels)
        if os.environ.get("VPTQ_CHAT_WARM_UP") != "0":
            session.warm_up(progress)
        return session

    @torch.no_grad()
    def warm_up(self, progress: Progress | None = None) -> None:
        """What the first answer would otherwise wait for: the first prefill, where on a GPU the
        kernels PyTorch and we use are loaded (0.1-1.5 s on an H200; then a follow-up's prefill,
        whose kernels a chat's next turn would load) and on the CPU every VPTQ
        layer's weights are expanded to the dense ones the reference path keeps (engine/layers.py;
        seconds for the demo model); on a GPU also the greedy decode graph's capture (about 0.1 s)
        and the samplers' first calls (about 20 ms), and where the sampled pick reads its settings
        from the graph (engine/decode.py graph_key), the sampled graph, which then serves every
        temperature, top-p and min-p (the app's chats sample); where the context reaches the
        position from which the model's attention runs on the tensor cores (70B's 8192), that
        graph's twin with it (else the turn that gets there would wait for its capture). Its KV
        entries are overwritten by the first prompt's (self.cached stays empty). A failure here
        (out of memory, say) is logged and costs only that speed: the first answer meets it
        again and reports it."""
        cuda = self.loaded.device.type == "cuda"
        if progress:
            progress(1.0, "warming up")
        t0 = time.perf_counter()
        model = self.loaded.model
        try:
            logits = warm_up_prefills(model, self.n_ctx)
            if cuda:
                seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                greedy, sampled = SamplingParams(temperature=0), SamplingParams(top_p=0.95)
                gen = torch.Generator(device=logits.device)
                for p in (greedy, sampled):
                    sample(logits, p, gen, seen)
                decoder = self.graph_decoder(greedy)
                if decoder is not None:
                    decoder.capture(greedy)
                    chat = decoder.pick_in_place and decoder.usable(sampled)
                    if chat:
                        decoder.capture(sampled)
                    switch = decoder.tensor_cores_from
                    if switch is not None and switch < self.n_ctx:  # a chat can get there
                        decoder.capture(sampled if chat else greedy, tensor_cores=True)
                torch.cuda.synchronize(self.loaded.device)
        except RuntimeError as e:  # torch.OutOfMemoryError among them
            self.decoder = None
            log.warning("warming up failed (%s); the first answer will start more slowly",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)  # fmt: skip
            return
        log.info("warmed up in %.2f s", time.perf_counter() - t0)

    def graph_decoder(self, p: SamplingParams):
        """The CUDA-graph decoder for these sampling settings, or None (CPU, reference kernels,
        VPTQ_CHAT_CUDA_GRAPH=0, or noisy sampling on a torch without graph-safe generators)."""
        if self.loaded.device.type != "cuda" or os.environ.get("VPTQ_CHAT_CUDA_GRAPH") == "0":
            return None
        if self.decoder is None:
            from .decode import GraphDecoder

            self.decoder = GraphDecoder(self.loaded.model)
        return self.decoder if self.decoder.usable(p) else None

    @property
    def n_ctx(self) -> int:
        return self.loaded.model.max_seq

    def prompt_ids(
        self,
        *,
        messages: list[dict] | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 512,
        continue_final: bool = False,
    ) -> tuple[list[int], int]:
        """Token ids for a chat (``messages``; ``continue_final``: more of its last message,
        an answer) or a raw ``prompt``, and messages dropped."""
        reserve = min(max_new_tokens, self.n_ctx // 2)  # room kept for the answer
        budget = self.n_ctx - reserve
        if messages is not None:
            return self.tok.fit_messages(messages, budget, continue_final)
        if continue_final:
            raise ValueError("'continue' goes with 'messages' (a raw prompt simply goes on)")
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: give some text to complete")
        ids = self.tok.encode(prompt)
        if len(ids) > budget:
            raise ContextError(
                f"the prompt has {len(ids)} tokens, but {budget} of the {self.n_ctx}-token context "
                f"are left for it ({reserve} are kept for the answer); shorten it, lower "
                "--max-new-tokens or load the model with a longer --context"
            )
        return ids, 0

    def generate(self, ids: list[int], params: SamplingParams, dropped: int = 0) -> Generation:
        return Generation(self, ids, params, dropped)

    @torch.no_grad()
    def logits(self, ids: list[int], start: int, last_only: bool) -> torch.Tensor:
        """Run ``ids`` at positions start.. through the model in pieces (the load's size where
        only the last logits are kept, else PREFILL_CHUNK: [T, V] float32 logits of a larger
        piece would not fit its plan; PREFILL_CHUNK again where the larger ones run out of
        memory); returns [T or 1, V]."""
        del self.cached[start:]  # stale beyond start from here on, even if this call fails
        n = self.loaded.prefill_chunk if last_only else PREFILL_CHUNK
        try:
            out = self._pieces(ids, start, last_only, n)
        except torch.OutOfMemoryError:
            if n <= PREFILL_CHUNK:
                raise
            # the room planned at load was taken since (another program on the GPU): the
            # pieces the memory plan holds still fit
            log.warning("prefill in pieces of %d tokens ran out of memory: pieces of %d", n,
                        PREFILL_CHUNK)  # fmt: skip
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            out = self._pieces(ids, start, last_only, PREFILL_CHUNK)
        self.cached.extend(ids)
        return out

    def _pieces(self, ids: list[int], start: int, last_only: bool, n: int) -> torch.Tensor:
        outs = []
        for i in range(0, len(ids), n):
            chunk = torch.tensor([ids[i : i + n]], device=self.loaded.device)
            outs.append(self.loaded.model(chunk, start + i, last_only)[0])
            if last_only:
                outs = outs[-1:]  # only the last piece's logits are kept
        return outs[-1] if last_only else torch.cat(outs)


class Generation:
    """Iterate to get text deltas; ``reason`` and ``stats`` are set when iteration ends."""

    def __init__(self, session: Session, ids: list[int], params: SamplingParams, dropped: int):
        self.s, self.ids, self.p = session, ids, params
        self.stats = Stats(prompt_tokens=len(ids), dropped_messages=dropped)
        self.reason = ""
        self.cancelled = False
        self.tokens: list[int] = []
        self.text_parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator[str]:
        s, p = self.s, self.p
        device = s.loaded.device
        t0 = time.perf_counter()
        reuse = _common_prefix(s.cached, self.ids[:-1])
        self.stats.cached_tokens = reuse
        logits = s.logits(self.ids[reuse:], reuse, last_only=True)  # [1, V]
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
        seen[torch.tensor(self.ids, device=device)] = True
        detok, stops = Detokenizer(s.tok, self.ids), StopMatcher(p.stop)
        eos = set(s.tok.eos_ids)
        base = len(s.cached)
        limit = max(1, min(p.max_new_tokens, s.n_ctx - base + 1))
        decoder = s.graph_decoder(p)
        self.stats.cuda_graph = decoder is not None
        if decoder is not None:
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(6), "little")
            tokens = decoder.run(logits, base, seen, p, seed, limit)
        else:
            tokens = self._eager(logits, seen)
        t_first = t0
        for token in tokens:
            if not self.tokens:
                t_first = time.perf_counter()
            self.tokens.append(token)
            if token in eos:
                self.reason = "stop"
                break
            text, hit = stops.feed(detok.push(token))
            if text:
                self.text_parts.append(text)
                yield text
            if hit:
                self.reason = "stop"
                break
            if len(self.tokens) >= limit:
                self.reason = "length"
                break
            if self.cancelled:
                self.reason = "cancelled"
                break
        if decoder is not None:  # the graph wrote the KV of every token but the last
            s.cached.extend(self.tokens[:-1])
        if self.reason != "stop":
            tail = stops.feed(detok.flush())[0] + stops.flush()
            if tail:
                self.text_parts.append(tail)
                yield tail
        self._finish(t0, t_first, reuse)

    def _eager(self, logits: torch.Tensor, seen: torch.Tensor) -> Iterator[int]:
        """One token per step with plain kernel launches (the CPU path, and the reference)."""
        s, p = self.s, self.p
        gen = p.make_generator(logits.device)
        while True:
            token = int(sample(logits, p, gen, seen)[0])
            yield token
            seen[token] = True
            logits = s.logits([token], len(s.cached), last_only=True)

    def _finish(self, t0: float, t_first: float, reuse: int) -> None:
        now = time.perf_counter()
        st = self.stats
        st.completion_tokens = len(self.tokens)
        st.ttft_s = t_first - t0
        st.prefill_tok_s = (len(self.ids) - reuse) / max(st.ttft_s, 1e-9)
        if len(self.tokens) > 1:
            st.decode_tok_s = (len(self.tokens) - 1) / max(now - t_first, 1e-9)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
