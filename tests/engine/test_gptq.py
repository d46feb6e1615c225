"""GPTQ checkpoints: the bit layouts against hand-checked words and a bit-by-bit packer of our
own, the zero-point conventions, and whole models against transformers holding the same
weights dequantized in float64 (../shared/docs/gptq-format.md §6)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.formats import gptq
from engine.formats.gptq import GPTQSpec
from engine.formats.vptq import FormatError
from engine.loader import load_model

from .hf_models import make_hf_model
from .test_cli import run

M32 = 0xFFFFFFFF


def words(*unsigned: int) -> torch.Tensor:
    """A column of int32 words from their unsigned values."""
    return torch.tensor([[w - 2**32 if w >= 2**31 else w] for w in unsigned], dtype=torch.int32)


def bitwise_pack(codes: list[int], bits: int) -> list[int]:
    """The oracle: code i at bits [bits*i, bits*i + bits) of one little-endian integer, cut into
    32-bit words (what §2.1 and §2.2 describe, for every width alike)."""
    big = 0
    for i, c in enumerate(codes):
        big |= c << (bits * i)
    return [(big >> (32 * w)) & M32 for w in range(len(codes) * bits // 32)]


# Known answers, gptq-format.md §2.1-§2.3.
@pytest.mark.parametrize(
    ("bits", "codes", "expect"),
    [
        (4, list(range(1, 9)), [0x87654321]),
        (2, [0, 1, 2, 3] * 4, [0xE4E4E4E4]),
        (8, [1, 2, 3, 4], [0x04030201]),
        (3, [4] * 32, [0x24924924, 0x49249249, 0x92492492]),
        (3, [3] * 32, [0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]),
        (3, [i % 8 for i in range(32)], [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
        (2, [2] * 16, [0xAAAAAAAA]),
        (8, [0x7F] * 4, [0x7F7F7F7F]),
    ],
)
def test_known_words(bits, codes, expect):
    assert bitwise_pack(codes, bits) == expect
    assert gptq.unpack_rows(words(*expect), bits)[:, 0].tolist() == codes
    packed = gptq.pack_rows(torch.tensor(codes).view(-1, 1), bits)[:, 0]
    assert [w & M32 for w in packed.tolist()] == expect


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_random_codes_against_the_bitwise_packer(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 5), generator=g)
    want = torch.stack(
        [words(*bitwise_pack(codes[:, c].tolist(), bits))[:, 0] for c in range(5)], 1
    )
    assert torch.equal(gptq.pack_rows(codes, bits), want)
    assert torch.equal(gptq.unpack_rows(want, bits), codes.to(torch.int32))
    assert torch.equal(gptq.unpack_cols(want.T.contiguous(), bits), codes.T.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_permuting_rows_moves_whole_codes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (64, 9), generator=g)
    order = torch.randperm(64, generator=g)
    for step in (None, 2):  # in one piece and in column chunks
        got = gptq.permute_rows(gptq.pack_rows(codes, bits), order, bits, step)
        assert torch.equal(gptq.unpack_rows(got, bits), codes[order].to(torch.int32))


def test_group_sizes_from_1_and_minus_1_for_the_whole_input():
    """group_size -1 is one group of all K inputs, as is K itself in the layer's description;
    1 (a group an input row) is the smallest; the writer's version is read to the patch."""
    config = gptq.GPTQConfig(4, 1, False, True, False, {}, None, "config.json")
    q = "model.layers.0.self_attn.q_proj"
    assert config.spec(q, 64, 32, False).groups == 64
    whole = replace(config, group_size=-1).spec(q, 64, 32, False)
    assert (whole.group_size, whole.groups) == (64, 1)
    assert gptq.describe(whole) == "4-bit, group -1, asym, gptq_v2"
    assert gptq.describe(replace(whole, group_size=32, sym=True, v2=False)) == (
        "4-bit, group 32, sym, gptq"
    )
    assert gptq.gptqmodel_version({"meta": {"quantizer": ["optimum:1.2", "gptqmodel:4.1"]}}) == (
        4, 1, 0,
    )  # fmt: skip


