"""The GPU runtime (marker gpu): CUDA-graph decode against eager decode, chunked prefill
dequant, a 2-bit checkpoint of Llama-3.1-8B's layer shapes loading within the host-RAM bound,
and out-of-memory answers (weights, context) after which the engine still serves."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.bench_e2e import build
from engine.decode import MAX_GRAPHS, GraphDecoder
from engine.sampling import SamplingParams, sample

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cuda_kernels")]
GiB = 1 << 30


@pytest.fixture(scope="module")
def small_model():
    from engine import bench_e2e

    bench_e2e.ARCHS["tiny"] = dict(
        hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=4,
        num_key_value_heads=2, vocab_size=4096,
    )  # fmt: skip
    model = build("tiny", "v8-k65536-256", context=256)
    # random weights give flat logits: scale the head so greedy choices are clear-cut
    model.lm_head.weight.data.mul_(40)
    return model


def eager_tokens(
    model, prompt, p: SamplingParams, seed: int, n: int, tensor_cores_from: int | None = None
) -> list[int]:
    """The decode step the graph captures, run eagerly (Transformer.decode, position on the
    device: the fused decode kernels where they apply; their attention on the tensor cores from
    position ``tensor_cores_from``)."""
    gen = p.make_generator(torch.device("cuda"))
    gen.manual_seed(seed)
    seen = torch.zeros(model.args.vocab_size, dtype=torch.bool, device="cuda")
    logits = model(prompt, 0, last_only=True)[0]
    out, pos = [], prompt.shape[1]
    for _ in range(n):
        t = sample(logits, p, gen, seen)
        out.append(int(t))
        seen[t] = True
        tc = tensor_cores_from is not None and pos >= tensor_cores_from
        logits = model.decode(t.view(1, 1), torch.tensor([pos], device="cuda"), tensor_cores=tc)
        pos += 1
    return out


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.3),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=5),
        SamplingParams(temperature=0.7, top_p=0.95, seed=5),  # the chat's: fused.sample_pick
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=5),
    ],
    ids=["greedy", "greedy-penalty", "sampled", "chat-default", "qwen2.5-recommended"],
)
@torch.no_grad()
def test_graph_decode_gives_the_eager_tokens(small_model, p):
    dec = GraphDecoder(small_model)
    if not dec.usable(p):
        pytest.skip("this torch cannot put a seeded generator into a CUDA graph")
    gen = torch.Generator(device="cuda").manual_seed(9)
    prompt = torch.randint(0, 4096, (1, 9), device="cuda", generator=gen)
    want = eager_tokens(small_model, prompt, p, seed=5, n=40)
    logits = small_model(prompt, 0, last_only=True)[0]
    seen = torch.zeros(4096, dtype=torch.bool, device="cuda")
    got = list(dec.run(logits, 9, seen, p, seed=5, limit=40))
    assert got == want
    # stopping early leaves the decoder reusable: the same again, and a shorter run
    logits = small_model(prompt, 0, last_only=True)[0]
    assert list(dec.run(logits, 9, seen, p, seed=5, limit=7)) == want[:7]


@pytest.mark.parametrize(
    "p",
    [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_p=0.95, seed=5)],
    ids=["greedy", "chat-default"],
)
@torch.no_grad()
def test_graph_decode_switches_to_tensor_core_attention_on_the_way(small_model, p, monkeypatch):
    """A run that passes the position where the heads' attention is faster on the tensor cores
    replays, from there, the graph whose attention runs there: the eager steps' tokens, with
    the eager steps switched at the same position (the two kernels round differently)."""
    from engine.ops import arch
    from engine.ops import decode as fused

    dec = GraphDecoder(small_model)
    if not dec.usable(p) or arch.capability() < (8, 0):
        pytest.skip("no seeded generator in a CUDA graph, or no tensor-core attention here")
    assert dec.tensor_cores_from is None  # the tiny model's 8 / 2 x 64 heads are not listed
    dec.tensor_cores_from = 20
    gen = torch.Generator(device="cuda").manual_seed(9)
    prompt = torch.randint(0, 4096, (1, 9), device="cuda", generator=gen)
    want = eager_tokens(small_model, prompt, p, seed=5, n=40, tensor_cores_from=20)
    seen = torch.zeros(4096, dtype=torch.bool, device="cuda")
    logits = small_model(prompt, 0, last_only=True)[0]
    replayed, kernels = [], []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: real(replayed.append(g) or g))
    attention = fused.attention  # which kernel each layer's captured attention asked for
    monkeypatch.setattr(fused, "attention", lambda *a: kernels.append(a[-1]) or attention(*a))
    assert list(dec.run(logits, 9, seen, p, seed=5, limit=40)) == want
    keys = {id(g): key for key, g in dec.graphs.items()}
    # 39 steps at positions 9 .. 47: 11 before the switch, 28 on the tensor cores
    assert ["tensor cores" in keys[id(g)] for g in replayed] == [False] * 11 + [True] * 28
    # the plain graph captured first, every layer's attention on the CUDA cores, then the
    # switched one's on the tensor cores (what the replays run, not what Python calls)
    layers = len(small_model.model.layers)
    assert False in kernels and True in kernels and len(kernels) % layers == 0
    assert kernels == sorted(kernels)
    kernels.clear()
    # a run that ends before the switch captures nothing more
    dec.graphs.clear()
    logits = small_model(prompt, 0, last_only=True)[0]
    assert list(dec.run(logits, 9, seen, p, seed=5, limit=12)) == want[:12]
    assert not any("tensor cores" in key for key in dec.graphs)
    assert kernels and not any(kernels)


@torch.no_grad()
def test_one_graph_serves_every_sampling_setting(small_model):
    """The fused sampled pick reads its settings from the graph's tensor: new values take no
    new capture (each one did), and draw the eager tokens of those values."""
    dec = GraphDecoder(small_model)
    settings = [
        SamplingParams(temperature=0.7, top_p=0.95, seed=5),
        SamplingParams(temperature=1.2, top_p=0.6, min_p=0.05, seed=5),
        SamplingParams(temperature=0.3, seed=5),
        SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=5),
        SamplingParams(temperature=1.0, top_k=3, repetition_penalty=0.9, seed=5),
    ]
    if not dec.usable(settings[0]):
        pytest.skip("this torch cannot put a seeded generator into a CUDA graph")
    gen = torch.Generator(device="cuda").manual_seed(9)
    prompt = torch.randint(0, 4096, (1, 9), device="cuda", generator=gen)
    for p in settings:
        want = eager_tokens(small_model, prompt, p, seed=5, n=24)
        logits = small_model(prompt, 0, last_only=True)[0]
        seen = torch.zeros(4096, dtype=torch.bool, device="cuda")
        assert list(dec.run(logits, 9, seen, p, seed=5, limit=24)) == want, p
    assert dec.pick_in_place == fused_pick(small_model)
    # without the fused pick, a graph each, the oldest given back past MAX_GRAPHS
    assert len(dec.graphs) == (1 if dec.pick_in_place else min(len(settings), MAX_GRAPHS))


def fused_pick(model) -> bool:
    from engine.ops import decode as fused

    logits = model.decode(torch.zeros(1, 1, dtype=torch.long, device="cuda"),
                          torch.tensor([0], device="cuda"), cast=False)  # fmt: skip
    return fused.sample_pick_fused(logits)


@torch.no_grad()
def test_bench_e2e_times_greedy_and_the_chats_sampling(small_model, monkeypatch):
    """measure() on a clock that ticks 1 ms a reading: every rate is the tokens it decoded over
    the ticks between its readings, the sampled runs use the chat's settings and Qwen2.5's, and
    their graphs end with the fused sampled pick where that runs."""
    from types import SimpleNamespace

    from engine import bench_e2e
    from engine.ops import decode as fused

    model = build("tiny", "v8-k65536-256", context=1024)  # "tiny": small_model's shapes
    chat, qwen = (SamplingParams(**s) for s in bench_e2e.SAMPLINGS.values())
    assert (qwen.top_k, qwen.repetition_penalty) == (20, 1.05)
    if not GraphDecoder(model).usable(chat):
        pytest.skip("this torch cannot put a seeded generator into a CUDA graph")
    ticks = iter(range(10**6))
    monkeypatch.setattr(bench_e2e, "time", SimpleNamespace(perf_counter=lambda: next(ticks) / 1e3))
    runs, picks = [], []
    run = GraphDecoder.run

    def counting_run(self, logits, pos, seen, p, seed, limit):
        n = 0
        for token in run(self, logits, pos, seen, p, seed, limit):
            n += 1
            yield token
        runs.append((p.temperature, p.top_p, p.top_k, n))

    monkeypatch.setattr(GraphDecoder, "run", counting_run)
    pick = fused.sample_pick
    monkeypatch.setattr(fused, "sample_pick", lambda *a: (picks.append(1), pick(*a))[1])
    r = bench_e2e.measure(model, 16)
    assert runs == [(0, 1.0, 0, 16), (0, 1.0, 0, 1), (0.7, 0.95, 0, 16), (0.7, 0.8, 20, 16)]
    assert r["prefill_tok_s"] == pytest.approx(bench_e2e.PROMPT / 1e-3)
    assert r["ttft_ms"] == pytest.approx(2.0)  # the prefill's tick and the first token's
    assert r["turn_ttft_ms"] == pytest.approx(2.0)  # the same for the follow-up turn
    assert r["decode_tok_s"] == pytest.approx(15 / 1e-3)  # 15 tokens after the first, 1 tick
    assert r["sampled_tok_s"] == pytest.approx({k: 15 / 1e-3 for k in bench_e2e.SAMPLINGS})
    logits = torch.zeros(1, 4096, dtype=torch.float16, device="cuda")
    assert bool(picks) == fused.sample_pick_fused(logits)  # captured: called while capturing


def test_every_layout_built_takes_a_token_on_this_gpu(small_model):
    """A layout is built only where its plan leaves a block room for a token on this GPU, and
    layers share a launch only where its row blocks do (engine/ops/sliced.py layer_plan; run
    as an RTX 3090 or an A100 by test_older_gpus.py, whose 99 KiB take v8-k65536-256 in half
    slices). Layouts that could take no token were built there until session 40."""
    from engine.layers import VQLinear
    from engine.ops import sliced

    gpu = sliced.gpu_of("cuda")
    layers = [m for m in small_model.modules() if isinstance(m, VQLinear)]
    built = [m for m in layers if m.sliced is not None]
    assert built and all(m.sliced.max_tokens >= 1 for m in built)
    assert all(m.sliced.meta[4] == sliced.layer_plan(m.spec, gpu).slice_cw for m in built)
    shared = [b.fused for b in small_model.modules() if getattr(b, "fused", None) is not None]
    assert all(g.plan.max_tokens >= 1 for g in shared)


@torch.no_grad()
def test_decode_leaving_the_sums_to_the_next_kernels_matches_each_gemv_adding_its_own(
    small_model, monkeypatch
):
    """The fused decode step takes the sliced GEMVs' outputs as partial sums (rope_kv,
    silu_mul, add_rms_norm add them); with VPTQ_PARTIAL_SUMS=0 each GEMV adds its own. Both
    give the same logits (the norms' sums of squares are added in another order)."""
    from engine import model as model_mod
    from engine.ops import decode as fused

    seen = []
    for name in ("rope_kv", "silu_mul", "rms_norm"):
        orig = getattr(fused, name)
        spy = lambda *a, _f=orig, **kw: (seen.append(type(a[0]).__name__), _f(*a, **kw))[1]  # noqa: E731
        monkeypatch.setattr(fused, name, spy)
    small_model(torch.arange(20, device="cuda").view(1, 20), 0)  # the cache up to 19
    token, pos = torch.tensor([[7]], device="cuda"), torch.tensor([20], device="cuda")
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(model_mod, "PARTIAL_SUMS", on)
        seen.clear()
        runs[on] = (small_model.decode(token, pos), list(seen))
    (with_parts, kinds), (alone, kinds_alone) = runs[True], runs[False]
    want = 0  # rope_kv's q, silu_mul's gate, the norms after o and down: where sliced
    for layer in small_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        want += attn.fused is not None or attn.q_proj.sliced is not None
        want += mlp.fused is not None or mlp.gate_proj.sliced is not None
        want += (attn.o_proj.sliced is not None) + (mlp.down_proj.sliced is not None)
    assert want >= 2 * small_model.args.n_layers and kinds.count("Partial") == want
    assert "Partial" not in kinds_alone
    err = float((with_parts - alone).norm() / alone.norm())
    assert err < 2e-3 and torch.equal(with_parts.argmax(-1), alone.argmax(-1)), err


@torch.no_grad()
def test_the_kv_cache_takes_its_own_size_of_gpu_memory(small_model):
    """All layers' caches are one allocation in a segment of its own size: 4 MiB per K or V
    tensor, each allocated alone, would be rounded up into the allocator's 20 MiB segments (40
    MiB for 32). (The growth of memory_reserved() is no oracle: the RoPE tables may or may not
    find room in the segments earlier tests left.)"""
    a = small_model.args
    try:
        small_model.setup_caches(1, 16384)
        need = 2 * a.n_layers * a.n_kv_heads * 16384 * a.head_dim * 2
        assert need == 32 << 20
        caches = [
            t for layer in small_model.model.layers
            for t in (layer.self_attn.cache.k, layer.self_attn.cache.v)
        ]  # fmt: skip
        store = caches[0].untyped_storage()
        assert {t.untyped_storage().data_ptr() for t in caches} == {store.data_ptr()}
        assert store.nbytes() == need
        ptr = store.data_ptr()
        (segment,) = [
            s for s in torch.cuda.memory_snapshot()
            if s["address"] <= ptr < s["address"] + s["total_size"]
        ]  # fmt: skip
        assert segment["total_size"] <= need + (2 << 20), segment["total_size"]
    finally:
        small_model.setup_caches(1, 256)


def test_every_one_token_path_gives_the_same_logits_and_tuning_picks_one(monkeypatch):
    """The paths load-time tuning chooses between (engine/layers.py tune_decode) decode the same
    step: the sliced GEMV, the plain GEMV, dequant + GEMM; then the real timing runs."""
    from engine import bench_e2e
    from engine import layers as L

    bench_e2e.ARCHS["tiny16"] = dict(
        hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=2,
        num_key_value_heads=2, vocab_size=4096,
    )  # fmt: skip
    monkeypatch.setenv("VPTQ_TUNE_DECODE", "0")
    monkeypatch.setenv("VPTQ_SLICED_GROUPS", "0")  # every layer on its own path
    model = build("tiny16", "v16-k65536-65536", context=64)
    linears = [m for m in model.modules() if isinstance(m, L.VQLinear)]
    assert linears and all(m.sliced is not None for m in linears)
    layouts = [m.sliced for m in linears]
    token, pos = torch.tensor([[5]], device="cuda"), torch.tensor([0], device="cuda")
    with torch.no_grad():
        want = model.decode(token, pos)
        for path in ("gemv", "dequant"):
            for m in linears:
                m.sliced, m.decode_path = None, path
            got = model.decode(token, pos)
            assert float((got - want).norm() / want.norm()) < 1e-2, path
        for m, layout in zip(linears, layouts, strict=True):
            m.sliced, m.decode_path = layout, None
        chosen = L.tune_decode(model)
    assert len(chosen) == 4 and set(chosen.values()) <= {"sliced", "gemv", "dequant"}
    assert L.decode_paths(model).get("default", 0) == 0


def test_prefill_in_dequant_slices_matches_whole_layer(monkeypatch):
    from engine.ops import cuda

    from .test_kernels import gpu_args, rel_err
    from .vq_factory import make_spec, random_layer

    spec = make_spec(k_in=512, n_out=1000, v=8, k=4096, kr=16)  # 1000 is not a multiple of 8
    args = gpu_args(random_layer(spec, seed=1), torch.float16)
    x = torch.randn(37, 512, dtype=torch.float16, device="cuda")
    bias = torch.randn(1000, dtype=torch.float16, device="cuda")
    whole = cuda.linear(x, bias, args, spec)
    monkeypatch.setattr(cuda, "DEQUANT_WORKSPACE", 3 * 8 * 512 * 2)  # 3 vector-rows a slice
    sliced = cuda.linear(x, bias, args, spec)
    assert rel_err(sliced.cpu(), whole.cpu()) < 1e-3


# -- an 8B-shaped checkpoint on disk, loaded by the real engine ----------------------------------
LLAMA_8B_2BIT = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_hidden_layers=32,
    num_key_value_heads=8,
    vocab_size=49152,
    max_position_embeddings=1 << 22,
)  # fmt: skip  (the demo's vocabulary, so its tokenizer can drive it)


