"""Per-layer ranks from the gradient (GoRA's allocation, docs/ALGORITHM.md section 8): pure math, no model.

GoRA (He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation", NeurIPS 2025, arXiv 2502.12171) scores
each layer by its sensitivity `mean |W * G|` (its Eq. 5), normalises the scores to shares `a_i` (Eq. 6) and
gives layer i the rank `a_i B / sqrt(m_i + n_i)` of a budget `B` (Eq. 7), clamped to `[r_min, r_max]`. Here the
same shape (rank proportional to `a_i / sqrt(m_i + n_i)`, clamped) is scaled so that the trainable parameters
`sum r_i (m_i + n_i)` equal the uniform run's `r sum (m_i + n_i)` to within one layer's rank step, instead of
the paper's rounding, which lands near the budget but not on it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch

from qloraga.errors import ConfigError


def sensitivity(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """GoRA's importance of a layer (its Eq. 5): the mean of `|W * G|` over the weight's entries, in fp32."""
    return float((weight.float() * grad.float()).abs().mean())


def spectral_importance(singular_values: torch.Tensor, r: int) -> float:
    """The alternative importance: `||G_r||_F`, the norm of the gradient's best rank-r part (the size of the
    largest step a rank-r adapter can take in that layer), from its singular values."""
    return float(singular_values[:r].float().square().sum().sqrt())


def rank_cap(layer, config) -> int:
    """The largest rank a layer (`out_features`, `in_features`) may get under `config` (a `QLoraGAConfig`): its
    `rank_max` (r when uniform), within the directions its dimensions hold (2r of them for LoRA-GA)."""
    room = min(layer.out_features, layer.in_features)
    return min(config.rank_bounds[1], room // 2 if config.method == "lora-ga" else room)


def allocate_ranks(importance: dict[str, float], features: dict[str, int], r: int, low: int,
                   high: dict[str, int]) -> dict[str, int]:
    """Integer ranks in `[low, high[name]]` with rank proportional to `importance / sqrt(features)` (GoRA's
    Eq. 7), whose parameters `sum rank * features` (`features` = in + out of each layer) are the uniform
    rank r's `r sum features`, or short of it by less than one layer's rank step.

    The continuous ranks `clamp(c w_i, low, high_i)` are fitted to the budget by bisection on `c`, floored,
    and rounded up where the remainder still pays for it, largest fractional parts first."""
    names = list(importance)
    budget = r * sum(features[n] for n in names)
    if sum(low * features[n] for n in names) > budget or sum(high[n] * features[n] for n in names) < budget:
        raise ConfigError(f"No ranks in [{low}, {min(high.values())}..{max(high.values())}] hold the budget of "
                          f"rank {r} on every layer: widen lora_ga.rank_min / lora_ga.rank_max around r.")
    if any(not math.isfinite(v) or v < 0 for v in importance.values()):
        raise ValueError(f"Importances must be finite and non-negative, got {importance}.")
    total = sum(importance.values())
    # A layer of no importance grows only once every other one is at its bound (its share is 1e-12, not 0).
    weights = {n: max(importance[n] / total if total > 0 else 1.0, 1e-12) / math.sqrt(features[n]) for n in names}

    def ranks_at(c: float) -> dict[str, float]:
        return {n: min(max(c * weights[n], low), high[n]) for n in names}

    def spent(ranks: dict[str, float]) -> float:
        return sum(ranks[n] * features[n] for n in names)

    lo_c, hi_c = 0.0, 1.0
    while spent(ranks_at(hi_c)) < budget and hi_c < 1e300:
        hi_c *= 2
    for _ in range(200):
        mid = (lo_c + hi_c) / 2
        lo_c, hi_c = (mid, hi_c) if spent(ranks_at(mid)) < budget else (lo_c, mid)
    target = ranks_at(hi_c)
    ranks = {n: min(max(math.floor(target[n] + 1e-9), low), high[n]) for n in names}
    left = budget - spent(ranks)
    # One more rank to the largest fractional parts first, where it still fits: every rank stays within one
    # of its continuous target (so the order of the importances holds), and what is left unspent is less than
    # the rank step of a layer that was not rounded up.
    for name in sorted(names, key=lambda n: (target[n] - ranks[n], weights[n]), reverse=True):
        if target[name] - ranks[name] > 1e-9 and ranks[name] < high[name] and features[name] <= left:
            ranks[name] += 1
            left -= features[name]
    return ranks


def module_type(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`: the layer's kind, the same in every block."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return ".".join(parts[-2:])


def describe_allocation(ranks: dict[str, int]) -> str:
    """The summary line's words: min / median / max rank and the module types with the most rank on average."""
    values = sorted(ranks.values())
    by_type: dict[str, list[int]] = defaultdict(list)
    for name, rank in ranks.items():
        by_type[module_type(name)].append(rank)
    means = sorted(((statistics.fmean(v), t) for t, v in by_type.items()), reverse=True)
    top = ", ".join(f"{t} {m:.1f}" for m, t in means[:2])
    return (f"ranks from the gradient: min {values[0]}, median {statistics.median(values):g}, max {values[-1]}; "
            f"most (mean rank) to {top}")
