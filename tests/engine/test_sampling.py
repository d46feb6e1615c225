"""Sampling filters against hand-computed distributions, and seeded reproducibility."""

import json
from collections import Counter

import pytest
import torch

from engine.sampling import (
    SamplingParams,
    argmax,
    filter_probs,
    penalize,
    recommended_sampling,
    sample,
)

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def draw(p: SamplingParams, n=4000, seed=0, logits=LOGITS):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([sample(logits, p, gen) for _ in range(n)]).flatten()


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(
        sample(logits, SamplingParams(temperature=0), torch.Generator()), logits.argmax(-1)
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_two_stage_argmax_keeps_argmax_semantics(device):
    """Hand-placed maxima: the first of equal maxima wins within a row of the first stage and
    across rows, a NaN counts as the largest, leading dimensions are kept."""
    x = torch.zeros(4, 3, 1024)
    x[0, 0, 700] = x[0, 0, 300] = 5.0  # equal maxima in different rows of 128: 300
    x[0, 1, 131] = x[0, 1, 130] = 3.0  # equal maxima in one row: 130
    x[0, 2, 5], x[0, 2, 900] = 10.0, float("nan")  # NaN wins: 900
    x[1:] = torch.randn(3, 3, 1024)
    x[2, 1, 1023] = 100.0  # the last position
    x = x.to(device)
    got = argmax(x).cpu()
    assert got.shape == (4, 3)
    assert got[0].tolist() == [300, 130, 900]
    assert got[2, 1] == 1023
    assert torch.equal(got[1:], x[1:].argmax(-1).cpu())
    odd = torch.zeros(2, 1000, device=device)  # not a multiple of a row: one stage
    odd[0, 999] = 1.0
    odd[1, 500] = odd[1, 3] = 2.0
    assert argmax(odd).tolist() == [999, 3]


def test_unfiltered_sampling_follows_softmax():
    counts = torch.bincount(draw(SamplingParams(temperature=1.0)), minlength=5).double() / 4000
    want = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03], dtype=torch.float64)
    assert torch.allclose(counts, want, atol=0.03)


def kept_by(probs: list[float]):
    """Which of one row's tokens filter_probs keeps under the settings given."""
    row = torch.tensor([probs])
    return lambda **kw: (filter_probs(row, SamplingParams(**kw)) > 0).flatten().tolist()


def test_top_k_top_p_min_p_keep_exactly_the_right_tokens():
    kept = kept_by([0.5, 0.25, 0.15, 0.07, 0.03])
    assert kept(top_k=2) == [True, True, False, False, False]
    # top-p keeps the smallest prefix whose mass reaches p: 0.5 + 0.25 >= 0.7
    assert kept(top_p=0.7) == [True, True, False, False, False]
    assert kept(top_p=0.75) == [True, True, False, False, False]
    assert kept(top_p=0.76) == [True, True, True, False, False]
    # min-p keeps tokens with p >= min_p * p_max: 0.25 >= 0.3 * 0.5 but 0.07 < 0.15
    assert kept(min_p=0.3) == [True, True, True, False, False]
    assert set(draw(SamplingParams(temperature=1, top_k=2), n=500).tolist()) == {0, 1}