def random_checkpoint(folder, arch, shape, scheme, tokenizer_files):
    """A random model of ``shape`` (bench e2e's builder) written to ``folder`` as a VPTQ
    checkpoint with the demo's tokenizer, as the engine loads it from disk."""
    from engine import bench_e2e
    from engine.formats.vptq_writer import spec_to_dict, write_checkpoint

    bench_e2e.ARCHS[arch] = shape
    model = build(arch, scheme, context=16)
    tensors = {
        k: v.cpu() for k, v in model.state_dict().items() if "cache" not in k and "index" not in k
    }
    tensors = {k: (v.view(torch.int16) if k.endswith(".perm") else v) for k, v in tensors.items()}
    layers = {name: spec_to_dict(m.spec) for name, m in model.named_modules() if hasattr(m, "spec")}
    cfg = bench_e2e.config(arch) | {
        "quantization_config": {"quant_method": "vptq", "config_for_layers": layers}
    }
    del model
    torch.cuda.empty_cache()
    write_checkpoint(folder, cfg, tensors, shard_bytes=512 << 20)
    for f in tokenizer_files.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def llama8b_folder(tmp_path_factory, demo_tokenizer_files):
    folder = tmp_path_factory.mktemp("llama8b")
    return random_checkpoint(
        folder, "llama8b-demo-vocab", LLAMA_8B_2BIT, "v8-k65536-0", demo_tokenizer_files
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, demo_tokenizer_files):
    shape = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                 num_hidden_layers=4, num_key_value_heads=2, vocab_size=49152)  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny")
    return random_checkpoint(folder, "tiny-demo-vocab", shape, "v8-k65536-0", demo_tokenizer_files)