def spec(bits=4, sym=False, v2=True, K=64, N=32, group=32):
    return GPTQSpec(K, N, bits, group, sym, v2)


def test_zero_points_v1_v2_and_symmetric(caplog):
    z = torch.tensor([[0, 5, 15, 8] * 8, [1, 2, 3, 4] * 8])  # [groups 2, N 32]
    assert torch.equal(gptq.zero_points(gptq.pack_cols(z, 4), spec(), "x"), z.to(torch.int32))
    # v1 stores z - 1 and the reader adds 1 unmasked: a stored 15 is a zero point of 16
    assert torch.equal(gptq.zero_points(gptq.pack_cols(z, 4), spec(v2=False), "x"), z + 1)
    # symmetric: 2**(b-1) whatever is stored; a stored pattern of the other format is named
    v2_pattern = gptq.pack_cols(torch.full((2, 32), 8), 4)
    with caplog.at_level(logging.WARNING):
        assert gptq.zero_points(v2_pattern, spec(sym=True, v2=True), "x").unique().tolist() == [8]
        assert not caplog.records
        got = gptq.zero_points(v2_pattern, spec(sym=True, v2=False), "model.layers.0.q")
    assert got.unique().tolist() == [8]
    assert "model.layers.0.q: symmetric, but its stored zero points do not match the gptq" in (
        caplog.text
    )
    caplog.clear()
    v1_pattern = gptq.pack_cols(torch.full((2, 32), 7), 4)  # v1 stores 2**(b-1) - 1
    with caplog.at_level(logging.WARNING):
        assert gptq.zero_points(v1_pattern, spec(sym=True, v2=False), "x").unique().tolist() == [8]
        assert not caplog.records


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def old_gptqmodel_words(z: torch.Tensor, bits: int) -> torch.Tensor:
    """v1 qzeros as GPTQModel before 7.0.0 wrote them: the v2 words less a constant a word
    (gptq-format.md §3.3 case 2 and §5.4's 3-bit constants, typed in from there)."""
    consts = {2: [0x55555555], 3: [0x24924924, 0x92492492, 0x49249249], 4: [0x11111111],
              8: [0x01010101]}[bits]  # fmt: skip
    v2 = gptq.pack_cols(z, bits).to(torch.int64)
    sub = torch.tensor([consts[j % len(consts)] for j in range(v2.shape[1])])
    w = (v2 - sub) % 2**32
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def gptq_model(tmp_path, kind="llama", *, bits, group, desc_act, sym, fmt, g_idx=True,
               dense=(), overrides=None, seed=0, extra=None, old_writer=False,
               **hf_config):  # fmt: skip
    """A tiny transformers model quantized by hand into a GPTQ folder: random codes, scales and
    zero points (0 and 2**b - 1 among them for v2; v1 cannot hold 0, except as GPTQModel before
    7.0.0 wrote it, ``old_writer``), and g_idx a random act-order map or the trivial one.
    Returns (folder, the transformers model holding W = scales[g] * (q - z[g]) in float64,
    rounded once to float32)."""
    src = tmp_path / "hf"
    hf = make_hf_model(kind, src, **hf_config)
    hf = hf.double()
    overrides = overrides or {}
    gen = torch.Generator().manual_seed(seed)
    state = load_file(str(src / "model.safetensors"))
    for name, module in hf.named_modules():
        part = name.rsplit(".", 1)[-1]
        if part not in LINEARS or any(d in name for d in dense):
            continue
        b = overrides.get(name, bits)
        N, K = module.weight.shape
        G = K if group == -1 else group
        ng = -(-K // G)
        order = torch.randperm(K, generator=gen) if desc_act else torch.arange(K)
        gi = torch.empty(K, dtype=torch.int64)
        gi[order] = torch.arange(K) // G  # row k -> the group it was quantized in
        q = torch.randint(0, 2**b, (K, N), generator=gen)
        lo = 1 if fmt == "gptq" and not old_writer else 0
        z = (
            torch.full((ng, N), 2 ** (b - 1))
            if sym
            else torch.randint(lo, 2**b, (ng, N), generator=gen)
        )
        if not sym:
            z[0, 0], z[-1, -1] = lo, 2**b - 1
        scales = (torch.rand(ng, N, generator=gen) * 0.02 + 1e-3).half()
        w = scales.double()[gi] * (q - z[gi]).double()  # [K, N]
        with torch.no_grad():
            module.weight.copy_(w.T)
        stored = z if fmt == "gptq_v2" else z - 1
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = gptq.pack_rows(q, b)
        state[f"{name}.qzeros"] = (
            old_gptqmodel_words(z, b) if old_writer else gptq.pack_cols(stored, b)
        )
        state[f"{name}.scales"] = scales
        if g_idx:
            state[f"{name}.g_idx"] = gi.to(torch.int32)
    folder = tmp_path / "gptq"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act,
        "sym": sym, "checkpoint_format": fmt, **(extra or {}),
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, hf


def assert_same_logits(folder, hf):
    ours = load_model(folder, "cpu", torch.float32, max_seq_len=64)
    assert ours.quant == "gptq"
    tokens = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits.float()
        got = ours.model(tokens)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    return ours


@pytest.mark.parametrize(
    ("kind", "bits", "group", "desc_act", "sym", "fmt"),
    [
        ("llama", 2, 32, False, False, "gptq_v2"),  # 2-bit zero points of 0: only v2 holds them
        ("qwen2", 3, 32, True, False, "gptq"),  # 3-bit straddling codes, act-order, qkv bias
        ("llama", 4, 64, True, True, "gptq"),  # K = 96: a short last group
        ("llama", 8, -1, False, False, "gptq_v2"),  # one group over all of K
        ("llama", 4, 32, False, False, "gptq"),
    ],
)
def test_models_match_transformers_holding_the_dequantized_weights(
    tmp_path, kind, bits, group, desc_act, sym, fmt
):
    folder, hf = gptq_model(tmp_path, kind, bits=bits, group=group, desc_act=desc_act, sym=sym,
                            fmt=fmt)  # fmt: skip
    ours = assert_same_logits(folder, hf)
    q = ours.model.model.layers[0].self_attn.q_proj
    assert (q.spec.bits, q.spec.sym, q.spec.v2) == (bits, sym, fmt == "gptq_v2")


def test_gptqmodel_before_7_zero_words_are_undone_word_by_word():
    # §5.4's worked example: symmetric 3-bit, v2 zeros all 4, written by GPTQModel < 7.0.0
    stored = old_gptqmodel_words(torch.full((1, 32), 4), 3)
    assert gptq.unpack_cols(stored, 3)[0].tolist() == [0] * 10 + [4] + [3] * 11 + [2] * 10
    old = GPTQSpec(64, 32, 3, 32, False, False, word_zeros=True)
    assert gptq.zero_points(stored, old, "x").unique().tolist() == [4]
    # a field-by-field reader gets §5.4's wrong zeros 1, 5, 4, 3
    plain = gptq.zero_points(stored, spec(bits=3, v2=False), "x")[0]
    assert plain.tolist() == [1] * 10 + [5] + [4] * 11 + [3] * 10
    # §3.3 case 2: 4-bit fields [0, 5, 8, ...] less 0x11111111 borrow: [15, 3, 7, ...]
    z = torch.tensor([[0, 5, 8, 1, 15, 0, 0, 2] * 4])
    stored = old_gptqmodel_words(z, 4)
    assert gptq.unpack_cols(stored, 4)[0, :3].tolist() == [15, 3, 7]
    assert torch.equal(gptq.zero_points(stored, replace(old, bits=4), "x"), z.to(torch.int32))
    assert gptq.zero_points(stored, spec(v2=False), "x")[0, :3].tolist() == [16, 4, 8]


@pytest.mark.parametrize(
    ("quantizer", "word_zeros"),
    [
        (["gptqmodel:4.1.0"], True),
        ("gptqmodel:0.9.1", True),
        (["gptqmodel:6.9.9-dev", "transformers:4.57"], True),
        (["gptqmodel:7.0.0"], False),
        (["gptqmodel:10.2"], False),
        (["optimum:2.1.0"], False),  # AutoGPTQ's packer: per field
        (None, False),
    ],
)
def test_the_writer_decides_how_v1_zero_words_are_read(tmp_path, quantizer, word_zeros):
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq"}
    if quantizer is not None:
        cfg["meta"] = {"quantizer": quantizer}
    read = gptq.read_config({"quantization_config": cfg}, tmp_path)
    assert read.spec("model.layers.0.mlp.up_proj", 64, 32, False).word_zeros is word_zeros
    v2 = gptq.read_config(
        {"quantization_config": {**cfg, "checkpoint_format": "gptq_v2"}}, tmp_path
    )
    assert not v2.word_zeros  # v2 zero points were never subtracted from


@pytest.mark.parametrize(("bits", "sym"), [(3, False), (2, False), (3, True)])
def test_a_model_by_gptqmodel_before_7_matches_transformers(tmp_path, bits, sym, caplog):
    meta = {"meta": {"quantizer": ["gptqmodel:4.2.5"]}}
    folder, hf = gptq_model(tmp_path, bits=bits, group=32, desc_act=True, sym=sym, fmt="gptq",
                            old_writer=True, extra=meta)  # fmt: skip
    with caplog.at_level(logging.INFO):
        ours = assert_same_logits(folder, hf)
    assert "written by GPTQModel 4.2.5 (before 7.0.0)" in caplog.text
    assert "do not match" not in caplog.text  # symmetric: the stored pattern is v2's once added
    assert "GPTQModel < 7" in repr(ours.model.model.layers[0].mlp.up_proj)


def test_old_checkpoints_without_g_idx_and_per_module_settings(tmp_path):
    # no g_idx (pre-act-order tools); `dynamic` leaves down_proj dense and makes layer 1's
    # projections 8-bit; the sidecar quantize_config.json agrees with config.json
    layer1 = {f"model.layers.1.{p}.{n}": 8 for p in ("self_attn", "mlp") for n in LINEARS}
    folder, hf = gptq_model(
        tmp_path, bits=4, group=32, desc_act=False, sym=True, fmt="gptq", g_idx=False,
        dense=("down_proj",), overrides=layer1,
        extra={"dynamic": {r"-:.*down_proj": {}, r"+:model\.layers\.1\.": {"bits": 8}}},
    )  # fmt: skip
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    ours = assert_same_logits(folder, hf)
    layers = ours.model.model.layers
    assert type(layers[0].mlp.down_proj).__name__ == "DenseLinear"  # left dense
    assert (layers[0].mlp.gate_proj.spec.bits, layers[1].mlp.gate_proj.spec.bits) == (4, 8)


def test_modules_in_block_to_quantize_leaves_the_others_dense(tmp_path):
    """modules_in_block_to_quantize (lists of a block's module names, as GPTQModel writes it)
    without down_proj: down_proj stays dense in every layer, the rest is read as GPTQ."""
    listed = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"]]  # fmt: skip
    folder, hf = gptq_model(
        tmp_path, bits=4, group=32, desc_act=False, sym=False, fmt="gptq", dense=("down_proj",),
        extra={"modules_in_block_to_quantize": listed},
    )  # fmt: skip
    layers = assert_same_logits(folder, hf).model.model.layers
    for layer in layers:
        assert type(layer.mlp.down_proj).__name__ == "DenseLinear"
        assert type(layer.mlp.up_proj).__name__ != "DenseLinear"
        assert type(layer.self_attn.q_proj).__name__ != "DenseLinear"


def test_the_engine_chats_with_a_gptq_model(tmp_path, demo_path):
    folder, _ = gptq_model(tmp_path, bits=2, group=32, desc_act=True, sym=False, fmt="gptq_v2",
                           vocab_size=49152)  # the demo's tokenizer  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo_path / name, folder / name)
    r = run("generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", 3,
            "--temperature", 0)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[cut at the token limit] 3 tokens" in r.stderr


def _edit(folder, fn, name="config.json"):
    path = folder / name
    cfg = json.loads(path.read_text()) if path.exists() else {}
    fn(cfg)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["quantization_config"].update(checkpoint_format="marlin"),
         "checkpoint_format 'marlin' is not supported (only 'gptq' and 'gptq_v2')"),
        (lambda c: c["quantization_config"].update(bits=5),
         "model.layers.0.self_attn.q_proj: 5-bit GPTQ is not supported"),
        (lambda c: c["quantization_config"].update(pack_dtype="int16"),
         "pack_dtype 'int16' is not supported"),
        (lambda c: c["quantization_config"].update(bits=2),  # the weights are 4-bit
         "tensor 'model.layers.0.self_attn.q_proj.qweight' has shape [8, 64] but config.json "
         "implies [4, 64]"),
        (lambda c: c["quantization_config"].update(group_size=64),  # 1 group of K, 2 in the file
         "'model.layers.0.self_attn.q_proj.qzeros' has shape [2, 8] but config.json implies [1, "
         "8]"),
        (lambda c: c["quantization_config"].update(quant_method="awq"),
         "quant_method 'awq' is not supported (VPTQ and GPTQ are)"),
        (lambda c: c["quantization_config"].update(dynamic={"+:(": {"bits": 8}}),
         "dynamic pattern '+:(' is not a regex"),
        (lambda c: c["quantization_config"].update(bits=True),
         "'bits' is missing or not a whole number"),
        (lambda c: c["quantization_config"].update(dynamic={r"+:.*q_proj": 8}),
         "'dynamic' must map module patterns to settings"),
        (lambda c: c["quantization_config"].update(dynamic=[r"+:.*q_proj"]),
         "'dynamic' must map module patterns to settings"),
        (lambda c: c["quantization_config"].update(group_size=0),
         "model.layers.0.self_attn.q_proj: group_size 0 must be -1 or a positive number"),
        (lambda c: c["quantization_config"].update(
            dynamic={r"+:.*\.q_proj": {"group_size": "32"}}),
         "model.layers.0.self_attn.q_proj: group_size '32' must be -1 or a positive number"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_field(tmp_path, edit, message):
    folder, _ = gptq_model(tmp_path, bits=4, group=32, desc_act=False, sym=False, fmt="gptq")
    _edit(folder, edit)
    with pytest.raises(FormatError, match=re.escape(message)):
        load_model(folder, "cpu", torch.float32, max_seq_len=16)


def test_disagreeing_config_files_and_a_bad_g_idx_are_named(tmp_path):
    folder, _ = gptq_model(tmp_path, bits=4, group=32, desc_act=True, sym=False, fmt="gptq")
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32}))
    with pytest.raises(FormatError, match="disagree on bits \\(4 against 8\\)"):
        load_model(folder, "cpu", torch.float32, max_seq_len=16)
    (folder / "quantize_config.json").unlink()
    state = load_file(str(folder / "model.safetensors"))
    g_idx = state["model.layers.1.mlp.up_proj.g_idx"]
    for bad, seen in ((9, "0..9"), (2, "0..2"), (-1, "-1..1")):  # K = 64, group 32: groups 0, 1
        g_idx[5] = bad
        save_file(state, str(folder / "model.safetensors"))
        with pytest.raises(FormatError, match=rf"model.layers.1.mlp.up_proj.g_idx: group numbers "
                           rf"{seen} outside 0..1"):  # fmt: skip
            load_model(folder, "cpu", torch.float32, max_seq_len=16)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_kernels")