def kept_reference(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> list:
    """Which tokens the filters keep, by their definitions, in float64 token by token: top-k
    keeps a token unless k others are strictly more likely, top-p (below 1) where the tokens
    strictly more likely hold less than top_p of the mass."""
    out = []
    for row in probs.double().tolist():
        if min_p > 0:
            floor = min_p * max(row)
            row = [x if x >= floor else 0.0 for x in row]
        total, counts = sum(row), Counter(row)
        better_n, better_mass, n, mass = {}, {}, 0, 0.0  # per value: what is strictly above
        for x in sorted(set(row), reverse=True):
            better_n[x], better_mass[x] = n, mass
            same = counts[x]
            n, mass = n + same, mass + x * same
        out.append([
            x > 0
            and (top_k == 0 or better_n[x] < top_k)
            and (top_p >= 1 or better_mass[x] < top_p * total)
            for x in row
        ])  # fmt: skip
    return out


def test_tied_tokens_are_kept_or_dropped_together():
    """Hand-checked: 0.2 three times after 0.3. Top-k 2 and top-p 0.4 keep all four (as Hugging
    Face's top-k, and as the fused pick); top-p 0.3 only the first (0.3 of mass is above each
    0.2, not less than 0.3)."""
    kept = kept_by([0.3, 0.2, 0.2, 0.2, 0.1])
    assert kept(top_k=2) == [True, True, True, True, False]
    assert kept(top_k=1) == [True, False, False, False, False]
    assert kept(top_p=0.4) == [True, True, True, True, False]
    assert kept(top_p=0.3) == [True, False, False, False, False]
    assert kept(top_k=3, top_p=0.95) == [True, True, True, True, False]
    assert kept(top_k=4, top_p=0.95) == [True, True, True, True, False]  # 0.1 is fifth
    assert kept(top_p=0.95) == [True, True, True, True, True]  # 0.9 above 0.1


@pytest.mark.parametrize("spread", [8.0, 0.1, 0.0])  # a few likely tokens; nearly flat; ties
def test_the_filters_keep_what_their_definitions_keep_on_a_large_vocabulary(spread, monkeypatch):
    """On the CPU top-p looks at the 1024 most likely tokens first (engine/sampling.py
    _shortlist), and top-k takes the k most likely without sorting them all: both must keep
    exactly the tokens a plain reading of the definitions keeps."""
    from engine import sampling

    gen = torch.Generator().manual_seed(int(spread))
    if spread:
        probs = torch.softmax(torch.randn(3, 5000, generator=gen) * spread, -1)
    else:  # six values, each shared by hundreds of tokens, across the shortlist's end
        probs = torch.softmax(torch.randint(0, 6, (3, 5000), generator=gen).float(), -1)
    sorts = []
    sort = torch.Tensor.sort
    monkeypatch.setattr(
        torch.Tensor, "sort", lambda t, *a, **k: (sorts.append(1), sort(t, *a, **k))[1]
    )
    for top_k in (0, 20, 3000):
        for top_p in (1.0, 0.95, 0.5):
            for min_p in (0.0, 0.01):
                p = SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)
                got = (filter_probs(probs, p) > 0).tolist()
                assert got == kept_reference(probs, top_k, top_p, min_p), (top_k, top_p, min_p)
    # which way top-p went: the 1024 most likely where it drops one of them, else all sorted
    sorts.clear()
    filter_probs(probs, SamplingParams(top_p=0.95))
    assert len(sorts) == (0 if spread > 1 else 1)
    assert sampling.CPU_CANDIDATES == 1024


def test_temperature_sharpens():
    hot = (draw(SamplingParams(temperature=2.0)) == 0).double().mean()
    cold = (draw(SamplingParams(temperature=0.5)) == 0).double().mean()
    # p(0) at T=0.5 is 0.25/(0.25+0.0625+0.0225+0.0049+0.0009) = 0.7342
    assert cold == pytest.approx(0.7342, abs=0.03) and hot < 0.45


def test_repetition_penalty_formula():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 0.0])
    seen = torch.tensor([True, True, False, True, True])
    # a positive logit is divided (also below 1), a negative one multiplied, zero stays zero
    assert penalize(logits, seen, 2.0).tolist() == [1.0, -4.0, 1.0, 0.25, 0.0]


def test_sample_applies_the_repetition_penalty_to_the_tokens_seen():
    """Token 0 leads by a little; seen and penalised 1.5 it falls behind token 1 (2.0 / 1.5 <
    1.8), greedy and sampled alike; with penalty 1 (off) it stays first."""
    logits = torch.tensor([[2.0, 1.8, -1.0]])
    seen = torch.tensor([True, False, False])
    for temperature in (0.0, 0.05):
        off = SamplingParams(temperature=temperature, repetition_penalty=1.0)
        on = SamplingParams(temperature=temperature, repetition_penalty=1.5)
        gen = torch.Generator().manual_seed(0)
        assert int(sample(logits, off, gen, seen)) == 0
        assert int(sample(logits, on, gen, seen)) == 1