def same_paths_in_every_load(monkeypatch) -> None:
    """For tests that compare the tokens of separate loads: each load times the one-token
    decode paths of its layer shapes and keeps the faster (engine/layers.py tune_decode); on a
    GPU busy with other tests two loads of this small model can choose differently, and the
    paths round differently, so near ties of random weights part. Every load keeps the sliced
    GEMV here (VPTQ_TUNE_DECODE=0, inherited by the processes a test starts)."""
    monkeypatch.setenv("VPTQ_TUNE_DECODE", "0")


def test_a_warmed_up_session_answers_as_a_cold_one(tiny_folder, monkeypatch, prefill_log):
    """Session.load warms up on the GPU (a prefill and a follow-up's, the greedy graph and,
    where the fused pick reads its settings from the graph, the sampled one; the samplers) and
    says so; its dummy prompts leave nothing behind: two greedy turns and a seeded sampled one
    give the tokens of a session loaded without it (VPTQ_CHAT_WARM_UP=0), the second reusing the
    first turn's KV entries."""
    from engine.generate import WARM_UP_FOLLOW_UP, WARM_UP_TOKENS, Session

    same_paths_in_every_load(monkeypatch)
    turns = [[{"role": "user", "content": "Name three colours."}]]
    turns.append(turns[0] + [{"role": "assistant", "content": "Red."}, turns[0][0]])
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=12)
    runs = {}
    for warm in ("1", "0"):
        monkeypatch.setenv("VPTQ_CHAT_WARM_UP", warm)
        stages = []
        progress = lambda f, st, to=stages: to.append(st)  # noqa: E731
        prefill_log.clear()  # the warm session's turns are not the cold one's warm-up
        s = Session.load(tiny_folder, "cuda", torch.float16, 256, progress)
        model = s.loaded.model
        model.lm_head.weight.data.mul_(40)  # random weights: clear-cut greedy choices
        graphs = len(s.decoder.graphs) if s.decoder else 0
        both = s.decoder is not None and s.decoder.pick_in_place and s.decoder.usable(sampled)
        assert ("warming up" in stages, graphs) == (
            (True, 2 if both else 1) if warm == "1" else (False, 0)
        )
        # the warm-up's prompt and a follow-up to it (the kernels of a chat's next turn)
        warm_up = [(WARM_UP_TOKENS, 0), (WARM_UP_FOLLOW_UP, WARM_UP_TOKENS)]
        assert prefill_log == (warm_up if warm == "1" else [])
        prefill_log.clear()
        out = []
        for messages, p in zip(turns + turns[:1], (greedy, greedy, sampled), strict=True):
            gen = s.generate(s.prompt_ids(messages=messages, max_new_tokens=12)[0], p)
            "".join(gen)
            out.append((gen.tokens, gen.stats.cached_tokens, gen.stats.cuda_graph))
        # the greedy and the sampled graph, captured early or on first use
        assert len(s.decoder.graphs) == (2 if s.decoder.usable(sampled) else 1)
        runs[warm] = out
        del s, model
        torch.cuda.empty_cache()
    assert runs["1"] == runs["0"]
    assert runs["1"][1][1] > 0 and runs["1"][0][2]  # the second turn reused the first's KV


