"""Our decoder against transformers' own Llama / Mistral / Qwen2 on tiny random checkpoints."""

import pytest
import torch

from engine.loader import load_model

from .hf_models import make_hf_model


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2"])
def test_logits_match_transformers(tmp_path, kind):
    hf = make_hf_model(kind, tmp_path)
    ours = load_model(tmp_path, "cpu", torch.float32, max_seq_len=64)
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours.model(tokens)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_qwen2_has_qkv_bias_and_tied_head(tmp_path):
    make_hf_model("qwen2", tmp_path)
    ours = load_model(tmp_path, "cpu", torch.float32, max_seq_len=16)
    attn = ours.model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert ours.model.lm_head is None


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_kv_cache_decode_equals_full_forward(tmp_path, kind):
    make_hf_model(kind, tmp_path)
    m = load_model(tmp_path, "cpu", torch.float32, max_seq_len=64).model
    tokens = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(tokens)
        steps = [m(tokens[:, :10])]  # a 10-token prefill, then one token at a time
        steps += [m(tokens[:, i : i + 1], start=i) for i in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_the_kv_caches_of_all_layers_are_one_allocation(tmp_path):
    """One tensor for every layer's K and V (KVCache.allocate): each layer gets contiguous,
    zeroed, non-overlapping views of it, and a second setup_caches replaces it."""
    make_hf_model("llama3", tmp_path)
    m = load_model(tmp_path, "cpu", torch.float32, max_seq_len=48).model
    caches = [layer.self_attn.cache for layer in m.model.layers]
    a = m.args
    base = caches[0].k.untyped_storage().data_ptr()
    per = a.n_kv_heads * 48 * a.head_dim * 4  # bytes of one layer's K
    starts = []
    for c in caches:
        for t in (c.k, c.v):
            assert t.shape == (1, a.n_kv_heads, 48, a.head_dim) and t.is_contiguous()
            assert t.untyped_storage().data_ptr() == base and not t.any()
            starts.append(t.data_ptr() - base)
    assert starts == [i * per for i in range(2 * len(caches))]
    assert caches[0].k.untyped_storage().nbytes() == 2 * len(caches) * per
    m.setup_caches(1, 16)
    assert m.model.layers[-1].self_attn.cache.max_seq == 16
    store = m.model.layers[0].self_attn.cache.k.untyped_storage()
    assert store.nbytes() == 2 * len(caches) * per // 3


def test_sliding_window_matches_transformers(tmp_path):
    hf = make_hf_model("mistral", tmp_path, sliding_window=8)
    hf.config._attn_implementation = "eager"
    ours = load_model(tmp_path, "cpu", torch.float32, max_seq_len=64)
    assert ours.args.sliding_window == 8
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours.model(tokens)
        steps = [ours.model(tokens[:, :12])]
        steps += [ours.model(tokens[:, i : i + 1], start=i) for i in range(12, 24)]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=2e-4, rtol=1e-4)


class _Shared:
    """Stands in for engine.layers.SharedInputGroup: answers with the layers' own outputs,
    scaled so that its use shows in the logits, and counts its calls."""

    def __init__(self, linears, scale, takes=True):
        self.linears, self.scale, self.take, self.calls = linears, scale, takes, 0

    def takes(self, x):
        return self.take

    def __call__(self, x):
        self.calls += 1
        return [m(x) * self.scale for m in self.linears]


def test_layers_sharing_an_input_use_the_shared_launch_where_it_takes_the_input(tmp_path):
    make_hf_model("qwen2", tmp_path)  # q, k, v with bias
    m = load_model(tmp_path, "cpu", torch.float32, max_seq_len=16).model
    tokens = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    blocks = [b for b in m.modules() if hasattr(b, "shared_input")]
    assert [len(b.shared_input()) for b in blocks[:2]] == [3, 2]  # q, k, v; gate, up
    with torch.no_grad():
        want = m(tokens)
        for b in blocks:
            b.fused = _Shared(b.shared_input(), 1.0)
        same = m(tokens)
        assert all(b.fused.calls == 1 for b in blocks)
        torch.testing.assert_close(same, want, atol=0, rtol=0)  # same outputs, same logits
        for b in blocks:
            b.fused = _Shared(b.shared_input(), 0.5, takes=False)  # e.g. too many tokens
        assert torch.equal(m(tokens), want) and not any(b.fused.calls for b in blocks)
        blocks[1].fused = _Shared(blocks[1].shared_input(), 0.5)  # the MLP's outputs are used
        assert not torch.allclose(m(tokens), want)


