"""Sampling filters against hand-computed distributions, and seeded reproducibility."""

import pytest
import torch

from engine.sampling import SamplingParams, filter_probs, penalize, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def draw(p: SamplingParams, n=4000, seed=0, logits=LOGITS):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([sample(logits, p, gen) for _ in range(n)]).flatten()


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(
        sample(logits, SamplingParams(temperature=0), torch.Generator()), logits.argmax(-1)
    )


def test_unfiltered_sampling_follows_softmax():
    counts = torch.bincount(draw(SamplingParams(temperature=1.0)), minlength=5).double() / 4000
    want = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03], dtype=torch.float64)
    assert torch.allclose(counts, want, atol=0.03)


def test_top_k_top_p_min_p_keep_exactly_the_right_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    kept = lambda **kw: (filter_probs(probs, SamplingParams(**kw)) > 0).flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False, False]
    # top-p keeps the smallest prefix whose mass reaches p: 0.5 + 0.25 >= 0.7
    assert kept(top_p=0.7) == [True, True, False, False, False]
    assert kept(top_p=0.75) == [True, True, False, False, False]
    assert kept(top_p=0.76) == [True, True, True, False, False]
    # min-p keeps tokens with p >= min_p * p_max: 0.25 >= 0.3 * 0.5 but 0.07 < 0.15
    assert kept(min_p=0.3) == [True, True, True, False, False]
    assert set(draw(SamplingParams(temperature=1, top_k=2), n=500).tolist()) == {0, 1}


def test_temperature_sharpens():
    hot = (draw(SamplingParams(temperature=2.0)) == 0).double().mean()
    cold = (draw(SamplingParams(temperature=0.5)) == 0).double().mean()
    # p(0) at T=0.5 is 0.25/(0.25+0.0625+0.0225+0.0049+0.0009) = 0.7342
    assert cold == pytest.approx(0.7342, abs=0.03) and hot < 0.45


def test_repetition_penalty_formula():
    logits = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False])
    assert penalize(logits, seen, 2.0).tolist() == [1.0, -4.0, 1.0]


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
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams.from_dict({field: value})


def test_unknown_field_refused():
    with pytest.raises(ValueError, match="unknown sampling field"):
        SamplingParams.from_dict({"temprature": 1})