def test_warm_up_captures_the_tensor_core_graph_where_the_context_reaches_its_switch(
    tiny_folder, monkeypatch
):
    """Where the heads' attention moves to the tensor cores inside the context (70B's from
    8192), the warm-up captures that graph for the chats' setting too, so the turn that gets
    there replays it at once; a context that ends before the switch captures none. The tokens
    are a cold session's, whose runs capture the same graphs as they get there."""
    from engine.generate import Session
    from engine.ops import arch
    from engine.ops import decode as fused

    if arch.capability() < (8, 0):
        pytest.skip("no tensor-core attention on this GPU")
    same_paths_in_every_load(monkeypatch)
    switch = 48
    monkeypatch.setattr(fused, "TENSOR_CORE_FROM", {(8, 2, 64): switch})  # the tiny model's
    messages = [{"role": "user", "content": "Name three colours."}]
    greedy = SamplingParams(temperature=0, max_new_tokens=40)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=40)
    # the chats' setting where the graphs take noise (engine/decode.py usable); chosen once: a
    # cold session has no decoder to ask before its first turn
    noisy = hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    chat = sampled if noisy else greedy
    runs = {}
    for warm, context in (("1", 256), ("0", 256), ("1", switch)):
        monkeypatch.setenv("VPTQ_CHAT_WARM_UP", warm)
        s = Session.load(tiny_folder, "cuda", torch.float16, context, lambda *_: None)
        s.loaded.model.lm_head.weight.data.mul_(40)  # random weights: clear-cut greedy choices
        if context == switch:  # no position reaches it: nothing more captured
            assert s.decoder.tensor_cores_from == switch
            assert not any("tensor cores" in key for key in s.decoder.graphs)
            break
        if warm == "1":
            setting = "sampled" if s.decoder.pick_in_place and chat is sampled else "greedy"
            key = (setting, "tensor cores")
            assert [k for k in s.decoder.graphs if "tensor cores" in k] == [key]
            captured = s.decoder.graphs[key]
        out = []
        for p in (chat, greedy):
            ids = s.prompt_ids(messages=messages, max_new_tokens=40)[0]
            assert len(ids) < switch < len(ids) + 39  # the answer passes the switch
            gen = s.generate(ids, p)
            "".join(gen)
            out.append((gen.tokens, gen.stats.cuda_graph))
            if warm == "1" and p is chat:  # the warm-up's graph replayed, no new capture
                assert s.decoder.graphs[key] is captured
        runs[warm] = out
        del s
        torch.cuda.empty_cache()
    assert runs["1"] == runs["0"] and all(graph for _, graph in runs["1"])
    if noisy:  # the sampled turn is not the greedy one (the two compared turns differ)
        assert runs["1"][0][0] != runs["1"][1][0]