@pytest.mark.parametrize(
    ("bits", "sym", "fmt", "desc_act", "group"),
    [(2, False, "gptq_v2", True, 32), (3, True, "gptq", True, 32), (4, False, "gptq", False, 32),
     (8, True, "gptq_v2", False, -1)],
)  # fmt: skip
def test_on_the_gpu_logits_match_and_graph_decode_gives_the_eager_tokens(
    tmp_path, bits, sym, fmt, desc_act, group
):
    from engine.decode import GraphDecoder
    from engine.sampling import SamplingParams

    from .test_runtime import eager_tokens

    folder, hf = gptq_model(tmp_path, bits=bits, group=group, desc_act=desc_act, sym=sym,
                            fmt=fmt)  # fmt: skip
    lm = load_model(folder, "cuda", torch.float16, max_seq_len=64)
    up = lm.model.model.layers[0].mlp.up_proj
    assert up.contiguous_groups and (up.perm is not None) == desc_act  # rows sorted at load
    tokens = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits.float()
        got = lm.model(tokens.cuda()).float().cpu()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)  # fp16 activations
        lm.model.lm_head.weight.mul_(40)  # clear-cut greedy choices from random weights
        p = SamplingParams(temperature=0)
        eager = eager_tokens(lm.model, tokens.cuda(), p, seed=1, n=20)
        logits = lm.model(tokens.cuda(), 0, last_only=True)[0]
        seen = torch.zeros(97, dtype=torch.bool, device="cuda")
        assert list(GraphDecoder(lm.model).run(logits, 9, seen, p, seed=1, limit=20)) == eager


