"""Random VPTQ layers and the float64 oracle, written element by element from the formulas of
vptq-format.md §3.1 (deliberately unlike the gather/reshape code it checks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.formats.vptq import VQLayerSpec
from engine.formats.vptq_writer import layer_tensors


@dataclass
class RandomLayer:
    spec: VQLayerSpec
    i1: np.ndarray  # [G, R, S]
    i2: np.ndarray | None
    oi: np.ndarray | None  # [R0, P]
    C: np.ndarray  # [G, k, v]
    R: np.ndarray | None
    Co: np.ndarray | None  # [k0, v0]
    perm: np.ndarray | None  # [K]: stored column y holds original column perm[y]
    s: np.ndarray | None
    b: np.ndarray | None
    bias: np.ndarray | None
    tensors: dict[str, torch.Tensor]  # checkpoint tensors of the layer


def make_spec(
    k_in=96,
    n_out=20,
    v=8,
    k=256,
    kr=0,
    g=1,
    p=0,
    v0=-1,
    k0=-1,
    norm=True,
    perm=True,
    bias=False,
    packed=True,
) -> VQLayerSpec:
    return VQLayerSpec(
        in_features=k_in,
        out_features=n_out,
        vector_len=v,
        num_centroids=k,
        num_res_centroids=kr,
        group_num=g,
        group_size=(k_in - p) // g,
        outlier_size=p,
        outlier_vector_len=v0,
        outlier_centroids=k0,
        enable_norm=norm,
        enable_perm=perm,
        bias=bias,
        packed=packed,
    )


def random_layer(spec: VQLayerSpec, seed: int = 0, dtype=torch.float32) -> RandomLayer:
    rng = np.random.default_rng(seed)
    g, r, s, v = spec.group_num, spec.num_indices, spec.group_size, spec.vector_len
    i1 = rng.integers(0, spec.num_centroids, (g, r, s))
    C = rng.standard_normal((g, spec.num_centroids, v))
    i2 = R = oi = Co = perm = sc = bs = bias = None
    if spec.num_res_centroids:
        i2 = rng.integers(0, spec.num_res_centroids, (g, r, s))
        R = 0.1 * rng.standard_normal((g, spec.num_res_centroids, v))
    if spec.has_outliers:
        oi = rng.integers(0, spec.outlier_centroids, (spec.num_outlier_indices, spec.outlier_size))
        Co = rng.standard_normal((spec.outlier_centroids, spec.outlier_vector_len))
    if spec.enable_perm:
        perm = rng.permutation(spec.in_features)
    if spec.enable_norm:
        sc = rng.uniform(0.5, 2.0, spec.in_features)
        bs = rng.uniform(-1.0, 1.0, spec.in_features)
    if spec.bias:
        bias = rng.standard_normal(spec.out_features)

    def stored(a):  # the values exactly as the checkpoint will hold them
        return None if a is None else torch.tensor(a).to(dtype).double().numpy()

    C, R, Co, sc, bs, bias = map(stored, (C, R, Co, sc, bs, bias))
    layer = RandomLayer(spec, i1, i2, oi, C, R, Co, perm, sc, bs, bias, {})
    layer.tensors = checkpoint_tensors(layer, dtype)
    return layer


def checkpoint_tensors(L: RandomLayer, dtype) -> dict[str, torch.Tensor]:
    spec = L.spec

    def f(a):
        return torch.tensor(a, dtype=torch.float64).to(dtype)

    books = {"centroids.weight": f(L.C.reshape(spec.group_num, -1))}
    if L.R is not None:
        books["res_centroids.weight"] = f(L.R.reshape(spec.group_num, -1))
    if L.Co is not None:
        books["outlier_centroids.weight"] = f(L.Co.reshape(1, -1))
        books["outlier_indices"] = torch.tensor(L.oi)[None]
    if L.perm is not None:
        books["perm"] = torch.tensor(L.perm)
    if L.s is not None:
        books["weight_scale"], books["weight_bias"] = f(L.s), f(L.b)
    if L.bias is not None:
        books["bias"] = f(L.bias)
    i2 = None if L.i2 is None else torch.tensor(L.i2)
    return layer_tensors(spec, torch.tensor(L.i1), i2, books)


def oracle_dense(L: RandomLayer) -> np.ndarray:
    """W [N, K] in float64, one element at a time."""
    spec = L.spec
    n_out, k_in = spec.out_features, spec.in_features
    v, p, s = spec.vector_len, spec.outlier_size, spec.group_size
    stored_of = np.arange(k_in) if L.perm is None else np.argsort(L.perm)  # original -> stored
    W = np.zeros((n_out, k_in))
    for x in range(k_in):
        y = stored_of[x]
        for o in range(n_out):
            if y < p:
                v0 = spec.outlier_vector_len
                val = L.Co[L.oi[o // v0, y], o % v0]
            else:
                c, e = divmod(y - p, s)
                n, j = divmod(o, v)
                val = L.C[c, L.i1[c, n, e], j]
                if L.R is not None:
                    val += L.R[c, L.i2[c, n, e], j]
            W[o, x] = val * L.s[x] + L.b[x] if L.s is not None else val
    return W


def dequant_args(L: RandomLayer, device="cpu") -> tuple:
    """The reference op's positional tensors, from the checkpoint tensors (as the loader sees)."""
    from engine.ops.reference import as_uint16

    t = L.tensors
    perm = as_uint16(t["perm"]) if "perm" in t else None
    inv = None if perm is None else torch.argsort(perm).to(torch.int32)
    perm = None if perm is None else perm.to(torch.int32)
    return tuple(
        None if x is None else x.to(device)
        for x in (
            t["indices"],
            t["centroids.weight"],
            t.get("res_centroids.weight"),
            t.get("outlier_indices"),
            t.get("outlier_centroids.weight"),
            perm,
            inv,
            t.get("weight_scale"),
            t.get("weight_bias"),
        )
    )
