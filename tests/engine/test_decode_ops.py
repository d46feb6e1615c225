"""engine/ops/decode.py on the CPU: a Partial (a projection's output left as the sliced GEMV's
partial sums) is the in-order float32 sum of its terms, and every decode op that takes one
gives what it gives for that sum as a tensor."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.ops import decode as fused

from .sampling_oracle import PICK_SETTINGS, allowed_tokens, chat_logits, seen_tokens


def terms(n: int, shape, seed: int) -> torch.Tensor:
    """n float32 terms of very different sizes (so the order of adding them matters)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 2, n).view(-1, *[1] * len(shape))
    return torch.randn(n, *shape, generator=g) * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_whole_adds_the_terms_in_order_in_float32(dtype):
    parts = terms(17, (3, 40), seed=1)
    got = fused.Partial(parts, dtype).whole()
    assert got.dtype == dtype and got.shape == (3, 40)
    # the oracle: numpy adding in float32, term after term (the kernels' order)
    acc = parts[0].numpy().astype(np.float32)
    for t in parts[1:].numpy():
        acc = (acc + t).astype(np.float32)
    assert torch.equal(got, torch.from_numpy(acc).to(dtype))
    exact = parts.double().sum(0)
    assert float((got.double() - exact).abs().max()) <= float(exact.abs().max()) * 1e-2
    # another order rounds differently somewhere: the order is what the oracle checks
    fwd = fused.Partial(parts, torch.float32).whole()
    assert not torch.equal(fused.Partial(parts.flip(0), torch.float32).whole(), fwd)


def test_decode_ops_read_a_partial_as_its_whole_tensor():
    dtype = torch.bfloat16
    gate, up = (fused.Partial(terms(9, (1, 64), seed=s), dtype) for s in (2, 3))
    want = F.silu(gate.whole()) * up.whole()
    assert torch.equal(fused.silu_mul(gate, up), want)
    assert torch.equal(fused.silu_mul(gate, up.whole()), want)
    x = fused.Partial(terms(9, (1, 64), seed=4), dtype)
    r = torch.randn(1, 64).to(dtype)
    w = torch.rand(64).to(dtype)
    out, total = fused.rms_norm(x, w, 1e-5, r)
    want_out, want_total = fused.rms_norm(x.whole(), w, 1e-5, r)
    assert torch.equal(total, want_total) and torch.equal(out, want_out)
    assert torch.equal(total, x.whole() + r)
    assert torch.equal(fused.rms_norm(x, w, 1e-5), fused.rms_norm(x.whole(), w, 1e-5))
    assert fused.whole(r) is r
    # and against float64 from the exact sums of the terms, within bfloat16's rounding
    g, u, s = gate.parts.double().sum(0), up.parts.double().sum(0), x.parts.double().sum(0)
    s = s + r.double()
    exact = {
        "silu_mul": (fused.silu_mul(gate, up), g * torch.sigmoid(g) * u),
        "rms_norm": (out, w.double() * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)),
        "sum": (total, s),
    }
    for name, (got, oracle) in exact.items():
        err = float((got.double() - oracle).norm() / oracle.norm())
        assert err < 4 * torch.finfo(dtype).eps, (name, err)


def test_greedy_pick_without_kernels_takes_the_first_largest_and_moves_on():
    logits = torch.tensor([[1.0, 7.0, -2.0, 7.0, 3.0]], dtype=torch.bfloat16)
    token, pos = torch.tensor([[4]]), torch.tensor([11])
    seen = torch.tensor([True, False, False, False, False])
    ticket = torch.zeros(1, dtype=torch.int32)
    fused.greedy_pick(logits, token, seen, pos, ticket)
    assert token.tolist() == [[1]] and pos.tolist() == [12]  # the first of the two 7s
    assert seen.tolist() == [True, True, False, False, False]
    logits[0, 2] = float("nan")  # a NaN counts as the largest, as in torch.argmax
    fused.greedy_pick(logits, token, seen, pos, ticket)
    assert token.tolist() == [[2]] and pos.tolist() == [13] and seen[2]


