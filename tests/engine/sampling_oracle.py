"""Logits like a chat step's, and the tokens a sampled pick (engine/ops/decode.py sample_pick)
may return, in float64: of the tokens that min-p, top-k and top-p keep, the one with the
largest p / noise. Within ``tol`` of a decision (a token's p at min_p or at the k-th largest,
the mass above it at top_p, two ratios) either answer is allowed, since the picks compute p in
float32; everywhere else exactly one token is."""

import math

import torch

# temperature, top_p, min_p, top_k, repetition penalty: what the pick tests draw with
PICK_SETTINGS = [
    (0.7, 0.95, 0.0, 0, 1.0),  # the app's default
    (1.0, 1.0, 0.0, 0, 1.0),
    (1.3, 0.5, 0.05, 0, 1.0),
    (0.7, 1e-9, 0.0, 0, 1.0),
    (0.7, 0.8, 0.0, 20, 1.05),  # Qwen2.5's recommendation
    (1.0, 1.0, 0.0, 1000, 1.3),  # top-k alone, a strong penalty
    (0.9, 0.95, 0.02, 3, 0.8),  # a penalty below 1 favours the seen tokens
    (0.0, 1.0, 0.0, 0, 1.3),  # greedy with a penalty
]


def seen_tokens(v: int, seed: int) -> torch.Tensor:
    """A seen mask over a tenth of the vocabulary, the most likely tokens of chat_logits'
    rows among them often enough."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(v, generator=g) < 0.1


def chat_logits(v: int, case: str, seed: int) -> torch.Tensor:
    """One row of logits: "flat" (top-p keeps most of them), "peaked", "ties" (a few values
    shared by thousands of tokens), "masked" (most -inf, one NaN), "-inf" (all)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(v, generator=g)
    if case == "peaked":
        x = 4 * x
    elif case == "ties":
        x = torch.randint(0, 6, (v,), generator=g).float()
    elif case == "masked":
        x[torch.rand(v, generator=g) < 0.9] = -float("inf")
        x[v // 3] = float("nan")
    elif case == "-inf":
        x.fill_(-float("inf"))
    return x.view(1, v)


def allowed_tokens(
    logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_p: float, min_p: float,
    top_k: int = 0, penalty: float = 1.0, seen: torch.Tensor | None = None, tol: float = 1e-5,
) -> set[int]:  # fmt: skip
    """The logits of the tokens marked in ``seen`` divided by ``penalty`` (multiplied where
    negative); temperature 0: their argmax; else of the tokens that min-p, top-k (p at least
    the k-th largest) and top-p (less than top_p of the mass strictly above) keep, the one with
    the largest p / noise."""
    x = logits.detach().double().cpu().view(-1)
    if seen is not None and penalty != 1.0:
        was = seen.detach().cpu().view(-1)
        x = torch.where(was, torch.where(x > 0, x / penalty, x * penalty), x)
    if temperature == 0:
        return near_argmax(x, tol)
    x = x / temperature
    e = noise.detach().double().cpu().view(-1)
    finite = x[~x.isnan()]
    if len(finite) == 0 or not torch.isfinite(finite.max()):  # no positive p: the greedy pick
        return near_argmax(x, 0.0)
    p = torch.exp(x - finite.max()).nan_to_num(0.0)
    unsure_min = (p - min_p).abs() < tol  # kept or not by min_p
    p = torch.where(p >= min_p, p, 0.0)  # top-p counts what min-p keeps
    total = float(p.sum())
    # mass of the tokens with a strictly larger p (ties share it)
    ordered, order = p.sort(descending=True)
    before = torch.cumsum(ordered, 0) - ordered
    first = torch.searchsorted(-ordered, -ordered, side="left")  # first of each tie group
    above = torch.empty_like(p)
    above[order] = before[first]
    need = top_p * total
    sure = (p > 0) & ~unsure_min & ((above < need - tol * total) | (above == 0) | (top_p >= 1))
    maybe = (p > 0) | unsure_min
    maybe &= (above <= need + tol * total) | (top_p >= 1)
    if 0 < top_k < len(p):  # at least the k-th largest; a near tie below it may go either way
        kth = float(ordered[top_k - 1])
        near = bool(((p < kth) & (p >= kth * (1 - tol))).any())
        sure &= p > kth * (1 + tol) if near else p >= kth
        maybe &= p >= kth * (1 - tol)
    ratio = p / e
    best = float(ratio[sure].max()) if bool(sure.any()) else float(ratio[maybe].max())
    return {int(i) for i in ((ratio >= best * (1 - tol)) & maybe).nonzero().view(-1)}


def near_argmax(x: torch.Tensor, tol: float) -> set[int]:
    """torch.argmax's answer (a NaN the largest, the first of equals), and any token within
    tol of the largest but not equal to it (the picks compute in float32, where equals stay
    equal)."""
    nan = x.isnan().nonzero()
    if len(nan):
        return {int(nan[0])}
    top = float(x.max())
    first = {int((x == top).nonzero()[0])}
    if tol == 0 or not math.isfinite(top):
        return first
    near = (x >= top - tol * max(1.0, abs(top))) & (x != top)
    return first | {int(i) for i in near.nonzero().view(-1)}
