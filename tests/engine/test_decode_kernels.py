"""The fused decode-step kernels (csrc/vptq_decode.cu) against float64 oracles and the PyTorch
code they replace (marker gpu)."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.loader import load_model
from engine.model import rotate
from engine.ops import arch
from engine.ops import decode as fused

from .hf_models import make_hf_model
from .sampling_oracle import PICK_SETTINGS, allowed_tokens, chat_logits, seen_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]
DTYPES = [torch.float16, torch.bfloat16]


def ulps(dtype) -> float:
    return torch.finfo(dtype).eps


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def twin(fn, *args):
    """The PyTorch code a fused op replaces: the same wrapper with the kernels turned off."""
    old = fused.ENABLED
    fused.ENABLED = False
    try:
        return fn(*args)
    finally:
        fused.ENABLED = old


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (3, 576), (2, 4100), (1, 12288)])
def test_rms_norm_matches_float64(rows, hidden, dtype):
    g = torch.Generator(device="cuda").manual_seed(hidden)
    x = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    r = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype)
    eps = 1e-5
    out = fused.rms_norm(x, w, eps)
    both, total = fused.rms_norm(x, w, eps, r)
    assert torch.equal(total, x + r)  # the residual sum as PyTorch rounds it
    for got, src in ((out, x), (both, x + r)):
        s = src.double()
        want = w.double() * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + eps)
        base = rel(twin(fused.rms_norm, src, w, eps), want)
        assert rel(got, want) <= 1.5 * base + ulps(dtype) / 8
        assert got.dtype == dtype and got.shape == src.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_pytorch(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = (3 * torch.randn(2, 14336, device="cuda", generator=g)).to(dtype)
    up = torch.randn(2, 14336, device="cuda", generator=g).to(dtype)
    got = fused.silu_mul(gate, up)
    want = F.silu(gate) * up
    # each rounding as PyTorch's; exp may differ in its last bit, so allow one unit
    assert ((got.float() - want.float()).abs() <= 2 * ulps(dtype) * want.float().abs()).all()
    gd = gate.double()
    assert rel(got, gd / (1 + torch.exp(-gd)) * up.double()) < ulps(dtype)


def caches(hkv, s, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(1, hkv, s, d, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, hkv, s, d, device="cuda", generator=g).to(dtype)
    return k, v


def rope_tables(s, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    ang = torch.cat((ang, ang), -1)
    return ang.cos().float().cuda(), ang.sin().float().cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", [0, 17, 63])
@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (9, 3, 64)])
def test_rope_kv_rotates_and_writes_the_cache_at_pos(h, hkv, d, pos, dtype):
    s = 64
    kc, vc = caches(hkv, s, d, dtype, seed=1)
    before_k, before_v = kc.clone(), vc.clone()
    cos, sin = rope_tables(s, d)
    g = torch.Generator(device="cuda").manual_seed(pos)
    q = torch.randn(1, 1, h * d, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, 1, hkv * d, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, 1, hkv * d, device="cuda", generator=g).to(dtype)
    p = torch.tensor([pos], device="cuda")
    q_rot = fused.rope_kv(q, k, v, cos, sin, p, kc, vc)
    c, sn = cos[pos : pos + 1], sin[pos : pos + 1]
    want_q = rotate(q.view(1, 1, h, d).transpose(1, 2), c, sn)  # engine/model.py's RoPE
    want_k = rotate(k.view(1, 1, hkv, d).transpose(1, 2), c, sn)
    assert torch.equal(q_rot, want_q)  # same roundings: bit for bit
    assert torch.equal(kc[:, :, pos], want_k[:, :, 0])
    assert torch.equal(vc[:, :, pos], v.view(1, hkv, d))
    others = torch.arange(s, device="cuda") != pos
    assert torch.equal(kc[:, :, others], before_k[:, :, others])
    assert torch.equal(vc[:, :, others], before_v[:, :, others])
    # float64 check of the rotation itself
    qd = q.double().view(h, d)
    rot = torch.cat((-qd[:, d // 2 :], qd[:, : d // 2]), -1)
    assert rel(q_rot.view(h, d), qd * c.double() + rot * sn.double()) < ulps(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,start", [(5, 0), (37, 17), (1, 63), (64, 0)])
@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (9, 3, 64), (6, 2, 96)])
def test_rope_prefill_matches_rotate_and_the_cache_update(h, hkv, d, t, start, dtype):
    """A prefill's tokens: the rotated q and the whole caches afterwards bit for bit as
    engine/model.py's rotate and KVCache.update leave them (the code it replaces)."""
    from engine.kv_cache import KVCache

    s = 64
    kc, vc = caches(hkv, s, d, dtype, seed=t)
    want_cache = KVCache(kc.clone(), vc.clone())
    cos, sin = rope_tables(s, d)
    c, sn = cos[start : start + t], sin[start : start + t]
    g = torch.Generator(device="cuda").manual_seed(start)
    q = torch.randn(1, t, h * d, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, t, hkv * d, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, t, hkv * d, device="cuda", generator=g).to(dtype)
    assert fused.rope_prefill_fused(q, k, v, kc)
    q_rot = fused.rope_prefill(q, k, v, c, sn, start, kc, vc)
    want_q = rotate(q.view(1, t, h, d).transpose(1, 2), c, sn)
    want_k = rotate(k.view(1, t, hkv, d).transpose(1, 2), c, sn)
    want_cache.update(start, want_k, v.view(1, t, hkv, d).transpose(1, 2))
    assert q_rot.shape == (1, h, t, d) and q_rot.is_contiguous()
    assert torch.equal(q_rot, want_q)
    assert torch.equal(kc, want_cache.k) and torch.equal(vc, want_cache.v)
    # float64 check of the rotation: token i at position start + i
    qd = q.double().view(t, h, d)
    rot = torch.cat((-qd[..., d // 2 :], qd[..., : d // 2]), -1)
    angles = (qd * c.double()[:, None] + rot * sn.double()[:, None]).transpose(0, 1)
    assert rel(q_rot[0], angles) < ulps(dtype)


def test_rope_prefill_passes_opcheck_and_rejects_bad_input():
    dtype = torch.float16
    h, hkv, d, s, t = 8, 2, 64, 16, 5
    kc, vc = caches(hkv, s, d, dtype, seed=2)
    cos, sin = rope_tables(s, d)
    q = torch.randn(1, t, h * d, device="cuda", dtype=dtype)
    k = torch.randn(1, t, hkv * d, device="cuda", dtype=dtype)
    op = torch.ops.vptq.rope_kv_prefill
    torch.library.opcheck(op.default, (q, k, k.clone(), cos[3:8], sin[3:8], 3, kc, vc))
    with pytest.raises(RuntimeError, match=r"tokens 12 \.\. 16 lie beyond the cache of 16"):
        op(q, k, k, cos[:5], sin[:5], 12, kc, vc)
    with pytest.raises(RuntimeError, match="k and v must hold 128 values a token"):
        op(q, k[..., :64].contiguous(), k, cos, sin, 0, kc, vc)
    with pytest.raises(RuntimeError, match=r"same 1 \.\. 65535 tokens, not 5, 4, 5"):
        op(q, k[:, :4].contiguous(), k, cos, sin, 0, kc, vc)
    with pytest.raises(RuntimeError, match=r"cos and sin must be float32 \[T, 64\] rows"):
        op(q, k, k, cos[:4], sin, 0, kc, vc)
    with pytest.raises(RuntimeError, match="but the activations are Half"):
        op(q.float(), k, k, cos, sin, 0, kc, vc)
    with pytest.raises(RuntimeError, match="k_cache and v_cache differ in shape"):
        op(q, k, k, cos, sin, 0, kc, vc[:, :1])
    # what the model falls back to the PyTorch code for: a batch of two, a strided q
    assert not fused.rope_prefill_fused(q.expand(2, -1, -1), k, k, kc)
    assert not fused.rope_prefill_fused(q[..., ::2], k, k, kc)


def test_a_model_prefills_the_same_with_the_rope_kernel(tmp_path, monkeypatch):
    """The whole model: a prompt and a follow-up prefilled with rope_prefill give the logits
    and the KV cache that the PyTorch RoPE and cache update give, bit for bit."""
    make_hf_model("llama3", tmp_path, hidden_size=256, head_dim=64)
    gpu = load_model(tmp_path, "cuda", torch.float16, max_seq_len=64).model
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(5)).cuda()
    calls = []
    real = fused.rope_prefill

    def counted(*args):
        calls.append(args[0].shape[1])
        return real(*args)

    def run():
        with torch.no_grad():
            first = gpu(tokens[:, :19])
            follow = gpu(tokens[:, 19:], 19)
        cache = gpu.model.layers[1].self_attn.cache
        return first, follow, cache.k[:, :, :30].clone(), cache.v[:, :, :30].clone()

    monkeypatch.setattr(fused, "rope_prefill", counted)
    got = run()
    assert calls == [19] * 2 + [11] * 2  # two layers, two calls
    monkeypatch.setattr(fused, "rope_prefill_fused", lambda *_: False)
    want = run()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def attention_oracle(q, kc, vc, pos, window):
    """float64 softmax attention of one token over keys max(0, pos - window + 1) .. pos."""
    _, h, _, d = q.shape
    hkv = kc.shape[1]
    lo = 0 if window is None else max(0, pos - window + 1)
    k = kc[0, :, lo : pos + 1].double().repeat_interleave(h // hkv, 0)  # [H, n, D]
    v = vc[0, :, lo : pos + 1].double().repeat_interleave(h // hkv, 0)
    s = torch.einsum("hd,hnd->hn", q.double().view(h, d), k) / math.sqrt(d)
    return torch.einsum("hn,hnd->hd", torch.softmax(s, -1), v).reshape(1, 1, h * d)


ATTN = {  # query heads, KV heads, head dim, cache length
    "llama8b": (32, 8, 128, 4096),
    "llama70b": (64, 8, 128, 600),
    "qwen7b": (28, 4, 128, 300),
    "smollm": (9, 3, 64, 77),
    "mha": (4, 4, 64, 33),
    "one-split": (4, 2, 64, 20),
    "many-splits": (8, 2, 128, 2400),  # 75 splits on 132 SMs: past the merge's first batch
    "mistral-large": (96, 8, 128, 50),  # 12 query heads a KV head: blocks of 4 (3 a KV head)
    "gqa-16": (32, 2, 64, 700),  # blocks of 4 of the 16, 4 blocks reading each KV head
    # long contexts: each warp goes through many batches of keys, two at a time, an odd count
    # for some warps and splits (session 36's double-buffered loads)
    "long-8b": (32, 8, 128, 20000),
    "long-70b": (64, 8, 128, 9001),
}


def tensor_cores_refused(cores: str) -> bool:
    """Whether this run's GPU (or the older one it runs as) has no tensor-core attention: then
    asking for it must be an error that says so."""
    return cores == "tensor" and arch.capability() < (8, 0)


@pytest.mark.parametrize("cores", ["cuda", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("name", sorted(ATTN))
def test_decode_attention_matches_float64(name, window, dtype, cores):
    h, hkv, d, s = ATTN[name]
    kc, vc = caches(hkv, s, d, dtype, seed=s)
    g = torch.Generator(device="cuda").manual_seed(h)
    q = torch.randn(1, h, 1, d, device="cuda", generator=g).to(dtype)
    tc = cores == "tensor"
    if tensor_cores_refused(cores):
        with pytest.raises(RuntimeError, match=r"tensor cores needs compute capability 8\.0"):
            fused.attention(q, kc, vc, torch.tensor([0], device="cuda"), window, 0.1, tc)
        return
    for pos in sorted({0, 1, s // 3, s - 1}):
        p = torch.tensor([pos], device="cuda")
        got = fused.attention(q, kc, vc, p, window, d**-0.5, tc)
        want = attention_oracle(q, kc, vc, pos, window)
        assert got.shape == (1, 1, h * d) and got.dtype == dtype
        assert rel(got, want) < 2 * ulps(dtype), (pos, rel(got, want))


@pytest.mark.parametrize("switch", [False, True])
def test_tensor_core_attention_positions_name_heads_the_kernels_take(switch, monkeypatch):
    """Every entry of the switch table is a head shape decode_attention takes, from a position
    a context can hold; unlisted heads (Llama-3.1-8B's) stay on the CUDA cores, and so does
    everything with the switch off (VPTQ_ATTN_TENSOR_CORES=0)."""
    monkeypatch.setattr(fused, "TENSOR_CORES_SWITCH", switch)
    for (h, hkv, d), start in fused.TENSOR_CORE_FROM.items():
        assert d in fused.ATTN_HEAD_DIMS and h % hkv == 0 and h // hkv in fused.ATTN_GQA
        assert 0 < start <= 131072
    on = switch and arch.capability() >= (8, 0)
    want = fused.TENSOR_CORE_FROM[(64, 8, 128)] if on else None
    cuda = torch.device("cuda")
    assert fused.tensor_core_attention_from(64, 8, 128, torch.float16, cuda) == want
    assert fused.tensor_core_attention_from(32, 8, 128, torch.float16, cuda) is None
    assert fused.tensor_core_attention_from(64, 8, 128, torch.float32, cuda) is None


# ---- inputs as the sliced GEMV's partial sums (engine/ops/decode.py Partial) ----


def partial(shape, terms: int, dtype, seed: int) -> fused.Partial:
    """Random float32 terms of a [*shape] activation; their sum in order, rounded to dtype, is
    what the kernels must read (Partial.whole, checked against float64 in test_decode_ops.py)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return fused.Partial(torch.randn(terms, *shape, device="cuda", generator=g) / 4, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("terms", [65, 33, 17, 9, 2])  # 70B and 8B down: 4 and 2 chunks
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (2, 8192), (1, 576), (1, 4100)])
def test_add_rms_norm_adds_partial_sums(rows, hidden, terms, dtype):
    """H % 32 == 0: a cluster of blocks a row; 4100: one block a row (the general path)."""
    x = partial((rows, hidden), terms, dtype, seed=hidden + terms)
    g = torch.Generator(device="cuda").manual_seed(1)
    r = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).to(dtype)
    out, total = fused.rms_norm(x, w, 1e-5, r)
    want_out, want_total = fused.rms_norm(x.whole(), w, 1e-5, r)  # the whole-tensor kernel
    assert torch.equal(total, want_total)  # round(round(sum of terms) + r), bit for bit
    assert out.dtype == dtype and out.shape == (rows, hidden)
    # the sum of squares is added in another order: the normalised value may round to its
    # neighbour, and times the weight that is up to two units of the output's precision
    diff = (out.float() - want_out.float()).abs()
    assert (diff <= 2 * ulps(dtype) * want_out.float().abs()).all()
    assert (diff > 0).float().mean() < 0.05  # and rarely
    s = want_total.double()
    oracle = w.double() * s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel(out, oracle) <= 1.5 * rel(want_out, oracle) + ulps(dtype) / 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["gate", "up", "both"])
def test_silu_mul_adds_partial_sums(which, dtype):
    gate = partial((1, 14336), 17, dtype, seed=1)
    up = partial((1, 14336), 17, dtype, seed=2)
    g = gate if which != "up" else gate.whole()
    u = up if which != "gate" else up.whole()
    got = fused.silu_mul(g, u)
    assert got.dtype == dtype and got.shape == (1, 14336)
    assert torch.equal(got, fused.silu_mul(gate.whole(), up.whole()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("terms", [33, 17, 5])
def test_rope_kv_adds_partial_sums(terms, dtype):
    h, hkv, d, s, pos = 32, 8, 128, 64, 40
    cos, sin = rope_tables(s, d)
    p = torch.tensor([pos], device="cuda")
    q = partial((1, 1, h * d), terms, dtype, seed=3)
    k = partial((1, 1, hkv * d), terms, dtype, seed=4)
    v = partial((1, 1, hkv * d), terms, dtype, seed=5)
    kc, vc = caches(hkv, s, d, dtype, seed=1)
    kc2, vc2 = kc.clone(), vc.clone()
    got = fused.rope_kv(q, k, v, cos, sin, p, kc, vc)
    want = fused.rope_kv(q.whole(), k.whole(), v.whole(), cos, sin, p, kc2, vc2)
    assert torch.equal(got, want) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


PICK_SIZES = [128256, 32000, 1001, 5, 3_000_000]  # Llama 3's vocabulary, odd, beyond 512 blocks


def pick_logits(v, dtype, seed, case):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(v, device="cuda", generator=g).to(dtype)
    if case == "ties":  # the largest value at three places: the first wins
        at = torch.tensor([v // 2, v // 3, v - 1], device="cuda")
        x[at] = x.max() + 1
    elif case == "nan":  # NaNs count as the largest: the first NaN wins
        x[torch.tensor([v - 1, v // 2], device="cuda")] = float("nan")
    elif case == "-inf":
        x.fill_(-float("inf"))
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["random", "ties", "nan", "-inf"])
@pytest.mark.parametrize("v", PICK_SIZES)
def test_greedy_pick_matches_torch_argmax(v, case, dtype):
    for offset in (0, 1):  # 1: not 16-byte aligned, one value a load
        buf = pick_logits(v + offset, dtype, seed=v + offset, case=case)
        logits = buf[offset:].view(1, v)
        x = logits[0].double().cpu()
        nan = torch.isnan(x).nonzero()  # the oracle: the first NaN, else the first maximum
        want = int(nan[0]) if len(nan) else int((x == x.max()).nonzero()[0])
        token = torch.full((1, 1), 7, dtype=torch.long, device="cuda")
        pos = torch.tensor([41], device="cuda")
        seen = torch.zeros(v, dtype=torch.bool, device="cuda")
        seen[0] = True
        ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
        for step in (1, 2):  # the second call finds the ticket left at zero
            torch.ops.vptq.greedy_pick(logits, token, seen, pos, ticket)
            assert int(token) == want, (step, offset)
            assert int(pos) == 41 + step and int(ticket) == 0
        assert seen[want] and seen[0] and int(seen.sum()) == 1 + (want != 0)


def test_greedy_pick_in_a_graph_and_opcheck():
    v, dtype = 128256, torch.float16
    logits = pick_logits(v, dtype, seed=3, case="random").view(1, v)
    token = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    pos = torch.tensor([0], device="cuda")
    seen = torch.zeros(v, dtype=torch.bool, device="cuda")
    ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.vptq.greedy_pick.default, (logits, token, seen, pos, ticket))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.greedy_pick(logits, token, seen, pos, ticket)
    pos.zero_()
    for step in range(1, 4):
        logits.normal_()
        graph.replay()
        torch.cuda.synchronize()
        assert int(token) == int(logits.float().argmax()) and int(pos) == step
    with pytest.raises(RuntimeError, match="seen"):
        torch.ops.vptq.greedy_pick(logits, token, seen[:5], pos, ticket)


def test_partial_sum_ops_pass_opcheck():
    dtype, terms = torch.float16, 17
    x = partial((1, 1, 256), terms, dtype, seed=0).parts
    r = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
    w = torch.randn(256, device="cuda", dtype=dtype)
    h, hkv, d, s = 8, 2, 128, 40
    kc, vc = caches(hkv, s, d, dtype, seed=5)
    cos, sin = rope_tables(s, d)
    q = partial((1, 1, h * d), terms, dtype, seed=1).parts
    k = partial((1, 1, hkv * d), terms, dtype, seed=2).parts
    p = torch.tensor([7], device="cuda")
    vv = torch.ops.vptq
    torch.library.opcheck(vv.add_rms_norm.default, (x, r, w, 1e-6))
    torch.library.opcheck(vv.silu_mul.default, (x, x.clone(), dtype))
    torch.library.opcheck(vv.silu_mul.default, (x, r))
    torch.library.opcheck(vv.rope_kv.default, (q, k, k.clone(), cos, sin, p, kc, vc))
    with pytest.raises(RuntimeError, match="partial sums only with a residual"):
        vv.rms_norm(x, w, 1e-6)
    with pytest.raises(RuntimeError, match=r"gate .* and up .* differ"):
        vv.silu_mul(x, r[..., :128].contiguous())


def test_decode_ops_pass_opcheck_and_replay_in_a_graph():
    dtype = torch.float16
    h, hkv, d, s = 8, 2, 128, 40
    kc, vc = caches(hkv, s, d, dtype, seed=5)
    cos, sin = rope_tables(s, d)
    x = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
    w = torch.randn(256, device="cuda", dtype=dtype)
    q = torch.randn(1, 1, h * d, device="cuda", dtype=dtype)
    k = torch.randn(1, 1, hkv * d, device="cuda", dtype=dtype)
    p = torch.tensor([7], device="cuda")
    vv = torch.ops.vptq
    torch.library.opcheck(vv.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(vv.add_rms_norm.default, (x, x.clone(), w, 1e-6))
    torch.library.opcheck(vv.silu_mul.default, (x, x.clone()))
    torch.library.opcheck(vv.rope_kv.default, (q, k, k.clone(), cos, sin, p, kc, vc))
    q4 = q.view(1, h, 1, d)
    torch.library.opcheck(vv.decode_attention.default, (q4, kc, vc, p, 0, d**-0.5))
    if not tensor_cores_refused("tensor"):
        torch.library.opcheck(vv.decode_attention.default, (q4, kc, vc, p, 0, d**-0.5, True))
    # one captured step serves every position: pos is read on the device; both kernels, the
    # tensor cores' reading q and the key at pos as rope_kv writes them (early launch)
    for tc in (False, True):
        if tc and tensor_cores_refused("tensor"):
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            q_rot = fused.rope_kv(q, k, k, cos, sin, p, kc, vc)
            out = fused.attention(q_rot, kc, vc, p, None, d**-0.5, tc)
        for pos in (3, 39):
            p.fill_(pos)
            k.normal_()  # a new key at pos each replay
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, fused.attention(q_rot, kc, vc, p, None, d**-0.5, tc))
            assert rel(out, attention_oracle(q_rot, kc, vc, pos, None)) < 2 * ulps(dtype)


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral-window"])
def test_model_decode_with_fused_kernels_matches_the_cpu_float32_model(tmp_path, kind):
    window = {"sliding_window": 8} if kind == "mistral-window" else {}
    make_hf_model(kind.split("-")[0], tmp_path, hidden_size=256, head_dim=64, **window)
    cpu = load_model(tmp_path, "cpu", torch.float32, max_seq_len=64).model
    gpu = load_model(tmp_path, "cuda", torch.float16, max_seq_len=64).model
    a = gpu.args
    assert fused.attention_fused(torch.zeros(1, device="cuda", dtype=torch.float16),
                                 a.n_heads, a.n_kv_heads, a.head_dim)  # fmt: skip
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = cpu(tokens)[0, 12:]  # the oracle: the CPU float32 model, whole sequence at once
        gpu(tokens[:, :12].cuda())
        steps = []
        for i in range(12, 30):
            pos = torch.tensor([i], device="cuda")
            steps.append(gpu.decode(tokens[:, i : i + 1].cuda(), pos)[0])
        got = torch.stack(steps)
        old = fused.ENABLED
        fused.ENABLED = False  # the unfused GPU decode, for comparison
        try:
            gpu(tokens[:, :12].cuda())
            plain = torch.stack([
                gpu.decode(tokens[:, i : i + 1].cuda(), torch.tensor([i], device="cuda"))[0]
                for i in range(12, 30)
            ])  # fmt: skip
        finally:
            fused.ENABLED = old
    assert rel(got, want) <= 1.5 * rel(plain, want) + 1e-3
    assert rel(got, want) < 1e-2


def test_decode_ops_reject_bad_input_with_a_message():
    """A wrong shape or dtype raises with the argument named (a failing check once crashed
    the process instead: csrc/vptq_ops.cpp builds its messages without iostreams)."""
    h16 = dict(device="cuda", dtype=torch.float16)
    x, w = torch.randn(1, 1, 256, **h16), torch.randn(255, **h16)
    with pytest.raises(RuntimeError, match="weight has 255 values, x has 256"):
        torch.ops.vptq.rms_norm(x, w, 1e-6)
    with pytest.raises(RuntimeError, match=r"residual \[1, 2, 256\] and x \[1, 1, 256\] differ"):
        torch.ops.vptq.add_rms_norm(x, torch.randn(1, 2, 256, **h16), w[:1].repeat(256), 1e-6)
    with pytest.raises(RuntimeError, match="up is BFloat16 but the activations are Half"):
        torch.ops.vptq.silu_mul(x, x.bfloat16())
    kc, vc = caches(2, 16, 64, torch.float16, seed=0)
    cos, sin = rope_tables(16, 64)
    p = torch.tensor([3], device="cuda")
    q = torch.randn(1, 1, 9 * 64, **h16)  # 9 query heads over 2 KV heads: not whole groups
    bad_cache = r"k_cache must be \[1, kv_heads, max_seq, head_dim\], not \[2, 16, 64\]"
    with pytest.raises(RuntimeError, match=bad_cache):
        torch.ops.vptq.decode_attention(q, kc[0], vc, p, 0, 0.125)
    heads = "does not take 9 query heads over 2 KV heads of dimension 64"
    with pytest.raises(RuntimeError, match=heads):
        torch.ops.vptq.decode_attention(q, kc, vc, p, 0, 0.125)
    with pytest.raises(RuntimeError, match="pos must be one int64"):
        torch.ops.vptq.decode_attention(q[..., :128], kc, vc, p.int(), 0, 0.125)
    k = torch.randn(1, 1, 2 * 64, **h16)
    with pytest.raises(RuntimeError, match="k and v must hold 128 values"):
        torch.ops.vptq.rope_kv(q, k[..., :64], k, cos, sin, p, kc, vc)
    with pytest.raises(RuntimeError, match="cos and sin must be float32"):
        torch.ops.vptq.rope_kv(q, k, k, cos.half(), sin, p, kc, vc)
    one_head = vc[:, :1]  # [1, 1, 16, 64] beside a [1, 2, 16, 64] k_cache
    for op in (
        lambda: torch.ops.vptq.rope_kv(q, k, k, cos, sin, p, kc, one_head),
        lambda: torch.ops.vptq.decode_attention(q[..., :128], kc, one_head, p, 0, 0.125),
    ):
        with pytest.raises(RuntimeError, match="k_cache and v_cache differ in shape"):
            op()
    with pytest.raises(RuntimeError, match="pos must be one int64"):
        torch.ops.vptq.rope_kv(q, k, k, cos, sin, p.int(), kc, vc)
    assert not fused.attention_fused(q, 9, 2, 64)  # the model keeps SDPA for such heads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 100])  # 16-byte copies; a row of odd alignment
def test_embed_rows_reads_a_pinned_host_table(hidden, dtype):
    """Rows of a table in pinned host memory, equal bit for bit to indexing it; ids outside
    the vocabulary give zeros; the ids are read on the device, so a graph replays for new ids."""
    gen = torch.Generator().manual_seed(hidden)
    table = torch.randn(1000, hidden, generator=gen).to(dtype).pin_memory()
    ids = torch.tensor([[5, 999, 0, 5, 1000, -1]], device="cuda")
    got = fused.embed(table, ids)
    assert got.shape == (1, 6, hidden) and got.is_cuda and got.dtype == dtype
    want = table[ids[0, :4].cpu()]
    assert torch.equal(got[0, :4].cpu(), want)
    assert not got[0, 4:].any()  # 1000 and -1: no such rows
    # opcheck copies its arguments, and a copy is not pinned: it checks the GPU-table form
    torch.library.opcheck(torch.ops.vptq.embed_rows.default, (table.cuda(), ids))
    assert torch.equal(torch.ops.vptq.embed_rows(table.cuda(), ids), got)
    one = torch.tensor([[7]], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused.embed(table, one)
    for i in (3, 998):
        one.fill_(i)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0, 0].cpu(), table[i])


def test_embed_rows_reads_a_table_view_that_starts_off_16_bytes():
    """A view one element into its storage: rows of 16 values, but no row start is 16-byte
    aligned, so the kernel must copy 2 bytes at a time (a 16-byte load would fault)."""
    flat = torch.randn(64 * 16 + 1, generator=torch.Generator().manual_seed(3)).half()
    ids = torch.tensor([[0, 63, 7]], device="cuda")
    for storage in (flat.pin_memory(), flat.cuda()):
        table = storage[1:].view(64, 16)
        assert table.data_ptr() % 16 != 0
        got = torch.ops.vptq.embed_rows(table, ids)
        assert torch.equal(got.reshape(3, 16).cpu(), table.cpu()[ids[0].cpu()])


def test_embed_rows_rejects_an_unpinned_host_table():
    ids = torch.tensor([1], device="cuda")
    with pytest.raises(RuntimeError, match="must be pinned"):
        torch.ops.vptq.embed_rows(torch.zeros(4, 8, dtype=torch.float16), ids)
    with pytest.raises(RuntimeError, match="16-bit floats"):
        torch.ops.vptq.embed_rows(torch.zeros(4, 8).pin_memory(), ids)
    with pytest.raises(RuntimeError, match="ids must be a contiguous CUDA int64"):
        torch.ops.vptq.embed_rows(torch.zeros(4, 8, dtype=torch.float16).pin_memory(), ids.int())


def test_a_model_with_its_embedding_table_in_host_memory_decodes_the_same(tmp_path, monkeypatch):
    """VPTQ_EMBED_ON_HOST=1 (what the loader does by itself when the GPU is short of room):
    the table is pinned host memory, reported as host bytes, and the logits are the same."""
    make_hf_model("llama3", tmp_path, hidden_size=256, head_dim=64)
    monkeypatch.setenv("VPTQ_EMBED_ON_HOST", "0")
    ref = load_model(tmp_path, "cuda", torch.float16, max_seq_len=64)
    monkeypatch.setenv("VPTQ_EMBED_ON_HOST", "1")
    lm = load_model(tmp_path, "cuda", torch.float16, max_seq_len=64)
    table = lm.model.model.embed_tokens.weight
    assert table.device.type == "cpu" and table.is_pinned()
    assert lm.host_bytes == table.numel() * 2 and ref.host_bytes == 0
    assert lm.weight_bytes == ref.weight_bytes - lm.host_bytes
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        assert torch.equal(lm.model(tokens[:, :12]), ref.model(tokens[:, :12]))
        for i in range(12, 20):
            pos = torch.tensor([i], device="cuda")
            t = tokens[:, i : i + 1]
            assert torch.equal(lm.model.decode(t, pos), ref.model.decode(t, pos))


SAMPLE_SIZES = [128256, 151936, 1001, 5, fused.SAMPLE_PICK_MAX_VOCAB]


def pick_kernel() -> bool:
    """Whether the sampled pick is the one kernel (thread block clusters: compute capability 9.0
    or later, also as VPTQ_CUDA_ARCH sees it) or fused.sample_pick's PyTorch code."""
    return arch.capability()[0] >= 9


def sample_args(v: int):
    token = torch.full((1, 1), 7, dtype=torch.long, device="cuda")
    pos = torch.tensor([41], device="cuda")
    seen = torch.zeros(v, dtype=torch.bool, device="cuda")
    return token, seen, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["flat", "peaked", "ties", "masked", "-inf"])
@pytest.mark.parametrize("v", SAMPLE_SIZES)
def test_sample_pick_draws_what_the_float64_oracle_allows(v, case, dtype):
    """Every setting of PICK_SETTINGS twice (top-k, a repetition penalty over a tenth of the
    vocabulary, temperature 0 among them), each pick twice on the same inputs."""
    assert fused.sample_pick_fused(torch.zeros(1, v, dtype=dtype, device="cuda")) == pick_kernel()
    unique = 0
    for draw, settings in enumerate(PICK_SETTINGS * 2):
        temperature, top_p, min_p, top_k, penalty = settings
        logits = chat_logits(v, case, seed=draw).to("cuda", dtype)
        g = torch.Generator(device="cuda").manual_seed(draw)
        noise = torch.empty(1, v, device="cuda").exponential_(1.0, generator=g)
        token, _, pos = sample_args(v)
        before = seen_tokens(v, draw)
        got = []
        for step in (1, 2):  # the same inputs, the same token
            seen = before.to("cuda")
            fused.sample_pick(
                logits, noise, token, seen, pos, temperature, top_p, min_p, top_k=top_k,
                repetition_penalty=penalty,
            )  # fmt: skip
            got.append(int(token))
            assert int(pos) == 41 + step
        allowed = allowed_tokens(logits, noise, *settings, seen=before)
        assert got[0] == got[1] and got[0] in allowed, (draw, got, sorted(allowed)[:5])
        assert bool(seen[got[0]]) and int((seen.cpu() != before).sum()) == (not before[got[0]])
        unique += len(allowed) == 1
    assert unique >= 12


@pytest.mark.parametrize(
    "top_p,top_k,penalty,want",
    [
        # top-p 0.8 keeps the first three (the mass above the fourth is 0.9)
        (0.8, 0, 1.0, [0.5, 0.25, 0.15, 0, 0]),
        # token 0 seen: its logit log 0.5 (negative) times 2 is log 0.25; top-k 3 keeps 0-2
        (1.0, 3, 2.0, [0.25, 0.25, 0.15, 0, 0]),
    ],
    ids=["top-p", "penalty-top-k"],
)
def test_sample_pick_draws_from_the_kept_distribution(top_p, top_k, penalty, want):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03], dtype=torch.float64)
    logits = probs.log().view(1, 5).to("cuda", torch.float16)
    g = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.empty(1, 5, device="cuda")
    token, seen, pos = sample_args(5)
    first_seen = torch.tensor([True, False, False, False, False], device="cuda")
    n = 4000
    got = torch.empty(n, dtype=torch.long, device="cuda")
    for i in range(n):
        noise.exponential_(1.0, generator=g)
        seen.copy_(first_seen)
        fused.sample_pick(
            logits, noise, token, seen, pos, 1.0, top_p, 0.0, top_k=top_k,
            repetition_penalty=penalty,
        )  # fmt: skip
        got[i : i + 1].copy_(token.view(1))
    counts = torch.bincount(got.cpu(), minlength=5).double()
    want = torch.tensor(want, dtype=torch.float64)
    want = want / want.sum() * n
    assert counts[3:].sum() == 0
    sigma = (want[:3] * (1 - want[:3] / n)).sqrt()
    assert bool(((counts[:3] - want[:3]).abs() < 4 * sigma).all()), (counts, want)


def test_sample_pick_in_a_graph_opcheck_and_bad_input():
    v, dtype = 128256, torch.bfloat16
    logits = torch.randn(1, v, device="cuda").to(dtype)
    noise = torch.empty(1, v, device="cuda").exponential_()
    token, seen, pos = sample_args(v)
    args = (logits, noise, token, seen, pos, 0.7, 0.95, 0.0)
    if pick_kernel():
        torch.library.opcheck(torch.ops.vptq.sample_pick.default, args)
    else:
        with pytest.raises(RuntimeError, match=r"needs compute capability 9\.0 or later"):
            torch.ops.vptq.sample_pick(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.sample_pick(*args)
    for _ in range(3):
        logits.copy_(torch.randn(1, v, device="cuda") * 3)
        noise.exponential_()
        pos.fill_(10)
        graph.replay()
        torch.cuda.synchronize()
        assert int(token) in allowed_tokens(logits, noise, 0.7, 0.95, 0.0) and int(pos) == 11
    # the settings in a tensor the graph holds: replays with new ones draw under those
    params = torch.tensor([0.7, 0.95, 0.0, 0, 1.0], dtype=torch.float64, device="cuda")
    if pick_kernel():
        torch.library.opcheck(torch.ops.vptq.sample_pick.default, (*args, params, 20, 1.05))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.sample_pick(*args, params)
    for draw, settings in enumerate(PICK_SETTINGS * 2):
        params.copy_(torch.tensor(settings, dtype=torch.float64))
        logits.copy_(torch.randn(1, v, device="cuda") * 3)
        noise.exponential_()
        before = seen_tokens(v, draw)
        seen.copy_(before)
        graph.replay()
        torch.cuda.synchronize()
        assert int(token) in allowed_tokens(logits, noise, *settings, seen=before), settings
    vv = torch.ops.vptq
    with pytest.raises(RuntimeError, match="params must be a contiguous Double tensor"):
        vv.sample_pick(*args, params.float())
    with pytest.raises(RuntimeError, match="params holds temperature, top_p, min_p, top_k and "
                       "repetition_penalty; got 2"):  # fmt: skip
        vv.sample_pick(*args, params[:2])
    big = fused.SAMPLE_PICK_MAX_VOCAB + 8
    with pytest.raises(RuntimeError, match="beyond what the kernel holds"):
        vv.sample_pick(*sample_big(big))
    with pytest.raises(RuntimeError, match="temperature -1 must be >= 0"):
        vv.sample_pick(logits, noise, token, seen, pos, -1.0, 0.95, 0.0)
    with pytest.raises(RuntimeError, match="top_k -3 >= 0 and repetition_penalty 0 > 0"):
        vv.sample_pick(logits, noise, token, seen, pos, 0.7, 0.95, 0.0, None, -3, 0.0)
    with pytest.raises(RuntimeError, match="noise"):
        vv.sample_pick(logits, noise[:, :5], token, seen, pos, 0.7, 0.95, 0.0)
    assert not fused.sample_pick_fused(torch.zeros(1, big, dtype=dtype, device="cuda"))


def test_bench_sampling_times_every_setting_both_ways(capsys):
    """bench sampling's rows: each setting once a vocabulary, both picks timed, and the
    engine's pick the decoder's (one kernel after the noise on a GPU that runs it)."""
    from engine import bench_sampling

    rows = bench_sampling.run_sampling([("tiny", 5003)])
    assert [r["setting"] for r in rows] == list(bench_sampling.SETTINGS)
    assert all(r["engine"] > 0 and r["pytorch"] > 0 and r["vocab"] == 5003 for r in rows)
    out = capsys.readouterr().out
    assert "tiny 5003" in out and "qwen2.5 recommended" in out
    assert ("PyTorch ops" in out) != pick_kernel()


def sample_big(v: int):
    logits = torch.zeros(1, v, device="cuda", dtype=torch.float16)
    noise = torch.ones(1, v, device="cuda")
    return (logits, noise, *sample_args(v), 0.7, 0.95, 0.0)