def test_a_long_prompt_in_the_planned_pieces_answers_as_in_512_token_pieces(tiny_folder):
    """With room on the GPU the load plans prefill pieces of up to 4096 tokens (each piece
    expands every layer's weights once): a 1800-token prompt goes in one piece, and its last
    logits and greedy answer are those of 512-token pieces (VQ layers on dequant + cuBLAS,
    attention over the cached pieces before)."""
    from engine.generate import Session
    from engine.memory import MAX_PREFILL_CHUNK

    s = Session.load(tiny_folder, "cuda", torch.float16, 2048, lambda *_: None)
    assert s.loaded.prefill_chunk == MAX_PREFILL_CHUNK  # a small model on a large GPU
    s.loaded.model.lm_head.weight.data.mul_(40)  # random weights: clear-cut greedy choices
    ids = torch.randint(0, 49152, (1800,), generator=torch.Generator().manual_seed(2)).tolist()
    calls, forward = [], s.loaded.model.forward
    s.loaded.model.forward = lambda t, *a, **k: (calls.append(t.shape[1]), forward(t, *a, **k))[1]
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    runs = {}
    for chunk in (MAX_PREFILL_CHUNK, 512):
        s.loaded.prefill_chunk = chunk
        s.cached.clear()  # no reuse of the other run's KV entries
        calls.clear()
        last = s.logits(ids, 0, last_only=True).float()
        pieces = list(calls)
        gen = s.generate(ids, greedy)
        "".join(gen)
        runs[chunk] = last, gen.tokens, pieces
    assert runs[MAX_PREFILL_CHUNK][2] == [1800] and runs[512][2] == [512, 512, 512, 264]
    big, small = runs[MAX_PREFILL_CHUNK][0], runs[512][0]
    assert (big - small).norm() / small.norm() < 1e-2
    assert runs[MAX_PREFILL_CHUNK][1] == runs[512][1]


