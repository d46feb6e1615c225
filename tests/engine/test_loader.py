"""Reading VPTQ and dense checkpoints: round trips, config forms, and bad input."""

import json
import re

import pytest
import torch

from engine.formats.vptq import FormatError
from engine.formats.vptq_writer import spec_to_dict, write_checkpoint
from engine.layers import VQLinear
from engine.loader import load_model
from engine.model import DenseLinear

from .vq_factory import make_spec, oracle_dense, random_layer

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
LINEARS = {
    "self_attn.q_proj": (48, 48),
    "self_attn.k_proj": (48, 24),
    "self_attn.v_proj": (48, 24),
    "self_attn.o_proj": (48, 48),
    "mlp.gate_proj": (48, 80),
    "mlp.up_proj": (48, 80),
    "mlp.down_proj": (80, 48),
}
# One scheme per projection, so a single model covers residual, groups, outliers, padding,
# odd vector lengths, wide and narrow codebooks, and layers without norm or perm.
SCHEMES = {
    "self_attn.q_proj": dict(v=8, k=65536, kr=256),
    "self_attn.k_proj": dict(v=6, k=512, g=2),
    "self_attn.v_proj": dict(v=12, k=2048, kr=8192),
    "self_attn.o_proj": dict(v=8, k=256, v0=4, k0=16, p=8),
    "mlp.gate_proj": dict(v=10, k=16, norm=False),
    "mlp.up_proj": dict(v=16, k=8192, perm=False),
    "mlp.down_proj": dict(v=4, k=2, g=4, kr=2),
}


def build_vptq_model(
    folder, dtype=torch.float16, shard_bytes=None, form="config_for_layers", schemes=SCHEMES
):
    """A random VPTQ Llama on disk; returns {layer name: dense float64 W} from the oracle."""
    gen = torch.Generator().manual_seed(0)
    tensors, per_layer, dense = {}, {}, {}
    for i in range(CONFIG["num_hidden_layers"]):
        for part, (k_in, n_out) in LINEARS.items():
            spec = make_spec(k_in=k_in, n_out=n_out, **schemes[part])
            layer = random_layer(spec, seed=i * 10 + len(part), dtype=dtype)
            name = f"model.layers.{i}.{part}"
            tensors.update({f"{name}.{k}": v for k, v in layer.tensors.items()})
            per_layer[name] = spec_to_dict(spec) | {"unknown_future_key": 1}
            dense[name] = oracle_dense(layer)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = (
                1 + 0.1 * torch.randn(48, generator=gen)
            ).to(dtype)
    tensors["model.embed_tokens.weight"] = torch.randn(64, 48, generator=gen).to(dtype)
    tensors["model.norm.weight"] = torch.ones(48, dtype=dtype)
    tensors["lm_head.weight"] = (0.2 * torch.randn(64, 48, generator=gen)).to(dtype)
    cfg = dict(CONFIG, torch_dtype=str(dtype).removeprefix("torch."))
    if form == "config_for_layers":
        cfg["quantization_config"] = {"quant_method": "vptq", "config_for_layers": per_layer}
    elif form == "shared_layer_config":
        cfg["quantization_config"] = {
            "quant_method": "vptq",
            "config_for_layers": {},
            "shared_layer_config": {},
        }
    elif form == "quant_config":
        cfg["quant_config"] = per_layer
    write_checkpoint(folder, cfg, tensors, shard_bytes)
    return dense, tensors


def dense_twin(folder, dense, tensors):
    """The same model as a plain dense checkpoint, its linears from the oracle in float32."""
    plain = {
        k: v
        for k, v in tensors.items()
        if k.startswith(("model.embed", "model.norm", "lm_head")) or "layernorm" in k
    }
    plain.update({f"{name}.weight": torch.tensor(w).float() for name, w in dense.items()})
    write_checkpoint(folder, dict(CONFIG), plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vptq_model_round_trip(tmp_path, dtype):
    dense, tensors = build_vptq_model(tmp_path / "q", dtype, shard_bytes=200_000)
    assert len(list((tmp_path / "q").glob("model-*.safetensors"))) > 2
    lm = load_model(tmp_path / "q", "cpu", torch.float32, max_seq_len=32)
    assert lm.quant == "vptq" and len(lm.specs) == 14
    for name, w in dense.items():
        layer = lm.model.get_submodule(name)
        assert isinstance(layer, VQLinear)
        got = layer(torch.eye(layer.in_features)).T.double().numpy()
        assert abs(got - w).max() <= 1e-5 * (1 + abs(w).max()), name
    dense_twin(tmp_path / "d", dense, tensors)
    twin = load_model(tmp_path / "d", "cpu", torch.float32, max_seq_len=32)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(tokens), twin.model(tokens), atol=1e-3, rtol=1e-3)


