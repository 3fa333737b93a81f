"""Sampling filters and penalties on hand-made distributions."""

import pytest
import torch

from leanseek.infer import SamplingParams, apply_penalties, filter_logits, sample
from leanseek.infer.sampling import draw, probabilities

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


@pytest.mark.parametrize("kwargs, expected", [
    ({}, [0, 1, 2, 3]),
    ({"top_k": 2}, [0, 1]),
    ({"top_k": 1}, [0]),
    ({"top_p": 0.8}, [0, 1]),  # 0.5 + 0.3 reaches 0.8
    ({"top_p": 0.81}, [0, 1, 2]),
    ({"top_p": 0.1}, [0]),  # the most likely token always stays
    ({"min_p": 0.2}, [0, 1, 2]),  # threshold 0.2 x 0.5 = 0.1
    ({"min_p": 0.5}, [0, 1]),  # threshold 0.25
    ({"top_k": 3, "top_p": 0.84}, [0, 1]),  # after top-3: 0.526 + 0.316 = 0.842 reaches 0.84
    ({"top_k": 3, "top_p": 0.85}, [0, 1, 2]),
])
def test_filters(kwargs, expected):
    assert kept(filter_logits(LOGITS, **kwargs)) == expected


def test_filters_per_row():
    """A batch of rows, each with its own parameters, filters as each row alone would."""
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    out = filter_logits(logits, top_k=torch.tensor([2, 0, 0]), top_p=torch.tensor([1.0, 0.8, 1.0]),
                        min_p=torch.tensor([0.0, 0.0, 0.5]))
    assert [kept(row) for row in out] == [[0, 1], [2, 3], [0, 1]]


def test_draw_by_inverse_cdf():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    assert draw(probs, torch.tensor([0.0, 0.999])).tolist() == [1, 0]  # zero-probability tokens never come out
    assert draw(probs, torch.tensor([0.5, 0.0])).tolist() == [3, 0]
    greedy = probabilities(torch.tensor([[0.1, 3.0, 2.0]]), torch.tensor([0.0]), torch.tensor([0]),
                           torch.tensor([1.0]), torch.tensor([0.0]))
    assert greedy.tolist() == [[0.0, 1.0, 0.0]]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, torch.tensor([0, 1]), torch.zeros(4), params)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    counts = torch.tensor([0.0, 3.0, 1.0, 0.0])
    out = apply_penalties(logits, torch.tensor([], dtype=torch.long), counts,
                          SamplingParams(frequency_penalty=0.5, presence_penalty=1.0))
    assert out.tolist() == [2.0, -2.0 - 1.5 - 1.0, 1.0 - 0.5 - 1.0, 0.5]


def test_greedy_seeded_and_distribution():
    assert sample(torch.tensor([0.1, 3.0, 2.0]), SamplingParams()) == 1
    params = SamplingParams(temperature=1.0, seed=7)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(LOGITS, params, g) for _ in range(50)]

    assert draws(7) == draws(7) and draws(7) != draws(8)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(LOGITS, params, g) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, PROBS, atol=0.03)
    hot = [sample(LOGITS, SamplingParams(temperature=100.0), g) for _ in range(2000)]
    assert min(torch.bincount(torch.tensor(hot), minlength=4).tolist()) > 350  # nearly uniform


def test_bad_parameters_name_the_field():
    with pytest.raises(ValueError, match="top_p=1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingParams(temperature=-1)