@pytest.fixture(scope="module")
def demo_tokenizer_files(tmp_path_factory):
    """The demo's tokenizer files: $VPTQ_TEST_TOKENIZER on a machine without the demo."""
    src = os.environ.get("VPTQ_TEST_TOKENIZER")
    if src:
        return Path(src)
    from engine.models import build_dense_demo

    out = tmp_path_factory.mktemp("tok")
    for f in build_dense_demo().iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def python_out(code: str, *args: str) -> str:
    """What a fresh Python running code prints; its stderr in the failure where it fails."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


LOAD_AND_REPORT = """
import json, resource, sys, torch
from engine import ops
from engine.loader import load_model
ops.prepare("cuda")  # as a Session does: the kernels, and with them the sliced layouts
lm = load_model(sys.argv[1], "cuda", torch.float16, max_seq_len=1024)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "weights": lm.weight_bytes, "kv": lm.kv_bytes,
                  "largest": lm.max_context, "vram": torch.cuda.max_memory_allocated(),
                  "layouts": lm.layout_bytes, "sliced": lm.sliced_layers}))
"""


ANSWER_ON = """
import json, sys, torch
from engine.generate import Session
from engine.sampling import SamplingParams
s = Session.load(sys.argv[1], sys.argv[2], torch.float16, 256, lambda *_: None)
s.loaded.model.lm_head.weight.data.mul_(40)  # random weights: clear-cut greedy choices
out = []
for p in (SamplingParams(temperature=0, max_new_tokens=24),
          SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=24)):
    messages = [{"role": "user", "content": "Name three colours."}]
    g = s.generate(s.prompt_ids(messages=messages, max_new_tokens=24)[0], p)
    "".join(g)
    out.append([g.tokens, g.stats.cuda_graph])
