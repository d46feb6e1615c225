"""Vector quantization of one weight matrix into the VPTQ layout (arXiv 2409.17066).

``vptq``: input columns permuted by descending Hessian diagonal and min-max normalised per
column; main and residual codebooks from k-means weighted by H_yy * s_y^2 (each column's share
of the output error); then GPTQ-style column-by-column assignment whose error is fed back into
the not-yet-quantized columns through the Cholesky factor of H^-1.
``kmeans``: the same normalisation and codebooks, unweighted, no permutation, no feedback.
``rtn``: a uniform grid codebook (k^(1/v) levels per coordinate), nearest point.
Vectors run along the output dimension: column y of rows n*v .. n*v+v-1 is one vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats.vptq import VQLayerSpec

METHODS = ("rtn", "kmeans", "vptq")


@dataclass
class QuantizedWeight:
    spec: VQLayerSpec
    main: torch.Tensor  # [1, R, K] int64, stored column order
    residual: torch.Tensor | None
    centroids: torch.Tensor  # [1, k*v]
    res_centroids: torch.Tensor | None
    perm: torch.Tensor | None  # [K]: stored column y holds original column perm[y]
    scale: torch.Tensor  # [K] by original column
    bias: torch.Tensor
    dense: torch.Tensor  # [N, K] the dequantized weight, original column order


def nearest(points: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index of the closest codeword for each point; points [P, v], book [k, v]."""
    chunk = max(1024, (1 << 22) // book.shape[0])  # distance blocks of 16 MB stay in cache
    norms = (book * book).sum(1)
    out = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    for i in range(0, points.shape[0], chunk):
        p = points[i : i + chunk]
        out[i : i + chunk] = (norms - 2 * p @ book.T).argmin(1)
    return out


FIT_POINTS = 32768  # k-means fits on a weighted sample of at most this many points


def kmeans(
    points: torch.Tensor,
    weights: torch.Tensor | None,
    k: int,
    iters: int = 20,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Weighted k-means (k-means++ seeding); returns [k, v] centroids. Large inputs are fitted on
    a weighted sample (see fit_sample), which keeps the weighted objective."""
    if points.shape[0] > max(FIT_POINTS, 8 * k):
        points, weights = fit_sample(points, weights, max(FIT_POINTS, 8 * k), gen)
    n, dev = points.shape[0], points.device
    w = torch.ones(n, device=dev) if weights is None else weights.clamp_min(1e-12)
    if n <= k:
        book = torch.zeros(k, points.shape[1], device=dev)
        book[:n] = points
        return book
    sample = torch.multinomial(w, min(n, 20 * k), replacement=False, generator=gen)
    book = _seed(points[sample], w[sample], k, gen)
    for _ in range(iters):
        idx = nearest(points, book)
        total = torch.zeros(k, device=dev).index_add_(0, idx, w)
        sums = torch.zeros_like(book).index_add_(0, idx, points * w[:, None])
        alive = total > 0
        book[alive] = sums[alive] / total[alive, None]
        if (~alive).any():  # re-seed empty clusters at the worst-served points
            err = ((points - book[idx]) ** 2).sum(1) * w
            book[~alive] = points[err.topk(int((~alive).sum())).indices]
    return book


HEAVY_QUANTILE = 0.99


def fit_sample(points, weights, m: int, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
    """About m points standing for all of them in the weighted objective: the heaviest 1% kept
    as they are, the rest drawn in proportion to weight, each standing for an equal share of
    the rest's total weight. Drawing everything in proportion to weight would not do: where a
    few points hold nearly all the weight (a massive-activation channel, as in SmolLM2's
    layer-11 down_proj) the sample is those points repeated, and so is the codebook."""
    if weights is None:
        pick = torch.randint(points.shape[0], (m,), generator=gen, device=points.device)
        return points[pick], None
    w = weights.float().clamp_min(1e-12)
    probe = torch.randperm(w.shape[0], generator=gen, device=w.device)[: 1 << 16]
    heavy = w > torch.quantile(w[probe], HEAVY_QUANTILE)
    if int(heavy.sum()) > m // 2:  # too many to keep: the plain weighted draw
        heavy = torch.zeros_like(heavy)
    rest_w = w[~heavy]
    drawn = m - int(heavy.sum())
    pick = torch.multinomial(rest_w, drawn, replacement=True, generator=gen)
    share = rest_w.sum() / drawn
    return (
        torch.cat([points[heavy], points[~heavy][pick]]),
        torch.cat([w[heavy], share.expand(drawn)]),
    )


SEQUENTIAL_SEEDING = 256  # k-means++ up to this k; above, a weighted sample (Lloyd does the rest)


def _seed(points: torch.Tensor, w: torch.Tensor, k: int, gen) -> torch.Tensor:
    if k > SEQUENTIAL_SEEDING:
        return points[torch.multinomial(w, k, replacement=False, generator=gen)].clone()
    book = [points[torch.multinomial(w, 1, generator=gen)].squeeze(0)]
    d2 = ((points - book[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = (d2 * w).clamp_min(0)
        pick = torch.multinomial(probs if probs.sum() > 0 else w, 1, generator=gen)
        book.append(points[pick].squeeze(0))
        d2 = torch.minimum(d2, ((points - book[-1]) ** 2).sum(1))
    return torch.stack(book)


def grid_codebook(k: int, v: int, device: torch.device | str = "cpu") -> torch.Tensor:
    levels = round(k ** (1 / v))
    if levels**v != k:
        raise ValueError(f"rtn needs k = levels^v; {k} is not a {v}-th power")
    axis = (torch.arange(levels, dtype=torch.float32, device=device) + 0.5) / levels
    return torch.cartesian_prod(*[axis] * v).reshape(k, v)


def grid_nearest(points: torch.Tensor, k: int) -> torch.Tensor:
    """nearest(points, grid_codebook(k, v)) in closed form: round each coordinate to its level;
    the index is the levels in mixed radix, first coordinate most significant."""
    v = points.shape[1]
    levels = round(k ** (1 / v))
    cell = (points * levels).floor().clamp_(0, levels - 1).long()  # [P, v]
    radix = levels ** torch.arange(v - 1, -1, -1, device=points.device)
    return cell @ radix


def quantize_weight(
    w: torch.Tensor,
    h: torch.Tensor | None,
    v: int,
    k: int,
    kr: int = 0,
    method: str = "vptq",
    damp: float = 0.01,
    block: int = 128,
    seed: int = 0,
) -> QuantizedWeight:
    """w: [N, K] float; h: [K, K] Hessian of the layer's inputs (vptq needs it)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "vptq" and h is None:
        raise ValueError("the vptq method needs the layer's Hessian")
    gen = torch.Generator(device=w.device).manual_seed(seed)
    n, kin = w.shape
    if n % v:
        raise ValueError(f"out_features {n} is not a multiple of the vector length {v}")
    w = w.float().clone()
    perm = None
    if method == "vptq":
        h = h.float().clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    lo, hi = w.min(0).values, w.max(0).values
    scale = (hi - lo).clamp_min(1e-8)
    wn = (w - lo) / scale  # [N, K] in [0, 1]
    points = wn.T.reshape(kin * (n // v), v)  # column-major: the vectors of column y together
    weights = None
    if method == "vptq":
        col = torch.diag(h) * scale**2
        weights = col.repeat_interleave(n // v)
    book = grid_codebook(k, v, w.device) if method == "rtn" else kmeans(points, weights, k, gen=gen)
    res_book = None
    if kr:
        first = nearest(points, book)
        res_book = kmeans(points - book[first], weights, kr, gen=gen)
    if method == "vptq":
        main, res, q = _gptq(w, h, lo, scale, book, res_book, v, damp, block)
    else:
        main = grid_nearest(points, k) if method == "rtn" else nearest(points, book)
        q = book[main]
        res = None
        if res_book is not None:
            res = nearest(points - q, res_book)
            q = q + res_book[res]
        q = q.reshape(kin, n).T * scale + lo
        main = main.reshape(kin, n // v).T
        res = None if res is None else res.reshape(kin, n // v).T
    dense = q if perm is None else torch.empty_like(q).index_copy_(1, perm, q)
    s_orig, b_orig = scale, lo
    if perm is not None:
        s_orig = torch.empty_like(scale).index_copy_(0, perm, scale)
        b_orig = torch.empty_like(lo).index_copy_(0, perm, lo)
    spec = VQLayerSpec(
        in_features=kin,
        out_features=n,
        vector_len=v,
        num_centroids=k,
        num_res_centroids=kr,
        group_size=kin,
        enable_perm=perm is not None,
    )
    return QuantizedWeight(
        spec,
        main[None],
        None if res is None else res[None],
        book.reshape(1, -1),
        None if res_book is None else res_book.reshape(1, -1),
        perm,
        s_orig,
        b_orig,
        dense,
    )


def _gptq(w, h, lo, scale, book, res_book, v, damp, block):
    """Assign column by column (stored order), feeding each column's error forward. A column's
    range (lo, scale) is taken when it is reached, from the column as the feedback left it, so
    no value falls outside the codebook's [0, 1] box; lo and scale are updated in place."""
    n, kin = w.shape
    h = h + damp * torch.diag(h).mean() * torch.eye(kin, device=w.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    main = torch.empty(n // v, kin, dtype=torch.int64, device=w.device)
    res = None if res_book is None else torch.empty_like(main)
    q_all = torch.empty_like(w)
    for i1 in range(0, kin, block):
        i2 = min(i1 + block, kin)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            y = i1 + j
            col = w1[:, j]
            lo[y], scale[y] = col.min(), (col.max() - col.min()).clamp_min(1e-8)
            pts = ((col - lo[y]) / scale[y]).reshape(n // v, v)
            idx = nearest(pts, book)
            q = book[idx]
            main[:, y] = idx
            if res_book is not None:
                idx2 = nearest(pts - q, res_book)
                q = q + res_book[idx2]
                res[:, y] = idx2
            qw = q.reshape(n) * scale[y] + lo[y]
            q_all[:, y] = qw
            e = (col - qw) / u[y, y]
            w1[:, j:] -= e[:, None] * u[y, y:i2][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return main, res, q_all


def proxy_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's output error on the calibration inputs."""
    d = (w - q).double()
    return float(torch.trace(d @ h.double() @ d.T))
