"""The gradient rank allocation (GoRA's, qloraga/init/ranks.py) on hand-made importances, and its settings."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from qloraga.config import QLoraGAConfig, RunConfig
from qloraga.errors import ConfigError
from qloraga.init.ranks import (
    allocate_ranks,
    describe_allocation,
    module_type,
    sensitivity,
    spectral_importance,
)


def spent(ranks, features):
    return sum(ranks[n] * features[n] for n in ranks)


def test_hand_made_allocations():
    f = {n: 10 for n in "abcd"}
    # Equal importances and shapes: the uniform ranks.
    assert allocate_ranks(dict.fromkeys("abcd", 1.0), f, 4, 1, dict.fromkeys("abcd", 12)) == dict.fromkeys("abcd", 4)
    # Budget 16 ranks, two unused layers at the floor 1: 3c + c + 2 = 16, c = 3.5 -> 10.5, 3.5, 1, 1; floored
    # to 15, the last rank to the larger fractional part (a tie: the more important layer).
    ranks = allocate_ranks({"a": 3.0, "b": 1.0, "c": 0.0, "d": 0.0}, f, 4, 1, dict.fromkeys("abcd", 12))
    assert ranks == {"a": 11, "b": 3, "c": 1, "d": 1}
    # The dominant layer is capped at 8; the other three share the other 8 ranks: 2.67 each -> 3, 3, 2.
    ranks = allocate_ranks({"a": 100.0, "b": 1.0, "c": 1.0, "d": 1.0}, f, 4, 1, dict.fromkeys("abcd", 8))
    assert ranks == {"a": 8, "b": 3, "c": 3, "d": 2}


def test_rank_goes_as_importance_over_sqrt_features():
    """GoRA's Eq. 7: equal importance, layers of 4x the features get half the rank (away from the bounds)."""
    f = {"small": 100, "big": 400}
    ranks = allocate_ranks({"small": 1.0, "big": 1.0}, f, 10, 1, {"small": 100, "big": 100})
    # r_small = 2 r_big and 100 r_small + 400 r_big = 10 * 500 -> r_big = 25/3, r_small = 50/3; floored to 16 and
    # 8 (4800 of 5000), the 200 left round the small layer up (100), not the big one (its step is 400).
    assert ranks == {"small": 17, "big": 8} and spent(ranks, f) == 4900


@pytest.mark.parametrize("seed", range(20))
def test_budget_bounds_and_order_on_random_importances(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(rng.randint(2, 40))]
    features = {n: rng.choice([768, 1152, 2112, 4096 + 11008]) for n in names}
    importance = {n: rng.lognormvariate(0, 2) * rng.choice([0, 1, 1, 1]) for n in names}
    r, low = rng.choice([4, 8, 16]), rng.choice([1, 2, 4])
    high = {n: rng.choice([2 * r, 4 * r, 64]) for n in names}
    ranks = allocate_ranks(importance, features, r, low, high)
    budget = r * sum(features.values())
    gap = budget - spent(ranks, features)
    assert 0 <= gap < max(features.values())  # the uniform budget, short by less than one layer's rank step
    assert all(low <= ranks[n] <= high[n] for n in names)
    for a in names:  # more importance per sqrt(feature) never gets fewer ranks, unless a bound stops it
        for b in names:
            wa, wb = importance[a] / math.sqrt(features[a]), importance[b] / math.sqrt(features[b])
            if wa > wb and ranks[a] < ranks[b]:  # by one at most (rounding), or where a bound holds a back
                assert ranks[a] == ranks[b] - 1 or ranks[a] == high[a]


def test_unreachable_budget_is_a_config_error():
    f = {"a": 10, "b": 10}
    with pytest.raises(ConfigError, match="rank_min"):
        allocate_ranks({"a": 1.0, "b": 1.0}, f, 8, 1, {"a": 4, "b": 4})
    with pytest.raises(ConfigError, match="rank_max"):
        allocate_ranks({"a": 1.0, "b": 1.0}, f, 2, 4, {"a": 8, "b": 8})


def test_importances_against_numpy():
    g = torch.Generator().manual_seed(0)
    w, grad = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    assert sensitivity(w, grad) == pytest.approx(float(np.abs(w.double().numpy() * grad.double().numpy()).mean()),
                                                 rel=1e-6)
    s = torch.linalg.svdvals(grad.double())
    assert spectral_importance(torch.linalg.svdvals(grad), 5) == pytest.approx(float(s[:5].square().sum().sqrt()),
                                                                               rel=1e-5)


def test_summary_words():
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 6,
             "model.layers.0.mlp.down_proj": 20, "model.layers.1.mlp.down_proj": 10}
    assert module_type("model.layers.11.mlp.down_proj") == "mlp.down_proj"
    text = describe_allocation(ranks)
    assert "min 4, median 8, max 20" in text and text.index("mlp.down_proj 15.0") < text.index("self_attn.q_proj")


def test_settings():
    assert QLoraGAConfig(r=8).rank_bounds == (8, 8)
    assert QLoraGAConfig(r=8, rank_allocation="gradient").rank_bounds == (4, 32)
    assert QLoraGAConfig(r=1, rank_allocation="gradient").rank_bounds == (1, 4)
    assert QLoraGAConfig(r=8, rank_allocation="gradient", rank_min=2, rank_max=12).rank_bounds == (2, 12)
    with pytest.raises(ConfigError, match="rank_min"):
        QLoraGAConfig(r=8, rank_allocation="gradient", rank_min=9)
    with pytest.raises(ConfigError, match="rank_allocation"):
        QLoraGAConfig(rank_allocation="adaptive")
    with pytest.raises(ConfigError, match="--init lora does not compute"):
        RunConfig(init="lora", lora_ga=QLoraGAConfig(rank_allocation="gradient"))
    run = RunConfig(init="gora")
    assert run.lora_ga.method == "gora" and run.lr == 2e-4