devices = {str(t.device) for t in s.loaded.model.state_dict().values()}
first = torch.cuda.memory_allocated(0) if sys.argv[2] == "cuda:1" else None
print(json.dumps({"out": out, "devices": sorted(devices), "on_first": first}))
"""


def test_a_model_on_another_gpu_answers_as_on_the_first(tiny_folder, monkeypatch):
    """The app loads on the GPU its fit was checked on (`cuda:N`): there the graph decode (its
    capture, the events that hand tokens to the host) must run on that GPU, not the first.
    Greedy and seeded sampled turns give the same tokens on `cuda`, `cuda:0` and, where there
    is one, `cuda:1`, from weights all on the GPU named, with nothing of the model on the first
    GPU; the engine reports the model's GPU memory in `loaded` and in `stats`."""
    same_paths_in_every_load(monkeypatch)
    two = torch.cuda.device_count() >= 2
    names = ["cuda", "cuda:0"] + ["cuda:1"] * two
    runs = {d: json.loads(python_out(ANSWER_ON, str(tiny_folder), d)) for d in names}
    for d in names:
        assert runs[d]["devices"] == [d if ":" in d else "cuda:0"]
        assert runs[d]["out"] == runs["cuda"]["out"]
        assert all(graph for _, graph in runs[d]["out"])
    if two:
        assert runs["cuda:1"]["on_first"] == 0
    # the engine process: its reader thread answers `stats` (its own current device)
    from .engine_proc import EngineProcess

    device = names[-1]
    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        e.send("hello", version=1)
        loaded = answer(e, "load", "a", path=str(tiny_folder), device=device)[-1]
        assert loaded.type == "loaded" and loaded.get("device") == device, loaded
        held = loaded.get("weight_bytes") + loaded.get("kv_cache_bytes")
        assert loaded.get("vram_bytes") >= held
        e.send("stats", "s")
        stats = e.next(timeout=60)
        while stats.type != "stats":
            stats = e.next(timeout=60)
        assert stats.get("vram_bytes") >= held, stats
        # a load without a device after it goes to the first GPU again, as auto says (the
        # app reloads the model before after a failed load that way)
        loaded = answer(e, "load", "b", path=str(tiny_folder))[-1]
        assert loaded.type == "loaded" and loaded.get("device") == "cuda:0", loaded
    finally:
        e.close()


def test_after_a_stopped_answer_the_next_turn_answers_as_after_a_finished_one(
    tiny_folder, monkeypatch
):
    """Stop (the app's button, Ctrl-C in `engine chat`) ends a graph decode with steps still
    in flight, which wrote KV entries past the kept tokens. The next turn, reusing the first
    turn's KV entries, gives the tokens of a session whose first turn ended by itself at the
    same token (the same computation: a fresh prefill of the whole history rounds differently,
    and random weights have near ties)."""
    from engine.generate import Session

    same_paths_in_every_load(monkeypatch)
    sessions = []
    for _ in range(2):
        s = Session.load(tiny_folder, "cuda", torch.float16, 256, lambda *_: None)
        s.loaded.model.lm_head.weight.data.mul_(40)  # random weights: clear-cut greedy choices
        sessions.append(s)
    stopped, finished = sessions
    first = [{"role": "user", "content": "Write a long story."}]
    greedy = SamplingParams(temperature=0, max_new_tokens=60)
    gen = stopped.generate(stopped.prompt_ids(messages=first, max_new_tokens=60)[0], greedy)
    for i, _ in enumerate(gen):
        if i == 6:
            gen.cancel()
    assert gen.reason == "cancelled" and 6 < len(gen.tokens) < 60 and gen.stats.cuda_graph
    n = len(gen.tokens)
    ended = finished.generate(
        finished.prompt_ids(messages=first, max_new_tokens=n)[0],
        SamplingParams(temperature=0, max_new_tokens=n),
    )
    "".join(ended)
    assert (ended.tokens, ended.reason) == (gen.tokens, "length")
    second = [
        *first,
        {"role": "assistant", "content": gen.text},
        {"role": "user", "content": "Shorter, please."},
    ]
    out = []
    for s in sessions:
        g = s.generate(s.prompt_ids(messages=second, max_new_tokens=16)[0], greedy)
        "".join(g)
        out.append((g.tokens, g.stats.cached_tokens))
    assert out[0] == out[1] and out[0][1] > 0  # the first turn's KV was reused


