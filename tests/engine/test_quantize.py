"""The VPTQ quantizer: the second-order method against its baselines, the written checkpoint,
resuming, and the demo model's quality."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.formats.vptq import FormatError
from engine.layers import VQLinear
from engine.loader import load_model
from engine.ops import reference
from engine.quantize import TOPICS, Recipe, calibration, quantize, sample_sequences, tensors_of
from engine.tokenizer import Tokenizer
from engine.vq import (
    FIT_POINTS,
    fit_sample,
    grid_codebook,
    grid_nearest,
    kmeans,
    nearest,
    proxy_error,
    quantize_weight,
)

from .test_cli import run

DATA = Path(__file__).parent.parent / "data"


def correlated_layer(n=256, k=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    x = torch.randn(4096, k, generator=g) @ mix * torch.linspace(0.2, 3, k)
    return torch.randn(n, k, generator=g) * 0.05, x.T @ x / x.shape[0]


@pytest.mark.parametrize(("v", "k", "kr"), [(2, 256, 0), (4, 256, 16), (4, 4096, 0)])
def test_second_order_beats_kmeans_at_the_same_bits(v, k, kr):
    w, h = correlated_layer()
    errors = {
        m: proxy_error(w, quantize_weight(w, h, v, k, kr, method=m).dense, h)
        for m in ("kmeans", "vptq")
    }
    assert errors["vptq"] < 0.7 * errors["kmeans"], errors


def test_kmeans_ends_on_each_clusters_weighted_mean():
    """Four clusters far apart, uneven weights: the fit's centroids are the clusters' weighted
    means (float64 oracle), whichever points seeded them; fewer points than centroids are the
    codebook themselves, zeros after them."""
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-10.0, -10.0], [-10.0, 10.0], [10.0, -10.0], [10.0, 10.0]])
    points = centers.repeat_interleave(300, 0) + 0.5 * torch.randn(1200, 2, generator=g)
    weights = torch.rand(1200, generator=g) * 3 + 0.1
    for w in (weights, None):
        book = kmeans(points, w, 4, gen=torch.Generator().manual_seed(2)).double()
        ww = torch.ones(1200, dtype=torch.float64) if w is None else w.double()
        for c in range(4):
            member = slice(300 * c, 300 * (c + 1))
            mean = (points[member].double() * ww[member, None]).sum(0) / ww[member].sum()
            got = book[nearest(mean[None].float(), book.float())[0]]
            assert torch.allclose(got, mean, atol=1e-4), (c, got, mean)
    few = kmeans(points[:3], None, 4)
    assert torch.equal(few, torch.cat([points[:3], torch.zeros(1, 2)]))
    spread = points[::300]  # one point of each cluster, as many as centroids: in their order
    assert torch.equal(kmeans(spread, None, 4, gen=torch.Generator().manual_seed(2)), spread)


def test_a_few_heavy_points_do_not_take_the_codebook():
    """20 points hold 99.96% of the weight (a massive-activation channel, as in SmolLM2's layer-11
    down_proj). The fit sample must still see the other 40000: they get about as good a codebook
    as plain k-means gives them with the 236 centroids the heavy points leave over."""
    g = torch.Generator().manual_seed(0)
    heavy, light = torch.rand(20, 2, generator=g), torch.rand(40000, 2, generator=g)
    points = torch.cat([heavy, light])
    weights = torch.cat([torch.full((20,), 1e6), torch.ones(40000)])
    assert points.shape[0] > FIT_POINTS  # the sampled branch

    def light_error(book):
        return float(((light - book[nearest(light, book)]) ** 2).sum())

    book = kmeans(points, weights, 256, gen=torch.Generator().manual_seed(1))
    assert float(((heavy - book[nearest(heavy, book)]) ** 2).sum()) < 1e-8  # each has its own
    best = light_error(kmeans(light, None, 236, gen=torch.Generator().manual_seed(1)))
    # without weights the sample is drawn from every point: 32768 draws of 40000 hit ~22000
    drawn, none = fit_sample(light, None, FIT_POINTS, torch.Generator().manual_seed(3))
    assert none is None and drawn.shape == (FIT_POINTS, 2)
    assert 20000 < torch.unique(drawn, dim=0).shape[0] < 24000
    assert light_error(book) < 1.5 * best, (light_error(book), best)


def test_rtn_uses_the_uniform_grid():
    w, h = correlated_layer(64, 32)
    q = quantize_weight(w, h, v=2, k=16, method="rtn")
    assert torch.equal(q.centroids.reshape(16, 2), grid_codebook(16, 2))
    with pytest.raises(ValueError, match=r"is not a 2-th power"):
        quantize_weight(w, h, v=2, k=32, method="rtn")


@pytest.mark.parametrize(("v", "k"), [(1, 256), (2, 16), (3, 64), (2, 65536)])
def test_grid_nearest_is_the_brute_force_nearest(v, k):
    pts = torch.rand(3000, v, generator=torch.Generator().manual_seed(v))
    pts[:5] = torch.tensor([0.0, 1.0, -0.5, 1.5, 0.999999])[:, None]  # edges and outside the box
    book = grid_codebook(k, v).double()
    fast, brute = grid_nearest(pts, k), nearest(pts, grid_codebook(k, v))
    dist = lambda idx: ((pts.double() - book[idx]) ** 2).sum(1)  # noqa: E731
    assert (dist(fast) <= dist(brute) + 1e-12).all()  # never farther; ties may pick either
    assert (fast == brute).float().mean() > 0.99


@pytest.mark.parametrize("kr", [0, 16])
def test_layer_round_trips_through_the_loaders_module(kr):
    w, h = correlated_layer(96, 48)
    q = quantize_weight(w, h, v=2, k=64, kr=kr, method="vptq")
    lin = VQLinear(q.spec, torch.float32)
    lin.load_state_dict(
        {n.removeprefix("L."): t for n, t in tensors_of("L", q, None, torch.float32).items()}
    )
    lin.post_load()
    dense = reference.vptq_dequant(*lin.tensors(), spec=q.spec, dtype=torch.float32)
    assert torch.equal(dense, q.dense)  # what the quantizer propagated is what loads


def tiny_model(folder: Path, demo_path: Path, init_std: float = 0.02, layers: int = 2) -> Path:
    """A 2-layer Llama with the demo's tokenizer; ``init_std`` large makes its next-token
    probabilities depend on the context (at transformers' 0.02 they are near uniform)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=init_std,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path / name, folder / name)
    return folder


TINY = Recipe(vector_len=2, centroids=16, res_centroids=4, calib_sequences=8, calib_len=32)


def test_quantized_checkpoint_loads_and_chats(tmp_path, demo_path):
    src = tiny_model(tmp_path / "dense", demo_path)
    out = quantize(src, tmp_path / "q", TINY, log=lambda m: None)
    lm = load_model(out, "cpu", torch.float32, max_seq_len=64)
    assert lm.quant == "vptq" and len(lm.specs) == 14
    spec = lm.specs["model.layers.1.mlp.down_proj"]
    assert (spec.vector_len, spec.num_centroids, spec.num_res_centroids) == (2, 16, 4)
    assert (out / "tokenizer.json").exists() and not (tmp_path / "q.partial").exists()
    # the checkpoint holds what the quantized model reads, no dense weight of a quantized layer
    written = load_file(str(next(out.glob("*.safetensors"))))
    assert written.keys() == lm.model.state_dict().keys()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "generate",
            "--model",
            str(out),
            "--prompt",
            "Hi",
            "--chat",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "[cut at the token limit] 4 tokens" in r.stderr or "[done]" in r.stderr, r.stderr


def test_calibration_is_the_texts_windows_then_the_models_own_answers(tmp_path, demo_path):
    """Half the sequences (at most) are whole windows of the text in order, the rest answers
    the model samples itself; a text shorter than a window gives only sampled ones."""
    src = tiny_model(tmp_path / "dense", demo_path)
    model = load_model(src, "cpu", torch.float32, max_seq_len=16, half_weights=False).model
    tok, text = Tokenizer(src), tmp_path / "text.txt"
    recipe = replace(TINY, calib_sequences=8, calib_len=16)
    for words, windows in ((200, 4), (14, 2), (5, 0)):
        text.write_text(" ".join(f"word{i}" for i in range(words)))
        ids = tok.encode(text.read_text())
        assert len(ids) // 16 >= windows and (windows == 4 or len(ids) // 16 == windows)
        got = calibration(model, tok, recipe, text)
        assert got.shape == (8, 16) and got.dtype == torch.long
        assert got[:windows].tolist() == [ids[i * 16 : (i + 1) * 16] for i in range(windows)]
        sampled = sample_sequences(model, tok, 8 - windows, 16, recipe.seed)
        assert torch.equal(got[windows:], sampled)


def test_self_sampled_answers_are_drawn_from_the_models_own_next_token_probabilities(
    tmp_path, demo_path
):
    """Against transformers' own model of the same checkpoint, run over the whole sequence each
    step: the prompts are the topics' chat prompts cut to the shortest one's length from the
    left, and each token is drawn at temperature 1 with the seeded generator."""
    import transformers as tf

    src = tiny_model(tmp_path / "dense", demo_path, init_std=0.3)
    model = load_model(src, "cpu", torch.float32, max_seq_len=16, half_weights=False).model
    tok = Tokenizer(src)
    got = sample_sequences(model, tok, 3, 6, seed=5)
    hf = tf.LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    prompts = [
        tok.chat_ids([{"role": "user", "content": f"Tell me about {topic}."}])
        for topic in TOPICS[:3]
    ]
    width = min(map(len, prompts))
    seqs, gen = torch.tensor([p[-width:] for p in prompts]), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(hf(seqs).logits[:, -1].double(), -1).float()
            seqs = torch.cat([seqs, torch.multinomial(probs, 1, generator=gen)], 1)
    assert got.shape == (3, 6) and torch.equal(got, seqs[:, width:])


def test_each_stage_is_calibrated_on_the_quantized_layers_before_it(
    tmp_path, demo_path, monkeypatch
):
    """What each Hessian accumulates (the inputs of q, o, gate and down in every layer) is what
    transformers' model of the same checkpoint with the quantized weights put in feeds those
    projections on the calibration tokens: each stage sees the layers and the stages before it
    quantized, never their dense weights."""
    import transformers as tf

    import engine.quantize as qz

    src = tiny_model(tmp_path / "dense", demo_path, init_std=0.3)
    seen, tokens, real_calibration = [], [], qz.calibration

    class Recording(qz.HessianHook):
        def __call__(self, module, inputs) -> None:
            seen.append(inputs[0].reshape(-1, module.in_features).clone())
            super().__call__(module, inputs)

    monkeypatch.setattr(qz, "HessianHook", Recording)
    monkeypatch.setattr(
        qz, "calibration", lambda *a: tokens.append(real_calibration(*a)) or tokens[0]
    )
    lm = load_model(quantize(src, tmp_path / "q", TINY, log=lambda m: None), "cpu", torch.float32)
    hf = tf.LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    for name, spec in lm.specs.items():
        dense = reference.vptq_dequant(
            *lm.model.get_submodule(name).tensors(), spec=spec, dtype=torch.float32
        )
        assert not torch.equal(dense, hf.get_submodule(name).weight)  # quantized, not dense
        hf.get_submodule(name).weight.data = dense
    want = []
    for i in range(2):
        for probe, _ in qz.STAGES:
            hf.get_submodule(f"model.layers.{i}.{probe}").register_forward_pre_hook(
                lambda m, inputs: want.append(inputs[0].reshape(-1, m.in_features))
            )
    with torch.no_grad():
        hf(tokens[0])
    assert len(seen) == len(want) == 8
    for got, expected in zip(seen, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("vector_len", 0, "--vector-len 0"),  # was a ZeroDivisionError
        ("vector_len", -2, "--vector-len -2"),  # was "invalid shape dimension"
        ("vector_len", 65, "--vector-len 65"),  # the loader reads 1..64
        ("calib_len", 0, "--calib-len 0"),
        ("calib_sequences", 0, "--calib-sequences 0"),
        ("centroids", 100, "--centroids 100"),
    ],
)
def test_bad_settings_are_named(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        replace(TINY, **{field: value}).check()


def test_a_vector_length_that_does_not_fit_a_layer_is_refused_before_any_work(tmp_path, demo_path):
    src = tiny_model(tmp_path / "dense", demo_path)  # q 64 rows, k and v 32, gate 128
    with pytest.raises(ValueError) as e:
        quantize(src, tmp_path / "q", replace(TINY, vector_len=3), log=lambda m: None)
    assert str(e.value) == (
        "--vector-len 3: model.layers.0.self_attn.q_proj has 64 output rows, not a multiple of"
        " 3; vector lengths that fit every layer of dense: 1, 2, 4, 8, 16, 32"
    )
    assert not (tmp_path / "q.partial").exists()  # nothing left behind
    r = run("quantize", "--model", "demo", "--out", tmp_path / "d", "--vector-len", 0)
    assert r.returncode != 0 and r.stderr.strip() == "error: --vector-len 0 is outside 1..64"


def test_a_quantized_model_is_refused_as_the_source(tmp_path, demo_path):
    """(The first run writes into folders it makes.)"""
    src = tiny_model(tmp_path / "dense", demo_path)
    once = tmp_path / "folders" / "not made yet" / "once"
    assert quantize(src, once, replace(TINY, method="rtn"), log=lambda m: None) == once
    assert not once.with_name("once.partial").exists()
    with pytest.raises(FormatError) as e:
        quantize(once, tmp_path / "twice", TINY, log=lambda m: None)
    assert str(e.value) == f"{once}: already quantized; give a dense (fp16/bf16) model"
    assert not (tmp_path / "twice").exists() and not (tmp_path / "twice.partial").exists()


def test_progress_estimates_the_time_left_from_the_layers_done(tmp_path, demo_path, monkeypatch):
    """On a clock that moves a minute a reading: each layer took a minute, so the estimate is
    a minute a layer left."""
    import itertools
    import types

    import engine.quantize as qz

    src = tiny_model(tmp_path / "dense", demo_path, layers=3)
    clock = itertools.count(600, 60)
    monkeypatch.setattr(qz, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    seen = []
    quantize(src, tmp_path / "q", replace(TINY, method="rtn"), log=seen.append)
    assert seen == [
        "layer 1/3 quantized; about 2.0 min left",
        "layer 2/3 quantized; about 1.0 min left",
        "layer 3/3 quantized; about 0.0 min left",
    ]


def stop_after_first_layer(message: str) -> None:
    """A quantize log that interrupts the run once its first layer is saved."""
    if message.startswith("layer 1/"):
        raise KeyboardInterrupt


def same_tensors(a: Path, b: Path) -> bool:
    """Two single-file checkpoints hold the same tensors, bit for bit."""
    x, y = (load_file(str(next(f.glob("*.safetensors")))) for f in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_interrupted_run_resumes_to_the_same_checkpoint(tmp_path, demo_path):
    src = tiny_model(tmp_path / "dense", demo_path)
    whole = quantize(src, tmp_path / "whole", TINY, log=lambda m: None)

    with pytest.raises(KeyboardInterrupt):
        quantize(src, tmp_path / "again", TINY, log=stop_after_first_layer)
    assert (tmp_path / "again.partial" / "layer_0.safetensors").exists()
    seen = []
    resumed = quantize(src, tmp_path / "again", TINY, log=seen.append)
    assert not any(m.startswith("layer 1/") for m in seen)  # layer 0 was not redone
    assert same_tensors(whole, resumed)


def test_a_run_left_with_other_settings_is_started_over(tmp_path, demo_path):
    src = tiny_model(tmp_path / "dense", demo_path)
    other = replace(TINY, centroids=8, seed=1)  # other calibration answers too
    fresh = quantize(src, tmp_path / "fresh", other, log=lambda m: None)

    with pytest.raises(KeyboardInterrupt):
        quantize(src, tmp_path / "again", TINY, log=stop_after_first_layer)
    seen = []
    again = quantize(src, tmp_path / "again", other, log=seen.append)
    assert (
        seen[0] == f"{tmp_path / 'again.partial'}: left by a run with other settings; starting over"
    )
    assert sum(m.startswith("layer ") for m in seen) == 2  # both layers quantized anew
    assert same_tensors(fresh, again)


def test_a_models_projection_biases_are_kept(tmp_path, demo_path):
    """Qwen2's q, k and v have biases: the checkpoint keeps them (in its float16) with "bias"
    true in their layers' settings, and the loaded model adds them; also where those settings
    say false (the architecture decides, as in transformers), with the same logits."""
    from .hf_models import make_hf_model

    hf = make_hf_model("qwen2", tmp_path / "dense", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path / name, tmp_path / "dense" / name)
    out = quantize(tmp_path / "dense", tmp_path / "q", TINY, log=lambda m: None)
    written = load_file(str(next(out.glob("*.safetensors"))))
    cfg = json.loads((out / "config.json").read_text())
    layers = cfg["quantization_config"]["config_for_layers"]
    qkv = [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
    ]
    assert sorted(n for n, d in layers.items() if d["bias"]) == sorted(qkv)
    lm = load_model(out, "cpu", torch.float32, max_seq_len=16)
    for name in qkv:
        want = hf.get_submodule(name).bias.detach().half()
        assert torch.equal(written[f"{name}.bias"], want)
        assert torch.equal(lm.model.get_submodule(name).bias, want.float())
    for d in layers.values():
        d["bias"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    again = load_model(out, "cpu", torch.float32, max_seq_len=16)
    ids = torch.tensor([[5, 900, 31, 4000]])
    assert torch.equal(again.model(ids, 0), lm.model(ids, 0))
    assert all(
        torch.equal(again.model.get_submodule(n).bias, lm.model.get_submodule(n).bias) for n in qkv
    )


def test_what_quantize_writes_does_not_depend_on_the_cpu_weights_setting(
    tmp_path, demo_path, monkeypatch
):
    """quantize reads the dense model in float32 exactly (load_model half_weights=False), also
    where the engine keeps a CPU model's layers in float16 (VPTQ_CPU_WEIGHTS=float16, the
    default outside the tests): its calibration answers and its layers come out the same."""
    src = tiny_model(tmp_path / "dense", demo_path)
    out = {}
    for weights in ("float32", "float16"):
        monkeypatch.setenv("VPTQ_CPU_WEIGHTS", weights)
        out[weights] = quantize(src, tmp_path / weights, TINY, log=lambda m: None)
    assert same_tensors(*out.values())


def perplexity(model: str) -> float:
    r = run("perplexity", "--model", model, "--file", DATA / "pride_and_prejudice_ch1.txt",
            "--context", 512, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1].split(":")[1])


@pytest.mark.slow
def test_the_demo_is_vptq_and_keeps_the_dense_models_quality(demo_path):
    """`demo` is SmolLM2 quantized here with the second-order method at DEMO_SCHEME, and its
    perplexity on a public-domain text it was not calibrated on is within 25% of the dense
    model's. (`generate --model demo --chat` answering "Paris" is test_cli's.)"""
    import json

    from engine.models import DEMO_SCHEME, resolve_model

    cfg = json.loads((resolve_model("demo") / "config.json").read_text())
    layers = cfg["quantization_config"]["config_for_layers"]
    assert cfg["quantization_config"]["quant_method"] == "vptq" and len(layers) == 30 * 7
    scheme = next(iter(layers.values()))
    assert scheme["vector_lens"][-1] == DEMO_SCHEME["vector_len"]
    assert scheme["num_centroids"][-1] == DEMO_SCHEME["centroids"]
    dense, quantized = perplexity("demo-dense"), perplexity("demo")
    assert quantized <= 1.25 * dense, (quantized, dense)


def test_building_the_demo_reports_its_calibration_then_each_layer(tmp_path, monkeypatch):
    """The demo's build shows the calibration data (minutes on a CPU) as its own stage, then
    the layers' share done; the log's other lines are not progress. quantize itself stands in
    here, saying what it says while it runs."""
    import engine.models as models
    import engine.quantize

    monkeypatch.setenv("VPTQ_CHAT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "build_dense_demo", lambda progress=None: tmp_path / "dense")

    def quantize(source, out, recipe, log):
        for line in [
            f"{out}.partial: left by a run with other settings; starting over",
            "preparing calibration data (text and self-sampled answers)",
            "layer 1/4 quantized; about 3.0 min left",
            "layer 2/4 quantized; about 2.0 min left",
            "layer 4/4 quantized; about 0.0 min left",
        ]:
            log(line)
        out.mkdir(parents=True)

    monkeypatch.setattr(engine.quantize, "quantize", quantize)
    seen = []
    out = models.build_vptq_demo(lambda fraction, stage: seen.append((fraction, stage)))
    stage = "quantizing the demo model with VPTQ (one time, 3 to 8 minutes)"
    assert seen == [
        (0.0, stage), (0.0, f"{stage}: preparing calibration data"), (0.25, stage),
        (0.5, stage), (1.0, stage),
    ]  # fmt: skip
    assert out == tmp_path / "models" / models.demo_name() and (out / models.DONE).exists()
    assert models.build_vptq_demo(lambda *a: seen.append(a)) == out and len(seen) == 5  # built


def test_the_command_quantizes_the_model_it_names(tmp_path, demo_path, monkeypatch):
    """`--model demo` (the quantized demo elsewhere) is the dense demo here; any other name is
    the model it names, a folder whose name starts with "demo" too (it was taken for the
    demo); a .gguf file is converted first, next to the output, into a folder that is not one
    of the user's."""
    import engine.quantize
    from engine.__main__ import parser
    from engine.models import GGUF_NAME

    src = tiny_model(tmp_path / "demo-tiny", demo_path)
    sources = []
    monkeypatch.setattr(
        engine.quantize, "quantize", lambda source, *a, **k: sources.append(source)
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for name in ("demo-tiny", "demo", str(src), "demo-dense"):
        engine.quantize.main(parser().parse_args(["quantize", "--model", name, "--out", "q"]))
    assert sources == [Path("demo-tiny"), demo_path, src, demo_path]
    converted = []
    monkeypatch.setattr(
        "engine.models.gguf_to_safetensors", lambda g, out: converted.append((g, out)) or out
    )  # fmt: skip
    (tmp_path / GGUF_NAME).write_bytes(b"GGUF")
    engine.quantize.main(parser().parse_args(["quantize", "--model", GGUF_NAME, "--out", "q"]))
    assert converted == [(Path(GGUF_NAME), Path("q.dense"))] and sources[-1] == Path("q.dense")
    # a folder of that name that is not an earlier conversion is not replaced by one
    (tmp_path / "r.dense").mkdir()
    (tmp_path / "r.dense" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^r.dense: the .gguf file's conversion goes there"):
        engine.quantize.main(parser().parse_args(["quantize", "--model", GGUF_NAME, "--out", "r"]))
    assert len(converted) == 1 and (tmp_path / "r.dense" / "notes.txt").read_text() == "mine"


def test_an_output_folder_of_other_files_is_refused_and_kept(tmp_path, demo_path):
    """The checkpoint replaces its output folder whole: a folder of other files (the source
    model itself, a folder of models) is refused before any work and keeps every file; an
    empty folder is used, and an earlier checkpoint is replaced, left-overs of a crashed write
    beside it going too."""
    src = tiny_model(tmp_path / "dense", demo_path)
    rtn = replace(TINY, method="rtn")
    models = tmp_path / "models"
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "model.safetensors").write_bytes(b"weights")
    before = {p: p.read_bytes() for p in [*models.rglob("*"), *src.rglob("*")] if p.is_file()}
    for out, why in [(models, "holds other files"), (src, "holds other files")]:
        with pytest.raises(ValueError) as e:
            quantize(src, out, rtn, log=lambda m: None)
        assert str(e.value).startswith(f"--out {out}: {why}, which the checkpoint would replace")
        assert not out.with_name(out.name + ".partial").exists()  # no work begun
    (tmp_path / "a file").write_text("notes")
    with pytest.raises(ValueError, match="a file, not a folder"):
        quantize(src, tmp_path / "a file", rtn, log=lambda m: None)
    assert {p: p.read_bytes() for p in before} == before
    assert (tmp_path / "a file").read_text() == "notes"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert quantize(src, empty, rtn, log=lambda m: None) == empty
    first = (empty / "config.json").read_text()
    (empty / "extra.txt").write_text("from the earlier run")
    (tmp_path / "empty.writing").mkdir()  # a write that crashed
    (tmp_path / "empty.writing" / "half.safetensors").write_bytes(b"half")
    quantize(src, empty, replace(rtn, vector_len=4), log=lambda m: None)  # over the checkpoint
    assert (empty / "config.json").read_text() != first and not (empty / "extra.txt").exists()
    assert not (tmp_path / "empty.writing").exists()
    r = run("quantize", "--model", src, "--out", models, "--method", "rtn")
    assert r.returncode == 2 and r.stderr.strip().startswith(f"error: --out {models}: holds")
