"""The decode-step breakdown of `bench e2e --breakdown` (engine/bench_step.py) takes each part
out of the model and puts every part back: a leftover would corrupt every later measurement."""

import torch

from engine import bench_step
from engine.loader import load_model
from engine.ops import decode as fused

from .hf_models import make_hf_model

# parts whose code the CPU forward runs (RoPE and attention are the GPU decode kernels')
ON_THE_CPU_PATH = {"norm", "silu", "qkv", "o", "gate_up", "down", "lm_head"}


def test_breakdown_takes_each_part_out_and_puts_it_back(tmp_path):
    make_hf_model("llama3", tmp_path)
    model = load_model(tmp_path, "cpu", torch.float32, max_seq_len=32).model
    assert model.lm_head is not None
    functions = {n: getattr(fused, n) for n in ("rope_kv", "attention", "rms_norm", "silu_mul")}
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(tokens)
        for label, parts in bench_step.PARTS.items():
            with bench_step.without(model, parts):
                got = model(tokens)
                assert got.shape == want.shape, label
                if ON_THE_CPU_PATH & set(parts):
                    assert not torch.equal(got, want), f"{label} was not taken out"
            assert torch.equal(model(tokens), want), f"{label} was not put back"
    assert all(getattr(fused, n) is f for n, f in functions.items())
    assert not [m for m in model.modules() if "forward" in vars(m)]


def test_stand_ins_take_partial_sums_without_adding_them():
    """In the GPU decode step a part's input may be a projection's partial sums: the stand-in
    passes on a tensor of the whole shape and dtype (no kernel), and a tensor as it is."""
    part = fused.Partial(torch.randn(17, 1, 1, 64), torch.float16)
    got = bench_step._stand_in(part)
    assert isinstance(got, torch.Tensor) and got.shape == (1, 1, 64) and got.dtype == torch.float16
    x = torch.randn(1, 1, 64)
    assert bench_step._stand_in(x) is x
    assert bench_step._empty(32)(x, defer=True).shape == (1, 1, 32)  # as VQLinear is called