def test_same_seed_same_tokens():
    logits = torch.randn(1, 1000)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    a = [int(sample(logits, p, p.make_generator(torch.device("cpu")))) for _ in range(5)]
    b = [int(sample(logits, p, p.make_generator(torch.device("cpu")))) for _ in range(5)]
    assert a == b
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=43)
    c = [int(sample(logits, other, other.make_generator(torch.device("cpu")))) for _ in range(5)]
    assert c != a  # the seed really drives the draw (1 in ~10^12 to collide by chance)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("min_p", 1),
        ("max_new_tokens", 0),
        ("top_k", -1),
        # the wrong type: refused by name, not a TypeError from a comparison or a later tensor op
        ("temperature", "hot"),
        ("top_p", None),
        ("top_k", 2.5),
        ("max_new_tokens", True),
        ("seed", "42"),
        ("stop", "END"),  # a string, not a list of them: it stopped on every E, N or D
        ("stop", [""]),
        ("stop", ["END", 5]),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams.from_dict({field: value})


def test_the_limits_of_each_field_are_taken():
    """The edges each rule allows: greedy (temperature 0), one new token, top-p 1, min-p 0, a
    penalty just above 0; a penalty of 0 or below is refused (the other fields' refusals:
    test_bad_values_name_the_field)."""
    SamplingParams.from_dict({"temperature": 0, "max_new_tokens": 1, "top_p": 1, "min_p": 0,
                              "top_k": 0, "repetition_penalty": 1e-3})  # fmt: skip
    for field, value in (("repetition_penalty", 0), ("repetition_penalty", -1.0)):
        with pytest.raises(ValueError, match=f"'{field}'"):
            SamplingParams.from_dict({field: value})


def test_whole_numbers_and_floats_are_taken_where_they_belong():
    p = SamplingParams.from_dict({"temperature": 1, "top_p": 0.5, "top_k": 40, "seed": None,
                                  "stop": ["END"], "max_new_tokens": 8})  # fmt: skip
    assert (p.temperature, p.top_k, p.stop) == (1, 40, ["END"])


def test_the_protocol_names_every_sampling_field_the_engine_takes():
    # the app cleans its files by engine.protocol's table: it must be the engine's own fields
    from dataclasses import fields

    from engine.protocol import SAMPLING_FIELDS, sampling_type_error

    assert list(SAMPLING_FIELDS) == [f.name for f in fields(SamplingParams)]
    for f in fields(SamplingParams):  # and every default passes its own check
        default = f.default_factory() if f.name == "stop" else f.default
        assert sampling_type_error(f.name, default) is None


def test_unknown_field_refused():
    with pytest.raises(ValueError, match="unknown sampling field"):
        SamplingParams.from_dict({"temprature": 1})


def test_a_models_recommended_sampling_is_read_from_its_generation_config(tmp_path, caplog):
    path = tmp_path / "generation_config.json"
    assert recommended_sampling(tmp_path) == {}  # no file: nothing recommended
    qwen = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
            "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
            "max_length": 32768}  # fmt: skip
    path.write_text(json.dumps(qwen))
    assert recommended_sampling(tmp_path) == {
        "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20
    }  # fmt: skip
    path.write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))  # do_sample unsaid
    assert recommended_sampling(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
    path.write_text(json.dumps({"do_sample": False, "temperature": 0.6}))  # greedy: not for a chat
    assert recommended_sampling(tmp_path) == {}
    path.write_text(json.dumps({"temperature": "hot", "top_p": 1.5, "top_k": 2.5, "min_p": 0.1}))
    with caplog.at_level("WARNING"):
        assert recommended_sampling(tmp_path) == {"min_p": 0.1}  # what the engine takes
    said = caplog.text
    assert "'temperature' = 'hot'" in said and "'top_p' = 1.5" in said and "'top_k' = 2.5" in said
    assert str(path) in said
    caplog.clear()
    path.write_text("{not json")
    with caplog.at_level("WARNING"):
        assert recommended_sampling(tmp_path) == {}
    assert str(path) in caplog.text and "unreadable" in caplog.text
    path.write_text("[1, 2]")
    assert recommended_sampling(tmp_path) == {}
