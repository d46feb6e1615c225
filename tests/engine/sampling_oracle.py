"""Logits like a chat step's, and the tokens a sampled pick (engine/ops/decode.py sample_pick)
may return, in float64: of the tokens that min-p and top-p keep, the one with the largest
p / noise. Within ``tol`` of a decision (a token's p at min_p, the mass above it at top_p, two
ratios) either answer is allowed, since the picks compute p in float32; everywhere else exactly
one token is."""

import torch


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
    tol: float = 1e-5,
) -> set[int]:  # fmt: skip
    x = logits.detach().double().cpu().view(-1) / temperature
    e = noise.detach().double().cpu().view(-1)
    finite = x[~x.isnan()]
    if len(finite) == 0 or not torch.isfinite(finite.max()):  # no positive p: the greedy pick
        nan = x.isnan().nonzero()
        return {int(nan[0])} if len(nan) else {int((x == x.max()).nonzero()[0])}
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
    ratio = p / e
    best = float(ratio[sure].max())
    return {int(i) for i in ((ratio >= best * (1 - tol)) & maybe).nonzero().view(-1)}