def test_shared_layer_config_fallback_and_legacy_quant_config(tmp_path):
    dense, _ = build_vptq_model(tmp_path / "legacy", form="quant_config")
    assert len(load_model(tmp_path / "legacy", "cpu", max_seq_len=8).specs) == 14
    # shared_layer_config: one dict per last name component, used when no full name matches
    cfg = json.loads((tmp_path / "legacy" / "config.json").read_text())
    per_layer = cfg.pop("quant_config")
    shared = {n.rsplit(".", 1)[-1]: d for n, d in per_layer.items() if ".0." in n}
    cfg["quantization_config"] = {
        "quant_method": "vptq",
        "config_for_layers": {},
        "shared_layer_config": shared,
    }
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(cfg))
    lm = load_model(tmp_path / "legacy", "cpu", max_seq_len=8)
    assert set(lm.specs) == set(dense)


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["quantization_config"]["config_for_layers"][
                "model.layers.0.mlp.up_proj"
            ].update(norm_dim=1),
            "model.layers.0.mlp.up_proj: norm_dim=1",
        ),
        (
            lambda c: c["quantization_config"]["config_for_layers"][
                "model.layers.1.mlp.up_proj"
            ].update(vector_quant_dim="in"),
            "vector_quant_dim='in' is not supported",
        ),
        (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
        (
            lambda c: c.update(architectures=["GPT2LMHeadModel"]),
            "unsupported architecture GPT2LMHeadModel",
        ),
        (
            lambda c: c["quantization_config"]["config_for_layers"][
                "model.layers.0.mlp.up_proj"
            ].update(num_centroids=[-1, 300]),
            "'num_centroids' = 300 is not a power of two",
        ),
        (
            lambda c: c["quantization_config"]["config_for_layers"][
                "model.layers.0.mlp.up_proj"
            ].update(group_size=7),
            "!= in_features 48",
        ),
        (
            lambda c: c["quantization_config"]["config_for_layers"][
                "model.layers.0.mlp.up_proj"
            ].update(vector_lens=[-1, 4]),
            "tensor 'model.layers.0.mlp.up_proj.indices' has shape",
        ),
        (
            lambda c: c["quantization_config"]["config_for_layers"][
                "model.layers.1.mlp.down_proj"
            ].update(in_features=40, group_size=10),
            "layer model.layers.1.mlp.down_proj is 40->48 in quantization_config but 80->48 in "
            "the model shape",
        ),
    ],
)
def test_bad_configs_name_the_field(tmp_path, edit, message):
    build_vptq_model(tmp_path)
    _edit_config(tmp_path, edit)
    with pytest.raises(FormatError, match=r"config\.json|safetensors") as err:
        load_model(tmp_path, "cpu", max_seq_len=8)
    assert message in str(err.value)


def test_truncated_shard(tmp_path):
    build_vptq_model(tmp_path, shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=f"{shard.name}: truncated or corrupt"):
        load_model(tmp_path, "cpu", max_seq_len=8)


def test_missing_shard(tmp_path):
    build_vptq_model(tmp_path, shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FormatError, match=f"{shard.name}: shard listed in .* is missing"):
        load_model(tmp_path, "cpu", max_seq_len=8)


def test_missing_tensor(tmp_path):
    _, tensors = build_vptq_model(tmp_path / "a")
    del tensors["model.layers.1.self_attn.o_proj.outlier_indices"]
    write_checkpoint(
        tmp_path / "b", json.loads((tmp_path / "a" / "config.json").read_text()), tensors
    )
    with pytest.raises(
        FormatError, match=r"'model\.layers\.1\.self_attn\.o_proj\.outlier_indices' is missing"
    ):
        load_model(tmp_path / "b", "cpu", max_seq_len=8)


@pytest.mark.parametrize(
    "name, stored, message",
    [
        ("model.norm.weight", torch.int32,
         "'model.norm.weight' is torch.int32, expected floats; re-download"),
        ("model.layers.0.mlp.down_proj.perm", torch.int32,
         "'model.layers.0.mlp.down_proj.perm' is torch.int32, expected torch.int16; re-download"),
        ("model.layers.1.self_attn.q_proj.indices", torch.int16,
         "'model.layers.1.self_attn.q_proj.indices' is torch.int16, expected torch.int32; "
         "re-download"),
        ("model.layers.1.self_attn.q_proj.indices", torch.float32, "is torch.float32, expected "
         "torch.int32"),
    ],
)  # fmt: skip
def test_a_tensor_of_the_wrong_type_is_named_with_the_type_it_should_have(
    tmp_path, name, stored, message
):
    _, tensors = build_vptq_model(tmp_path / "a")
    tensors[name] = tensors[name].to(stored)
    write_checkpoint(
        tmp_path / "b", json.loads((tmp_path / "a" / "config.json").read_text()), tensors
    )
    with pytest.raises(FormatError, match=re.escape(message)) as e:
        load_model(tmp_path / "b", "cpu", max_seq_len=8)
    assert str(tmp_path / "b") in str(e.value)