def test_8b_two_bit_checkpoint_loads_within_the_host_ram_bound(llama8b_folder):
    shards = sorted(llama8b_folder.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    base = python_out(
        "import resource, torch; torch.zeros(1, device='cuda');"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    r = json.loads(python_out(LOAD_AND_REPORT, str(llama8b_folder)))
    total = sum(f.stat().st_size for f in shards)
    assert len(shards) >= 5 and total > 2 * GiB
    # host RAM: the process itself plus about one shard, never the whole checkpoint
    assert r["peak_rss"] - int(base) < largest + 512 * (1 << 20), (r, largest)
    # VRAM: final (weights, fast decode layouts, KV cache) + about one layer of scratch
    assert r["sliced"][0] == r["sliced"][1] > 0 and r["layouts"] > 0
    assert r["vram"] < r["weights"] + r["layouts"] + r["kv"] + 400 * (1 << 20)
    assert r["kv"] == 2 * 32 * 8 * 128 * 2 * 1024


def answer(e, type_, id_, **payload):
    """Send one request; its events up to the first ``type_`` or ``error`` of that id."""
    e.send(type_, id_, **payload)
    events = []
    while True:
        m = e.next(timeout=300)
        events.append(m)
        if m.id == id_ and m.type in ("loaded", "finished", "error"):
            return events


def test_unload_gives_the_gpu_memory_back(tiny_folder):
    """What Model > Unload model sends: after `unload` the engine process holds no GPU memory
    of its own (the model, its KV cache and layouts, the graphs, and the cuBLAS workspaces
    PyTorch keeps per stream: 192 MiB for this small model before session 35), and a load
    works again."""
    from .engine_proc import EngineProcess

    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        loaded = answer(e, "load", "l1", path=str(tiny_folder), max_seq_len=2048)[-1]
        assert loaded.type == "loaded", loaded
        held = loaded.get("weight_bytes") + loaded.get("kv_cache_bytes")
        assert loaded.get("vram_bytes") >= held > 0
        e.send("unload", "u")
        stats = e.until("stats", "u")[-1]
        assert stats.get("model") is None
        assert stats.get("vram_bytes") == 0, (loaded, stats)
        assert answer(e, "load", "l2", path=str(tiny_folder))[-1].type == "loaded"
    finally:
        e.close()


@pytest.mark.gpu_alone  # it leaves 2 GiB of the GPU free
def test_out_of_memory_is_an_error_with_numbers_and_the_engine_still_serves(llama8b_folder):
    from .engine_proc import EngineProcess

    e = EngineProcess()
    try:
        assert e.next().type == "hello"
        e.send("hello", version=1)
        path = str(llama8b_folder)
        free, _ = torch.cuda.mem_get_info()
        hog = torch.empty(free - 2 * GiB, dtype=torch.uint8, device="cuda")  # leave 2 GiB
        err = answer(e, "load", "a", path=path, device="cuda")[-1]
        assert err.type == "error" and err.get("kind") == "oom", err
        assert "the weights need" in err.get("message") and "is free" in err.get("message")
        del hog
        torch.cuda.empty_cache()
        # 4M tokens: 512 GiB of KV cache, more than any one GPU holds
        err = answer(e, "load", "b", path=path, device="cuda", max_seq_len=1 << 22)[-1]
        assert err.get("kind") == "oom", err
        assert "a context of 4194304 tokens needs" in err.get("message")
        assert "The largest context that fits is" in err.get("message")
        loaded = answer(e, "load", "c", path=path, device="cuda", max_seq_len=2048)[-1]
        assert loaded.type == "loaded", loaded
        assert loaded.get("kv_cache_bytes") == 2 * 32 * 8 * 128 * 2 * 2048
        assert loaded.get("max_context") >= 2048 and loaded.get("workspace_bytes") > 0
        done = answer(
            e, "generate", "g", messages=[{"role": "user", "content": "Hi"}],
            sampling={"temperature": 0, "max_new_tokens": 8},
        )[-1]  # fmt: skip
        assert done.type == "finished" and done.get("reason") in ("length", "stop"), done
        assert done.get("stats")["cuda_graph"] is True
    finally:
        e.close()