def _attention_oracle(q, k, v, mask):
    """float64 softmax attention, each key head repeated for its group of query heads."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv


def _attention_case(t, s, heads, kv, dtype, device, window=None):
    """q of the last t of s positions ([1, heads, t, 32], transposed as the model has it), k and v
    [1, kv, s, 32] views of a longer cache, and the [t, s] mask (within window)."""
    gen = torch.Generator(device=device).manual_seed(t * 1000 + s)
    q = torch.randn(1, t, heads, 32, dtype=dtype, device=device, generator=gen).transpose(1, 2)
    cache = torch.randn(2, 1, kv, s + 7, 32, dtype=dtype, device=device, generator=gen)
    k, v = cache[0, :, :, :s], cache[1, :, :, :s]
    qp = torch.arange(s - t, s, device=device)[:, None]
    kp = torch.arange(s, device=device)[None]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    return q, k, v, mask


@pytest.mark.parametrize(
    "t,s,heads,kv", [(6, 6, 4, 2), (3, 13, 6, 2), (1, 9, 4, 4), (5, 12, 8, 1), (1, 1, 2, 1)]
)
def test_prefill_attention_against_float64(t, s, heads, kv):
    from engine.model import attention

    q, k, v, mask = _attention_case(t, s, heads, kv, torch.float32, "cpu")
    want = _attention_oracle(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, None).double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention(q, k, v, mask).double(), want, atol=1e-6, rtol=0)
    q, k, v, win = _attention_case(t, s, heads, kv, torch.float32, "cpu", window=3)
    want = _attention_oracle(q, k, v, win)
    torch.testing.assert_close(attention(q, k, v, win).double(), want, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [36, 20])
def test_prefill_attention_of_head_dimensions_flash_takes_only_padded(d):
    """Flash attention takes head dimensions of a multiple of 8 only (SDPA pads the others):
    called directly with 36 it raised "head_size must be a multiple of 8"."""
    from engine.model import attention

    g = torch.Generator(device="cuda").manual_seed(d)
    q = torch.randn(1, 4, 5, d, device="cuda", generator=g).half()
    k, v = (torch.randn(1, 2, 9, d, device="cuda", generator=g).half() for _ in range(2))
    mask = torch.arange(9, device="cuda")[None] <= torch.arange(4, 9, device="cuda")[:, None]
    want = _attention_oracle(q, k, v, mask)
    torch.testing.assert_close(attention(q, k, v, None).double(), want, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("t,s", [(512, 512), (37, 37), (20, 65), (512, 4096), (1, 300)])
def test_prefill_attention_on_the_gpu_copies_no_key_heads(t, s):
    """fp16 within fp16's error of float64; causal, no memory taken beyond the output and 1 MiB:
    K and V are read in place by every query head of their group, not repeated (at 512 x 4096
    those copies would take 16 MiB)."""
    from engine.model import attention

    q, k, v, mask = _attention_case(t, s, 32, 8, torch.float16, "cuda")
    want = _attention_oracle(q, k, v, mask)
    for given in (None, mask):  # None: causal, the mask left to attention()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        got = attention(q, k, v, given)
        torch.cuda.synchronize()
        taken = torch.cuda.max_memory_allocated() - before  # before the check's temporaries
        torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=0)
        if given is None:
            assert taken <= got.numel() * got.element_size() + (1 << 20)
            causal = got
    # causal: flash attention called directly (engine/model.py flash_takes), as SDPA's
    # dispatch would have called it, bit for bit
    from engine import model

    key = (q.device, q.dtype, 32)
    assert model._FLASH[key] is True
    model._FLASH[key] = False  # what SDPA picks itself
    try:
        assert torch.equal(attention(q, k, v, None), causal)
    finally:
        model._FLASH.pop(key)


@pytest.mark.parametrize("kind", ["vptq", "gptq", "qwen2"])
def test_cpu_layers_reading_one_input_are_one_product_holding_nothing_twice(
    tmp_path, kind, monkeypatch
):
    """On the CPU q, k, v and gate, up are one product each (engine/model.py CpuGroup; float16
    weights): the same logits as the layers one by one, which a forward hook on a layer asks
    for (quantize's calibration sees every call), each layer's weight (expanded where it is
    quantized) a view of its group's one tensor, which in-place changes reach. Qwen2's q, k, v
    have biases, o none."""
    from collections import Counter

    monkeypatch.setenv("VPTQ_CPU_WEIGHTS", "float16")
    if kind == "vptq":
        from .test_loader import build_vptq_model

        build_vptq_model(tmp_path)
    elif kind == "gptq":
        from .test_gptq import gptq_model

        tmp_path, _ = gptq_model(tmp_path, bits=4, group=32, desc_act=True, sym=True, fmt="gptq")
    else:
        make_hf_model("qwen2", tmp_path)
    m = load_model(tmp_path, "cpu", torch.float32, max_seq_len=64).model
    tokens = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        grouped = [m(tokens[:, :12]), m(tokens[:, 12:], start=12)]  # a prompt, then a step
    blocks = [(b, b.shared_input()) for layer in m.model.layers
              for b in (layer.self_attn, layer.mlp)]  # fmt: skip
    for block, linears in blocks:
        group = block.cpu_group.weight
        assert group is not None and group.dtype == torch.float16
        views = [lin.cpu_weight(torch.float32) for lin in linears]
        storage = group.untyped_storage()
        assert all(v.untyped_storage().data_ptr() == storage.data_ptr() for v in views)
        assert storage.nbytes() == sum(v.numel() * 2 for v in views)  # nothing more
    calls = Counter()
    hooks = [lin.register_forward_pre_hook(lambda mod, args: calls.update([mod]))
             for _, linears in blocks for lin in linears]  # fmt: skip
    with torch.no_grad():
        one_by_one = [m(tokens[:, :12]), m(tokens[:, 12:], start=12)]
    assert len(calls) == 5 * len(m.model.layers) and set(calls.values()) == {2}
    for want, got in zip(one_by_one, grouped, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for h in hooks:
        h.remove()
    attn = m.model.layers[0].self_attn
    attn.q_proj.cpu_weight(torch.float32).zero_()  # in place: the group's rows
    x = torch.randn(1, 1, m.args.hidden_size)
    q = attn.cpu_group(x, attn.shared_input())[0]
    bias = getattr(attn.q_proj, "bias", None)
    assert (bias is not None) == (kind == "qwen2")
    torch.testing.assert_close(
        q, torch.zeros_like(q) if bias is None else bias.float().expand_as(q)
    )


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},  # Llama-3.1's: all three bands of 64
        {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
         "original_max_position_embeddings": 4096},  # factors other than 1 in every formula
        {"rope_type": "linear", "factor": 4.0},
    ],
)  # fmt: skip
def test_rope_frequencies_match_transformers(scaling):
    """RoPE's inverse frequencies for Llama-3.1-8B's head (128, theta 500000) against
    transformers' own rope initialisation (float32 there, float64 here). The tiny models of
    test_logits_match_transformers are too small for their logits to tell a wrong scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.config import ModelArgs, rope_inv_freq

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072,
    )  # fmt: skip
    want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
    got = rope_inv_freq(
        ModelArgs.from_hf_config({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    )
    assert got.dtype == torch.float64 and got.shape == (64,)
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=0)