def test_unpacking_in_column_slices_gives_the_whole_layer(tmp_path):
    # the GPU path unpacks a layer a few output columns at a time (memory.DEQUANT_WORKSPACE)
    folder, _ = gptq_model(tmp_path, "qwen2", bits=3, group=32, desc_act=True, sym=False,
                           fmt="gptq")  # fmt: skip
    q = load_model(folder, "cpu", torch.float32, max_seq_len=16).model.model.layers[0]
    q = q.self_attn.q_proj  # with a bias
    x = torch.randn(3, q.in_features, dtype=torch.float64).float()
    whole = q(x)
    for step in (1, 7, 64, 1000):
        torch.testing.assert_close(q.linear_in_slices(x, q.bias, step), whole)


@pytest.mark.parametrize("bits", [3, 4])
def test_rows_sorted_by_group_give_the_same_layer(tmp_path, bits):
    # what a GPU load does to act-order layers, here on the CPU where its outputs are exact
    folder, _ = gptq_model(tmp_path, "qwen2", bits=bits, group=32, desc_act=True, sym=False,
                           fmt="gptq_v2")  # fmt: skip
    q = load_model(folder, "cpu", torch.float32, max_seq_len=16).model.model.layers[1]
    q = q.self_attn.q_proj
    assert q.perm is None and not q.contiguous_groups  # the CPU keeps the stored order
    x = torch.randn(5, q.in_features, dtype=torch.float64).float()
    w, y = q.weight_t(torch.float32), q(x)
    q.sort_rows()
    assert q.perm is not None and q.g_idx_is_trivial()
    assert torch.equal(q.g_idx.diff() >= 0, torch.ones(q.in_features - 1, dtype=torch.bool))
    assert torch.equal(q.weight_t(torch.float32), w)
    q.dense_cache = None
    torch.testing.assert_close(q(x), y)
    # sorting the weights' rows alone (without perm) would not be the same layer
    assert not torch.equal(gptq.dequant(q.qweight, q.zeros, q.scales, q.g_idx, q.spec), w.T)