def test_unsigned_16_bit_permutations_load_as_their_int16_bit_patterns(tmp_path):
    """A perm saved as uint16 (its values below 2^15) is the same table as int16."""
    _, tensors = build_vptq_model(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    perms = [n for n in tensors if n.endswith(".perm")]
    assert perms
    for n in perms:
        tensors[n] = tensors[n].to(torch.uint16)
    write_checkpoint(tmp_path / "b", config, tensors)
    want = load_model(tmp_path / "a", "cpu", max_seq_len=8).model.state_dict()
    got = load_model(tmp_path / "b", "cpu", max_seq_len=8).model.state_dict()
    for n in perms:
        assert got[n].dtype == torch.int16 and torch.equal(got[n], want[n])


def test_no_config_or_weights(tmp_path):
    with pytest.raises(FormatError, match=r"config\.json: missing"):
        load_model(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FormatError, match=r"no \.safetensors files"):
        load_model(tmp_path, "cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_model(tmp_path, "cpu")


PEAK_SCRIPT = """
import os, sys, threading, time, torch
from engine.loader import load_model
from engine.model import DenseLinear
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, done = [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
before = rss()
threading.Thread(target=watch, daemon=True).start()
lm = load_model(sys.argv[1], "cpu", torch.float16, max_seq_len=16)
done.set()
print(before, max(peak[0], rss()), lm.weight_bytes)
"""


@pytest.mark.slow
def test_peak_host_ram_stays_near_one_shard(tmp_path):
    """Loading reads one tensor at a time: the peak is the model plus about one shard, never
    the whole checkpoint held twice."""
    import subprocess
    import sys

    cfg = dict(
        CONFIG,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=4,
        vocab_size=8192,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in [
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (h, h)),
            ("self_attn.v_proj", (h, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ]:
            tensors[p + name + ".weight"] = torch.randn(shape, generator=gen).half()
        tensors[p + "input_layernorm.weight"] = torch.ones(h).half()
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
    tensors["model.embed_tokens.weight"] = torch.randn(8192, h, generator=gen).half()
    tensors["lm_head.weight"] = torch.randn(8192, h, generator=gen).half()
    tensors["model.norm.weight"] = torch.ones(h).half()
    shard = 40 << 20
    write_checkpoint(tmp_path, cfg, tensors, shard_bytes=shard)
    del tensors
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    before, peak, model = map(int, out)
    assert model > 150 << 20
    assert peak - before < model + 2 * shard + (60 << 20), (peak - before) / 2**20


def test_a_gpu_that_is_not_there_is_named(tmp_path):
    from engine.loader import check_device

    assert check_device("cpu") == torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expect = "sees no CUDA GPU" if count == 0 else f"sees {count} CUDA GPU(s), cuda:0..cuda:"
    with pytest.raises(ValueError, match=f"device 'cuda:99': PyTorch {re.escape(expect)}"):
        load_model(tmp_path, "cuda:99")  # before the folder is looked at


def test_gpu_index_and_missing_cuda_named_against_what_pytorch_sees(monkeypatch):
    """check_device with PyTorch's view of the GPUs replaced: two GPUs take cuda, cuda:0 and
    cuda:1 and name the range for cuda:2; none names why (a CPU build, or no driver)."""
    from engine.loader import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("cuda", "cuda:0", "cuda:1"):
        assert check_device(name) == torch.device(name)
    with pytest.raises(
        ValueError, match=re.escape("'cuda:2': PyTorch sees 2 CUDA GPU(s), cuda:0..cuda:1")
    ):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=re.escape("sees 1 CUDA GPU(s), cuda:0..cuda:0")):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(
        ValueError, match=r"'cuda': PyTorch sees no CUDA GPU \(this PyTorch is a CPU"
    ):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ValueError, match=r"no CUDA GPU \(no NVIDIA driver or GPU is visible\)"):
        check_device("cuda:0")


def test_default_dtype_is_float32_on_the_cpu_and_the_checkpoints_on_a_gpu():
    from types import SimpleNamespace

    from engine.loader import default_dtype

    for stored, gpu in [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                        ("float32", torch.float16)]:  # fmt: skip
        args = SimpleNamespace(torch_dtype=stored)
        assert default_dtype("cpu", args) == torch.float32
        assert default_dtype("cuda:0", args) == gpu


def test_weights_and_context_checked_against_the_free_bytes_to_the_byte(monkeypatch):
    """The GPU load's two checks with a fixed free figure: weights plus workspace fit up to the
    last byte, and the largest context is the most whole steps of 256 tokens whose KV cache fits
    beside the workspace (hand arithmetic: 2 layers x 2 KV heads x 64 x 2 K/V x 2 bytes = 1 KiB a
    token); a context above it is refused with the numbers."""
    from engine import loader
    from engine.memory import OutOfMemory, Shape

    free = {"bytes": 1000}
    monkeypatch.setattr(loader, "free_bytes", lambda dev: free["bytes"])
    gpu = torch.device("cuda:0")
    loader._check_weights_fit(600, "m", gpu, 400)  # exactly the free bytes
    with pytest.raises(OutOfMemory, match=r"m: the weights need .* plus .* of workspace on cuda:0"):
        loader._check_weights_fit(601, "m", gpu, 400)
    with pytest.raises(OutOfMemory, match="only"):
        loader._check_weights_fit(600, "m", gpu, 401)

    shape = Shape(layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64,
                  vocab=1000, max_context=8192)  # fmt: skip
    assert shape.kv_bytes_per_token == 1024
    work = shape.workspace()
    free["bytes"] = work + 1024 * 768 + 1023  # 768 tokens and a byte short of one more
    assert loader._context_that_fits(shape, gpu, 768) == 768
    free["bytes"] = work + 1024 * 768 - 1  # a byte short: one step less
    assert loader._context_that_fits(shape, gpu, 512) == 512
    with pytest.raises(
        OutOfMemory, match=r"a context of 768 tokens .* The largest context that fits is 512 tokens"
    ):
        loader._context_that_fits(shape, gpu, 768)
    with pytest.raises(OutOfMemory, match="a context of 600 tokens needs 600 KiB of KV cache"):
        loader._context_that_fits(shape, gpu, 600)
    free["bytes"] = work + 1024 * 100_000  # more than the model's own limit
    assert loader._context_that_fits(shape, gpu, 4096) == 8192


def test_weight_bytes_are_the_bytes_of_every_tensor_the_checkpoint_filled(tmp_path):
    """The ``loaded`` event's weight figure on a CPU load: each state-dict tensor's bytes as
    loaded (float32 norms, int16 indices, ...), once; nothing kept on the host. Progress comes
    after the first tensor, every 16th after it and the last, once: (i + 1) / n, ending at 1."""
    build_vptq_model(tmp_path)
    seen = []
    lm = load_model(tmp_path, "cpu", max_seq_len=64, progress=lambda f, s: seen.append((f, s)))
    tensors = list(lm.model.state_dict().values())
    assert lm.weight_bytes == sum(t.numel() * t.element_size() for t in tensors) > 6 << 20
    assert lm.host_bytes == 0
    n = len(tensors)
    assert n == 81  # tensors 0, 16, ..., 80: the last is a 16th one, reported once
    assert seen == [((i + 1) / 81, "loading weights") for i in (0, 16, 32, 48, 64, 80)]
    # the KV cache's figure: keys and values of 2 layers, 2 heads of 12, 64 positions, float32
    caches = [layer.self_attn.cache for layer in lm.model.model.layers]
    assert lm.kv_bytes == 2 * 2 * 2 * 12 * 64 * 4 == sum(c.k.nbytes + c.v.nbytes for c in caches)
    # tied embeddings: no lm_head, 80 tensors, so the last (the 80th) is reported on its own
    _edit_config(tmp_path, lambda c: c.update(tie_word_embeddings=True))
    seen.clear()
    load_model(tmp_path, "cpu", max_seq_len=64, progress=lambda f, s: seen.append((f, s)))
    assert seen == [((i + 1) / 80, "loading weights") for i in (0, 16, 32, 48, 64, 79)]


def held_bytes(model) -> int:
    """Bytes of every distinct storage a model's parameters and buffers hold."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("weights", ["float32", "float16"])  # VPTQ_CPU_WEIGHTS
@pytest.mark.parametrize("kind", ["vptq", "gptq", "dense", "dense-tied"])
def test_cpu_need_counts_what_a_cpu_load_holds_once_it_has_answered(
    tmp_path, kind, weights, monkeypatch
):
    """memory.cpu_need (the engine's check and the app's verdict) against the tensors a CPU
    load holds after a forward pass has expanded each quantized layer (in float16 by default)
    and, with float16 weights, loaded lm_head in float16 or copied a tied table: never less, at
    most a tenth more (the RoPE tables aside, a few KiB)."""
    from engine.memory import Shape, cpu_need

    monkeypatch.setenv("VPTQ_CPU_WEIGHTS", weights)

    if kind == "vptq":
        build_vptq_model(tmp_path)
    elif kind == "gptq":
        from .test_gptq import gptq_model

        folder, _ = gptq_model(tmp_path, bits=4, group=32, desc_act=True, sym=True, fmt="gptq")
        tmp_path = folder
    else:
        from .hf_models import make_hf_model

        make_hf_model("llama", tmp_path, tie_word_embeddings=kind == "dense-tied")
    quantized = kind in ("vptq", "gptq")
    lm = load_model(tmp_path, "cpu", max_seq_len=128)
    with torch.no_grad():
        lm.model(torch.tensor([[1, 2, 3]]))
    held = held_bytes(lm.model) - lm.model.cos.nbytes - lm.model.sin.nbytes
    cfg = json.loads((tmp_path / "config.json").read_text())
    files = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    gptq = (4, 32) if kind == "gptq" else None  # bits and group size, as the config says
    need = cpu_need(Shape.from_config(cfg), files, quantized, 128, gptq=gptq)
    counted = need.total - need.workspace
    assert held <= counted <= 1.1 * held, (held, need)
    assert (need.packed > 0) == quantized
    half = [
        m.dense_cache for m in lm.model.modules() if getattr(m, "dense_cache", None) is not None
    ]
    assert len(half) == (7 * lm.model.args.n_layers if quantized else 0)
    assert {t.dtype for t in half} <= {getattr(torch, weights)}
    head, copy = lm.model.lm_head, lm.model.cpu_output
    assert (head is None) == (kind == "dense-tied")
    if head is not None:  # loaded in the weights' dtype, no copy
        assert head.weight.dtype == getattr(torch, weights) and copy is None
    else:  # the tied table stays float32 for the lookups: a float16 copy beside it
        assert (copy is None) if weights == "float32" else (copy.dtype == torch.float16)


def test_a_load_for_quantize_keeps_float32_weights_and_counts_them(tmp_path, monkeypatch):
    """load_model(half_weights=False), as engine/quantize.py loads: with float16 CPU weights
    the default, a plain model's layers stay float32 and its output layer gets no copy, and
    cpu_need(half_weights=False) counts what it holds (the default count would be short by
    2 bytes a decoder weight)."""
    from engine.memory import Shape, cpu_need

    from .hf_models import make_hf_model

    monkeypatch.setenv("VPTQ_CPU_WEIGHTS", "float16")
    make_hf_model("llama", tmp_path)
    lm = load_model(tmp_path, "cpu", torch.float32, max_seq_len=128, half_weights=False)
    with torch.no_grad():
        lm.model(torch.tensor([[1, 2, 3]]))
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert lm.model.cpu_output is None
    held = held_bytes(lm.model) - lm.model.cos.nbytes - lm.model.sin.nbytes
    cfg = json.loads((tmp_path / "config.json").read_text())
    files = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    shape = Shape.from_config(cfg)
    need = cpu_need(shape, files, False, 128, half_weights=False)
    assert held <= need.total - need.workspace <= 1.1 * held and not need.half
    assert cpu_need(shape, files, False, 128).dense < need.dense


def test_cpu_linear_takes_float16_weights_one_token_in_float16_several_in_float32(monkeypatch):
    """engine/layers.py cpu_linear: one token multiplies in float16 (x and y rounded to it, as
    on a GPU; PyTorch sums in float32), several with the weight widened to float32 (in pieces of
    WIDEN_BYTES); both within float16's rounding of a float64 product."""
    from engine import layers
    from engine.layers import cpu_linear

    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g, dtype=torch.float64)
    bias = torch.randn(300, generator=g, dtype=torch.float64)
    w16 = w.half()
    for x in (torch.randn(1, 1, 200, generator=g), torch.randn(1, 7, 200, generator=g)):
        got = cpu_linear(x, w16, bias.float())
        assert got.dtype == torch.float32 and got.shape == (1, x.shape[1], 300)
        if x.shape[1] == 1:
            want = torch.nn.functional.linear(x.half(), w16, bias.half()).float()
        else:
            want = torch.nn.functional.linear(x, w16.float(), bias.float())
        assert torch.equal(got, want)
        exact = torch.nn.functional.linear(x.double(), w, bias)
        assert (got - exact).abs().max() <= 2e-2 * exact.abs().max()
    # pieces of 7 rows (7 x 200 float32 values), the last one of 6, give the whole product
    x = torch.randn(1, 7, 200, generator=g)
    whole = cpu_linear(x, w16, bias.float())
    monkeypatch.setattr(layers, "WIDEN_BYTES", 7 * 200 * 4)
    assert torch.allclose(cpu_linear(x, w16, bias.float()), whole, rtol=1e-6, atol=1e-5)
    # float32 weights: a plain float32 product
    x = torch.randn(1, 1, 200, generator=g)
    assert torch.equal(cpu_linear(x, w.float(), None), torch.nn.functional.linear(x, w.float()))


@pytest.mark.parametrize("kind", ["vptq", "dense"])
def test_float16_weights_on_the_cpu_answer_as_float32_ones_within_their_rounding(
    tmp_path, monkeypatch, kind
):
    """What the engine keeps on the CPU by default (engine/memory.py cpu_half_weights): the
    decoder's layers (expanded VPTQ ones, or a plain model's own weights, loaded so) and the
    output layer in float16. A prompt and then one token give the logits of float32
    weights within float16's rounding, not equal to them."""
    if kind == "vptq":
        build_vptq_model(tmp_path)
    else:
        from .hf_models import make_hf_model

        make_hf_model("llama", tmp_path)
    vocab = json.loads((tmp_path / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(2))
    got = {}
    for weights in ("float32", "float16"):
        monkeypatch.setenv("VPTQ_CPU_WEIGHTS", weights)
        model = load_model(tmp_path, "cpu", max_seq_len=64).model
        plain = [m for n, m in model.named_modules() if isinstance(m, DenseLinear)]
        # a plain model's layers as loaded, and any model's lm_head (plain in both)
        assert {m.weight.dtype for m in plain} == {getattr(torch, weights)}
        assert (model.lm_head in plain) and len(plain) == (1 + 7 * 2 if kind == "dense" else 1)
        with torch.no_grad():
            prompt = model(tokens[:, :-1])  # several tokens: the weights widened
            step = model(tokens[:, -1:], start=8)  # one token: in float16
        got[weights] = (prompt, step)
    for want, half in zip(got["float32"], got["float16"], strict=True):
        diff = (want - half).abs().max()
        assert 0 < diff <= 1e-2 * want.abs().max(), (diff, want.abs().max())


def test_a_model_larger_than_the_memory_is_refused_on_the_cpu_with_the_numbers(
    tmp_path, monkeypatch
):
    from engine import loader
    from engine.memory import OutOfMemory, Shape, cpu_need, gib

    build_vptq_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["max_position_embeddings"] = 1 << 20
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    files = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    shape = Shape.from_config(cfg)
    f32, bf16 = (cpu_need(shape, files, True, 1024, elem) for elem in (4, 2))
    assert bf16.total < f32.total
    # not even in bfloat16
    monkeypatch.setattr(loader, "host_available", lambda: bf16.total - bf16.kv_cache - 1)
    with pytest.raises(OutOfMemory) as e:
        load_model(tmp_path, "cpu", max_seq_len=1024)
    msg = str(e.value)
    assert str(tmp_path) in msg and f"about {gib(bf16.total)} of memory" in msg
    assert "as bfloat16" in msg and "a KV cache of 1024 tokens" in msg
    assert "Use an NVIDIA GPU" in msg
    # in bfloat16, not in float32: taken where no dtype was asked for, and said so
    monkeypatch.setattr(loader, "host_available", lambda: f32.total - 1)
    lm = load_model(tmp_path, "cpu", max_seq_len=1024)
    assert lm.model.model.norm.weight.dtype == torch.bfloat16
    assert lm.note.startswith(
        f"running in bfloat16: in float32 the model would take {gib(f32.total)}"
    )
    with pytest.raises(OutOfMemory, match="as float32"):
        load_model(tmp_path, "cpu", torch.float32, max_seq_len=1024)
    monkeypatch.setattr(loader, "host_available", lambda: bf16.total)  # float32's weights: no
    with pytest.raises(OutOfMemory, match="In bfloat16 it would fit: leave out --dtype"):
        load_model(tmp_path, "cpu", torch.float32, max_seq_len=1024)
    monkeypatch.setattr(loader, "host_available", lambda: None)
    ref = load_model(tmp_path, "cpu", max_seq_len=1024)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = lm.model(tokens).double(), ref.model(tokens).double()
    assert ref.model.model.norm.weight.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 2e-2  # bfloat16's 8 bits
    # the weights fit in float32, a context of 1M tokens (384 MiB of float32 KV cache) does not
    monkeypatch.setattr(loader, "host_available", lambda: f32.total)
    with pytest.raises(OutOfMemory) as e:
        load_model(tmp_path, "cpu", torch.float32, max_seq_len=1 << 20)
    found = re.search(r"available\. The largest context that fits is (\d+) tokens\.", str(e.value))
    assert found, str(e.value)
    largest = int(found[1])
    assert 1024 <= largest < 1024 + 256  # its KV cache is what the 1024 tokens' was
    lm = load_model(tmp_path, "cpu", torch.float32, max_seq_len=largest)
    assert lm.model.max_seq == largest and lm.note == ""
    # room for exactly 256 tokens (the reported step) names them; a byte less names none
    per_token = f32.kv_cache // 1024
    monkeypatch.setattr(
        loader, "host_available", lambda: f32.total - f32.kv_cache + 256 * per_token
    )
    with pytest.raises(OutOfMemory, match="The largest context that fits is 256 tokens"):
        load_model(tmp_path, "cpu", torch.float32, max_seq_len=1 << 20)
    monkeypatch.setattr(
        loader, "host_available", lambda: f32.total - f32.kv_cache + 256 * per_token - 1
    )
    with pytest.raises(OutOfMemory, match="Use an NVIDIA GPU, or a model with fewer parameters"):
        load_model(tmp_path, "cpu", torch.float32, max_seq_len=1 << 20)
    # where the memory cannot be read, nothing is refused
    monkeypatch.setattr(loader, "host_available", lambda: None)
    assert load_model(tmp_path, "cpu", max_seq_len=4096).model.max_seq == 4096


def test_host_available_is_between_the_free_and_the_total_memory():
    import ctypes
    import os
    import sys

    from engine.memory import MemoryStatusEx, host_available

    # Windows' MEMORYSTATUSEX: dwLength, dwMemoryLoad, then ullTotalPhys, ullAvailPhys, ...
    assert ctypes.sizeof(MemoryStatusEx) == 64 and MemoryStatusEx.avail_phys.offset == 16
    if not sys.platform.startswith("linux"):
        pytest.skip("the comparison below reads Linux's sysconf")
    page = os.sysconf("SC_PAGE_SIZE")
    free, total = os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    available = host_available()
    assert available is not None
    assert 0.9 * free <= available <= total  # MemAvailable: the free memory and what can be freed


def test_prefill_pieces_grow_with_the_room_beside_the_plan(monkeypatch):
    """A prefill piece takes 512 tokens (what the workspace holds) plus 512 more for each
    twice-the-workspace's-count of activations (2 x (4 hidden + 3 intermediate) x 2 bytes a
    token, 32 MiB a step of 512 here) that the GPU's free bytes hold beyond the workspace and
    the slack, up to 4096; VPTQ_PREFILL_CHUNK sets it."""
    from engine.memory import SLICED_SLACK, MiB, Shape

    monkeypatch.delenv("VPTQ_PREFILL_CHUNK", raising=False)
    shape = Shape(layers=2, hidden=1024, intermediate=4096, heads=8, kv_heads=8, head_dim=128,
                  vocab=1000, max_context=8192)  # fmt: skip
    # a step: 2 x (4 x 1024 + 3 x 4096) x 2 bytes x 512 tokens = 32 MiB
    planned = shape.workspace() + SLICED_SLACK
    assert shape.prefill_chunk(0) == 512  # short of room: the planned piece
    assert shape.prefill_chunk(planned + 32 * MiB - 1) == 512
    assert shape.prefill_chunk(planned + 32 * MiB) == 1024
    assert shape.prefill_chunk(planned + 3 * 32 * MiB + 5) == 2048
    assert shape.prefill_chunk(1 << 40) == 4096
    monkeypatch.setenv("VPTQ_PREFILL_CHUNK", "1536")
    assert shape.prefill_chunk(0) == 1536


def test_a_prompt_in_larger_pieces_gives_the_logits_of_512_token_pieces(demo_path):
    """Session.logits takes the load's piece size where it keeps only the last logits (a GPU
    with room plans up to 4096 tokens; on the CPU the load keeps 512): a 1300-token prompt in
    one piece gives the last logits of three 512-token pieces; all logits (perplexity) still
    come in pieces of 512; a larger piece that runs out of memory (its room taken since the
    load) gives way to 512-token ones."""
    import torch

    from engine.generate import Session

    s = Session.load(str(demo_path), "cpu", torch.float32, 2048)
    assert s.loaded.prefill_chunk == 512
    ids = torch.randint(0, 40000, (1300,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = []
    forward = s.loaded.model.forward
    s.loaded.model.forward = lambda t, *a, **k: (calls.append(t.shape[1]), forward(t, *a, **k))[1]
    small = s.logits(ids, 0, last_only=True)
    assert calls == [512, 512, 276]
    s.loaded.prefill_chunk = 2048
    calls.clear()
    large = s.logits(ids, 0, last_only=True)
    assert calls == [1300]
    assert torch.allclose(large, small, rtol=1e-4, atol=1e-4)
    calls.clear()
    assert s.logits(ids[:600], 0, last_only=False).shape[0] == 600 and calls == [512, 88]

    def short_of_memory(t, *a, **k):  # the room planned at load taken by another program
        calls.append(t.shape[1])
        if t.shape[1] > 512:
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        return forward(t, *a, **k)

    s.loaded.model.forward = short_of_memory
    calls.clear()
    again = s.logits(ids, 0, last_only=True)  # pieces of 512 once the larger one fails
    assert calls == [1300, 512, 512, 276] and torch.equal(again, small)
    assert s.cached == ids


def test_a_model_name_resolves_to_a_folder_the_app_or_the_hub_cache_holds(tmp_path, monkeypatch):
    """engine/models.py resolve_model: a local folder as given; a repo id to the app's download
    (VPTQ_CHAT_MODELS/owner/name) once its install marker says it is complete, else to the
    Hugging Face cache's snapshot (never the network); anything else is refused saying what
    would do."""
    import huggingface_hub.constants

    from engine.models import resolve_model
    from engine.paths import INSTALLED_MARKER

    monkeypatch.setenv("VPTQ_CHAT_MODELS", str(tmp_path / "models"))
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    local = tmp_path / "mine"
    local.mkdir()
    assert resolve_model(str(local)) == local
    ours = tmp_path / "models" / "VPTQ-community" / "m"
    ours.mkdir(parents=True)
    (ours / "config.json").write_text("{}")  # a download under way: not the model yet
    not_found = r"model 'VPTQ-community/m' not found: give a local model folder, 'demo', or a"
    with pytest.raises(FormatError, match=not_found):
        resolve_model("VPTQ-community/m")
    rev = "0123456789" * 4  # the hub cache's layout: refs/main names the snapshot
    snapshot = cache / "models--VPTQ-community--m" / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (cache / "models--VPTQ-community--m" / "refs").mkdir()
    (cache / "models--VPTQ-community--m" / "refs" / "main").write_text(rev)
    assert resolve_model("VPTQ-community/m") == snapshot
    (ours / INSTALLED_MARKER).write_text("{}")  # the app's download finished and verified
    assert resolve_model("VPTQ-community/m") == ours
    for name in ("VPTQ-community/other", "./VPTQ-community/m", "a/b/c", "nothing"):
        with pytest.raises(FormatError, match=f"model '{re.escape(name)}' not found"):
            resolve_model(name)


def test_tensors_the_model_does_not_use_are_named_in_the_load_s_note(tmp_path, caplog, monkeypatch):
    """A checkpoint with tensors the model built from config.json never reads (a part of an
    architecture it does not describe) loads with a note naming them (they were ignored
    without a word); RoPE's saved frequencies, all-zero tensors (GPTQ exporters' biases) and
    lm_head's copy of a tied table are not named."""
    _, tensors = build_vptq_model(tmp_path / "q")
    clean = load_model(tmp_path / "q", "cpu", torch.float32, max_seq_len=32)
    assert clean.note == ""
    extra = {
        "model.layers.0.mlp.extra_norm.weight": torch.ones(48, dtype=torch.float16),
        "model.layers.1.self_attn.q_norm.weight": torch.full((12,), 0.5, dtype=torch.float16),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6),
        "model.layers.0.mlp.gate_proj.bias": torch.zeros(80, dtype=torch.float16),
    }
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    write_checkpoint(tmp_path / "x", cfg, {**tensors, **extra})
    with caplog.at_level("WARNING", logger="engine.loader"):
        lm = load_model(tmp_path / "x", "cpu", torch.float32, max_seq_len=32)
    said = (
        "2 tensors of the checkpoint are not used by the model as built from config.json "
        "(model.layers.0.mlp.extra_norm.weight, model.layers.1.self_attn.q_norm.weight): if "
        "its answers look wrong, it has parts VPTQ Chat does not run: choose another model"
    )
    assert lm.note == said
    assert f"{tmp_path / 'x'}: {said}" in caplog.text
    # many: the first three named
    many = {f"model.layers.0.extra_{i}": torch.ones(2) for i in range(5)}
    write_checkpoint(tmp_path / "m", cfg, {**tensors, **many})
    lm = load_model(tmp_path / "m", "cpu", torch.float32, max_seq_len=32)
    assert lm.note == (
        "5 tensors of the checkpoint are not used by the model as built from config.json "
        "(model.layers.0.extra_0, model.layers.0.extra_1, model.layers.0.extra_2 and 2 more): "
        "if its answers look wrong, it has parts VPTQ Chat does not run: choose another model"
    )
    one = {"model.layers.0.extra": torch.ones(2)}
    write_checkpoint(tmp_path / "one", cfg, {**tensors, **one})
    lm = load_model(tmp_path / "one", "cpu", torch.float32, max_seq_len=32)
    assert lm.note.startswith("1 tensor of the checkpoint is not used by the model")
    # after another note: the CPU's bfloat16 where float32 would not fit
    from engine import loader
    from engine.memory import Shape, cpu_need

    files = sum(f.stat().st_size for f in (tmp_path / "one").glob("*.safetensors"))
    f32 = cpu_need(Shape.from_config(cfg), files, True, 32, 4)
    monkeypatch.setattr(loader, "host_available", lambda: f32.total - 1)
    both = load_model(tmp_path / "one", "cpu", max_seq_len=32).note
    assert both.startswith("running in bfloat16: ") and both.endswith(f"; {lm.note}")
    # a tied table: lm_head's own copy is not read, as transformers does not read it
    write_checkpoint(tmp_path / "t", {**cfg, "tie_word_embeddings": True}, tensors)
    assert load_model(tmp_path / "t", "cpu", torch.float32, max_seq_len=32).note == ""
    assert "lm_head.weight" in tensors