@pytest.mark.parametrize("in_tensor", [False, True], ids=["numbers", "params"])
@pytest.mark.parametrize("case", ["flat", "peaked", "ties", "masked", "-inf"])
@pytest.mark.parametrize("settings", PICK_SETTINGS, ids=str)
def test_sample_pick_without_kernels_draws_what_the_float64_oracle_allows(
    case, settings, in_tensor
):
    """in_tensor: the settings in the params tensor (the graph decoder's), the numbers given
    beside them being others, which must not count."""
    temperature, top_p, min_p, top_k, penalty = settings
    v, unique = 5003, 0
    for draw in range(12):
        logits = chat_logits(v, case, seed=draw)
        g = torch.Generator().manual_seed(100 + draw)
        noise = torch.empty(1, v).exponential_(1.0, generator=g)
        token = torch.zeros(1, 1, dtype=torch.long)
        pos = torch.tensor([41])
        seen = seen_tokens(v, draw)
        before = seen.clone()
        if in_tensor:
            params = torch.tensor(settings, dtype=torch.float64)
            fused.sample_pick(logits, noise, token, seen, pos, 5.0, 1.0, 0.0, params, 7, 2.0)
        else:
            fused.sample_pick(
                logits, noise, token, seen, pos, temperature, top_p, min_p, top_k=top_k,
                repetition_penalty=penalty,
            )  # fmt: skip
        allowed = allowed_tokens(logits, noise, *settings, seen=before)
        assert int(token) in allowed, (draw, int(token), sorted(allowed)[:5])
        assert int(pos) == 42 and bool(seen[int(token)])
        assert int((seen != before).sum()) == (0 if before[int(token)] else 1)
        unique += len(allowed) == 1
    assert unique >= 10  # the oracle pins the token nearly always


def test_the_sampled_pick_kernel_is_chosen_only_where_it_fits():
    h100 = 227 * 1024  # shared memory a block, opt-in
    assert fused.sample_pick_fits(128256, 9, h100)  # Llama 3 on an H100 or H200
    assert fused.sample_pick_fits(151936, 9, h100)  # Qwen 2.5
    assert fused.sample_pick_fits(fused.SAMPLE_PICK_MAX_VOCAB, 9, h100)
    assert not fused.sample_pick_fits(fused.SAMPLE_PICK_MAX_VOCAB + 8, 9, h100)
    assert not fused.sample_pick_fits(128256, 8, 163 * 1024)  # an A100: no clusters
    assert not fused.sample_pick_fits(128256, 12, 99 * 1024)  # a GeForce RTX 5090
    assert not fused.sample_pick_fits(32768, 12, 99 * 1024)  # even Mistral's small vocabulary
    assert not fused.sample_pick_fused(torch.zeros(1, 1000))  # CPU logits: the PyTorch code


def test_the_sampled_pick_limits_match_the_kernel_source():
    """sample_pick_fits decides on the CPU what the kernel takes; its limits are the constants
    of csrc/vptq_decode.cu, read here from the source so that neither drifts alone."""
    src = (Path(__file__).resolve().parents[2] / "csrc" / "vptq_decode.cu").read_text()

    def const(name: str) -> int:
        m = re.search(rf"constexpr int {name} = ([0-9 *]+);", src)
        assert m, f"{name} not found in csrc/vptq_decode.cu"
        return math.prod(int(f) for f in m.group(1).split("*"))

    cluster, per = const("kSampleCluster"), const("kSampleMaxPer")
    hist = const("kSampleBins") * const("kSampleThreads") * 4
    assert cluster * per == fused.SAMPLE_PICK_MAX_VOCAB
    # the histogram and the small static arrays beside it; a block of the largest vocabulary
    # still fits an H100's 227 KiB
    assert hist <= fused.SAMPLE_PICK_SMEM <= hist + 16 * 1024
    assert fused.SAMPLE_PICK_SMEM + 4 * per <= 227 * 1024


def test_graph_keys_tell_apart_only_what_a_graph_bakes_in():
    """Greedy steps share one graph whatever the (unused) top-p; the fused pick reads every
    setting from the graph's tensor, so its sampled steps share one too, and its greedy steps
    with a repetition penalty another (no noise drawn); the PyTorch pick (pick_in_place
    False) bakes its settings in."""
    from engine.decode import graph_key
    from engine.sampling import SamplingParams as P

    assert graph_key(P(temperature=0), True) == graph_key(P(temperature=0, top_p=0.5), False)
    chat, other = P(temperature=0.7, top_p=0.95), P(temperature=1.2, top_p=0.5, min_p=0.1)
    qwen = P(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert graph_key(chat, True) == graph_key(other, True) == graph_key(qwen, True)
    assert graph_key(chat, True) != graph_key(P(temperature=0), True)
    assert graph_key(chat, False) != graph_key(other, False) != graph_key(qwen, False)
    assert graph_key(P(temperature=0.7, top_k=40), False) != graph_key(
        P(temperature=0.9, top_k=40), False
    )
    penalty = P(temperature=0, repetition_penalty=1.3)
    assert graph_key(penalty, True) == graph_key(P(temperature=0, repetition_penalty=1.2), True)
    assert graph_key(penalty, True) not in (
        graph_key(P(temperature=0), True),
        graph_key(chat, True),
    )
    assert graph_key(penalty, False) != graph_key(P(temperature=0, repetition_penalty=1.2), False)