def test_settings_only_in_quantize_config_json(tmp_path):
    # AutoGPTQ-era folders: config.json without quantization_config, the settings beside it
    folder, hf = gptq_model(tmp_path, bits=8, group=32, desc_act=True, sym=False, fmt="gptq")
    settings = {}
    _edit(folder, lambda c: settings.update(c.pop("quantization_config")))
    (folder / "quantize_config.json").write_text(json.dumps(settings))
    assert_same_logits(folder, hf)


def act_order_layer(K, N, G, bits, dtype, seed):
    """Random tensors of a GPTQ layer: (generator, g_idx an act-order map with a short last
    group where G does not divide K, codes q [K, N], true zero points z [groups, N] up to 2**b
    (v1's unmasked +1), scales in dtype)."""
    g = torch.Generator().manual_seed(seed)
    ng = -(-K // G)
    g_idx = torch.empty(K, dtype=torch.int64)
    g_idx[torch.randperm(K, generator=g)] = torch.arange(K) // G
    q = torch.randint(0, 2**bits, (K, N), generator=g)
    z = torch.randint(0, 2**bits + 1, (ng, N), generator=g)
    scales = (torch.rand(ng, N, generator=g) * 0.02 + 1e-3).to(dtype)
    return g, g_idx, q, z, scales


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("N", [200, 198])  # 4 columns a thread, and 1 (N % 4 != 0)
def test_the_gemv_kernel_against_float64(bits, dtype, N):
    # act-order g_idx, a short last group, N not a multiple of a block's columns, K over one
    # split's 1024 rows; 1-13 tokens (tiles of 8, 4, 2, 1). Three forms of the same layer: as
    # stored (a group looked up a row), rows sorted by group with perm (the load's form: the
    # grouped kernel where bits != 3 and N % 4 == 0), and sorted without the group size's
    # promise (the first kernel through perm)
    K, N_, G = 2112, N, 128
    g, g_idx, q, z, scales = act_order_layer(K, N_, G, bits, dtype, seed=bits)
    bias = torch.randn(N_, generator=g).to(dtype)
    w = scales.double()[g_idx] * (q - z[g_idx]).double()
    packed = gptq.pack_rows(q, bits)
    order = torch.argsort(g_idx, stable=True)
    zs = z.to(torch.int32).cuda(), scales.cuda()
    stored = (packed.cuda(), *zs, g_idx.to(torch.int32).cuda())
    by_group = (gptq.permute_rows(packed, order, bits).cuda(), *zs, g_idx[order].int().cuda())
    perm = order.to(torch.int32).cuda()
    forms = {
        "stored": (stored, {}),
        "sorted": (by_group, {"perm": perm, "group_size": G}),
        "sorted, no group promise": (by_group, {"perm": perm}),
    }
    for tokens in (1, 3, 8, 13):
        x = torch.randn(tokens, K, generator=g).to(dtype)
        want = x.double() @ w + bias.double()
        for form, (args, kw) in forms.items():
            got = torch.ops.vptq.gptq_gemv(x.cuda(), *args, bias.cuda(), bits, **kw)
            got = got.cpu().double()
            err = (got - want).abs().max() / want.abs().max()
            assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), (form, tokens, float(err))
        unbiased = torch.ops.vptq.gptq_gemv(x.cuda(), *by_group, None, bits, perm, G)
        torch.testing.assert_close(unbiased.cpu().double() + bias.double(), got, atol=0.05,
                                   rtol=0.02)  # fmt: skip
    for args, kw in forms.values():
        kw = {"perm": None, "group_size": 0, **kw}
        torch.library.opcheck(
            torch.ops.vptq.gptq_gemv, (x.cuda(), *args, bias.cuda(), bits, kw["perm"],
                                       kw["group_size"]),
        )  # fmt: skip
    # the dequant kernel puts sorted rows back in the stored order
    for args, p in ((stored, None), (by_group, perm)):
        dense = torch.ops.vptq.gptq_dequant(*args, bits, 0, N_, p).cpu().double()
        assert (dense - w).abs().max() <= w.abs().max() * 2**-8


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_dequant_kernel_equals_the_reference_bit_for_bit(bits, dtype):
    # s * (q - z) is exact before its one rounding, so the kernel's slices equal
    # engine/formats/gptq.py dequant in the same dtype; the slices cover the 4-column threads
    # (n0, width multiples of 4) and the 1-column ones, act-order g_idx, a short last group
    K, N, G = 1088, 200, 128
    _, g_idx, q, z, scales = act_order_layer(K, N, G, bits, dtype, seed=bits + 10)
    args = [gptq.pack_rows(q, bits), z.to(torch.int32), scales, g_idx.to(torch.int32)]
    spec_ = GPTQSpec(K, N, bits, G, False, True)
    want = gptq.dequant(*args[:3], g_idx, spec_, dtype)
    w64 = scales.double()[g_idx] * (q - z[g_idx]).double()
    assert (want.double() - w64).abs().max() <= w64.abs().max() * 2**-8  # one rounding
    args = [t.cuda() for t in args]
    for n0, n1 in ((0, N), (4, 104), (196, 200), (3, 50), (0, 1)):
        got = torch.ops.vptq.gptq_dequant(*args, bits, n0, n1)
        assert got.shape == (K, n1 - n0) and got.dtype == dtype
        assert torch.equal(got.cpu(), want[:, n0:n1]), (n0, n1)
    torch.library.opcheck(torch.ops.vptq.gptq_dequant, (*args, bits, 4, 104))
    with pytest.raises(RuntimeError, match=re.escape("columns 150..201 are not within 0..200")):
        torch.ops.vptq.gptq_dequant(*args, bits, 150, 201)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_kernels")
