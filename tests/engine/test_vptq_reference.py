"""The reference dequant and quantized linear against the float64 element-wise oracle."""

import numpy as np
import pytest
import torch

from engine.ops.reference import vptq_dequant, vptq_linear

from .vq_factory import dequant_args, make_spec, oracle_dense, random_layer


def check(spec, seed=0, atol=1e-5):
    L = random_layer(spec, seed)
    got = vptq_dequant(*dequant_args(L), spec=spec, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, oracle_dense(L), atol=atol, rtol=1e-5)
    return L


VARIANTS = {
    # vector lengths 2..16, including 6, 10 and 12 and lengths that leave output padding
    **{f"v{v}": dict(v=v, n_out=37) for v in (2, 3, 4, 5, 6, 7, 8, 10, 12, 16)},
    # every main index width 1..16
    **{f"k{1 << b}": dict(k=1 << b, v=4, n_out=12, k_in=33) for b in range(1, 17)},
    # residual codebooks, including the widths upstream rejects (13, 14 residual bits)
    **{f"k256-r{1 << b}": dict(kr=1 << b, v=8, n_out=16, k_in=40) for b in (1, 2, 8, 13, 14)},
    "k65536-r65536": dict(k=65536, kr=65536, v=8, n_out=16, k_in=37),
    "k512-r512": dict(k=512, kr=512, v=8, n_out=24, k_in=50),
    "groups": dict(g=2, k_in=96, kr=16),
    "groups4-padding": dict(g=4, k_in=100, n_out=30, v=12),
    "outliers": dict(v0=4, k0=16, p=8, k_in=96, n_out=20),
    "outliers-groups": dict(v0=2, k0=8, p=6, g=2, k_in=70, n_out=21, v=4),
    "no-norm": dict(norm=False),
    "no-perm": dict(perm=False),
    "no-norm-no-perm-bias": dict(norm=False, perm=False, bias=True),
    "legacy-unpacked": dict(packed=False, k=4096, v=6, n_out=25),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_dequant_matches_oracle(name):
    check(make_spec(**VARIANTS[name]), seed=len(name))


def test_perm_beyond_int16():
    """K > 32767: perm values are stored as negative int16 and must be read as uint16."""
    spec = make_spec(k_in=33000, n_out=3, v=2, k=4)
    L = check(spec)
    assert int(L.tensors["perm"].min()) < 0


def test_indices_as_float_bit_pattern():
    spec = make_spec(packed=False, k=65536, v=4, n_out=8, k_in=16)
    L = random_layer(spec, 3)
    L.tensors["indices"] = L.tensors["indices"].view(torch.float16)  # legacy fp16 bit-cast
    got = vptq_dequant(*dequant_args(L), spec=spec, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, oracle_dense(L), atol=1e-5)


def test_formula_layer_a():
    """vptq-format.md §7.2: formula-filled layer, checked against the closed form."""
    spec = make_spec(k_in=96, n_out=20, v=8, k=256, kr=16, bias=True)
    L = random_layer(spec)
    n, g = np.meshgrid(np.arange(3), np.arange(96), indexing="ij")
    L.i1, L.i2 = ((37 * n + 11 * g) % 256)[None], ((5 * n + 3 * g) % 16)[None]
    i, j = np.meshgrid(np.arange(256), np.arange(8), indexing="ij")
    L.C = ((i + j / 8) / 256)[None]
    i, j = np.meshgrid(np.arange(16), np.arange(8), indexing="ij")
    L.R = ((j - i) / 64)[None]
    L.perm = (7 * np.arange(96)) % 96
    L.s, L.b, L.bias = 1 + np.arange(96) / 96, -np.arange(96) / 192, np.arange(20) / 10
    from .vq_factory import checkpoint_tensors

    L.tensors = checkpoint_tensors(L, torch.float32)
    words = [w & 0xFFFFFFFF for w in L.tensors["indices"][0, 0, :4].tolist()]
    assert words == [0x1630B000, 0x7C2C9216, 0x54D242F3, 0x6EB63858]
    assert tuple(L.tensors["indices"].shape) == (1, 3, 36)
    W = vptq_dequant(*dequant_args(L), spec=spec, dtype=torch.float64).numpy()
    # closed form: W[o, x] = (C[i1] + R[i2]) at stored column y with perm[y] = x
    for x in range(96):
        y = int(np.nonzero(L.perm == x)[0][0])
        for o in range(20):
            nn_, jj = divmod(o, 8)
            q = (L.i1[0, nn_, y] + jj / 8) / 256 + (jj - L.i2[0, nn_, y]) / 64
            assert W[o, x] == pytest.approx(q * (1 + x / 96) - x / 192, abs=1e-6)


def test_exact_fp16_lookup_is_bit_exact():
    """Codebook values exactly representable in fp16, s = 1, b = 0, no residual: bit-exact."""
    spec = make_spec(k_in=64, n_out=16, v=8, k=256)
    L = random_layer(spec)
    L.C = np.round(L.C * 256).clip(-2047, 2047) / 256
    L.s, L.b = np.ones(64), np.zeros(64)
    from .vq_factory import checkpoint_tensors

    L.tensors = checkpoint_tensors(L, torch.float16)
    got = vptq_dequant(*dequant_args(L), spec=spec, dtype=torch.float16)
    assert torch.equal(got, torch.tensor(oracle_dense(L), dtype=torch.float16))


@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
def test_linear_matches_oracle(tokens):
    spec = make_spec(k_in=96, n_out=20, kr=16, g=2, bias=True)
    L = random_layer(spec, 7)
    x = torch.randn(2, tokens, 96, dtype=torch.float64)
    want = x.numpy() @ oracle_dense(L).T + L.bias
    bias = L.tensors["bias"].double()
    args = tuple(
        a.double() if a is not None and a.is_floating_point() else a for a in dequant_args(L)
    )
    got = vptq_linear(x, bias, *args, spec=spec)
    assert got.shape == (2, tokens, 20)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)  # float32 lookups