def test_prefill_on_the_gpu_in_kernel_slices_matches_float64(tmp_path):
    # above GEMV_MAX_TOKENS the layer multiplies the kernel's slices of the dense weight
    from engine.gptq_linear import GEMV_MAX_TOKENS

    folder, hf = gptq_model(tmp_path, "qwen2", bits=3, group=32, desc_act=True, sym=False,
                            fmt="gptq")  # fmt: skip
    lm = load_model(folder, "cuda", torch.float16, max_seq_len=64)
    q = lm.model.model.layers[0].self_attn.q_proj  # with a bias
    assert q.g_idx.dtype == torch.int32 and q.kernel_layer_ok()
    w = hf.model.layers[0].self_attn.q_proj  # float64, the dequantized weights
    x = torch.randn(GEMV_MAX_TOKENS + 5, q.in_features, generator=torch.Generator().manual_seed(3))
    want = w(x.double())
    with torch.no_grad():
        whole = q(x.half().cuda())
        torch.testing.assert_close(whole.cpu().double(), want, atol=2e-2, rtol=1e-2)
        for step in (4, 8, 28):
            part = q.linear_in_slices(x.half().cuda(), q.bias.half(), step)
            torch.testing.assert_close(part, whole, atol=1e-3, rtol=1e-3)  # cuBLAS per shape


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_kernels")
@pytest.mark.parametrize("scheme", ["gptq-4bit-act", "gptq-3bit"])
def test_bench_e2e_builds_gptq_models_whose_graph_decode_is_eager(monkeypatch, scheme):
    # `bench e2e --scheme gptq-...`: random GPTQ layers of a real model's kind, act-order rows
    # sorted as a load sorts them; a 12-token prompt goes through the dequant kernel
    from engine import bench_e2e
    from engine.decode import GraphDecoder
    from engine.gptq_linear import GPTQLinear
    from engine.sampling import SamplingParams

    from .test_runtime import eager_tokens

    tiny = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                num_hidden_layers=2, num_key_value_heads=2, vocab_size=4096)  # fmt: skip
    monkeypatch.setitem(bench_e2e.ARCHS, "tiny-gptq", tiny)
    model = bench_e2e.build("tiny-gptq", scheme, context=256)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, GPTQLinear) and up.contiguous_groups
    assert (up.perm is not None) == scheme.endswith("-act")
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # clear-cut greedy choices from random weights
        p = SamplingParams(temperature=0)
        gen = torch.Generator(device="cuda").manual_seed(4)
        prompt = torch.randint(0, 4096, (1, 12), device="cuda", generator=gen)
        want = eager_tokens(model, prompt, p, seed=1, n=20)
        logits = model(prompt, 0, last_only=True)[0]
        seen = torch.zeros(4096, dtype=torch.bool, device="cuda")
        assert list(GraphDecoder(model).run(logits, 12, seen, p, seed=1, limit=20)) == want


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, -1), (2, 64)])
def test_the_memory_estimate_of_the_zero_points_is_what_a_load_holds(tmp_path, bits, group):
    # the Models window adds memory.gptq_zero_bytes to the files' size: the loaded layers'
    # int32 zero points less the packed qzeros they replace
    from engine.memory import Shape, gptq_zero_bytes

    folder, _ = gptq_model(tmp_path, bits=bits, group=group, desc_act=False, sym=False,
                           fmt="gptq_v2")  # fmt: skip
    cfg = json.loads((folder / "config.json").read_text())
    stored = load_file(str(folder / "model.safetensors"))
    packed = sum(t.numel() * 4 for n, t in stored.items() if n.endswith(".qzeros"))
    lm = load_model(folder, "cpu", torch.float32, max_seq_len=16)
    held = sum(m.zeros.numel() * 4 for m in lm.model.modules() if hasattr(m, "zeros"))
    assert gptq_zero_bytes(Shape.from_config(cfg), bits, group) == held - packed > 0
