"""Confidence intervals of head scores: a seeded percentile bootstrap over the samples a probe averages over.

A probe's merge hands its per-sample values, in the order of a global sample index (the order merge reads its units
in), to `intervals`; the resampled indices come from a fixed seed, never from a unit or a shard, so a table's
intervals are the same however its units were split, scheduled or resumed.

    columns = {"score": per_text_score, "first_mass": per_text_first}        # each [samples, layers, heads]
    HeadScores.from_matrix(score, meta, **others, **intervals(columns))       # adds score_lo, score_hi, ...
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


def bootstrap_interval(
    values: Float[torch.Tensor, "samples *shape"] | np.ndarray,
    weights: Float[torch.Tensor, "samples"] | np.ndarray | None = None,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each of `shape` (fp64): the percentile bootstrap interval of the mean over samples, or with `weights`
    of sum(values) / sum(weights) (a ratio of sums: a mean over tokens of prompts of different lengths, a patching
    effect over prompt pairs). `resamples` draws of `samples` indices with replacement from Generator(seed); NaN
    where there is no sample."""
    values = np.asarray(torch.as_tensor(values).double().cpu())
    n = values.shape[0]
    shape = values.shape[1:]
    if n == 0:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)  # how often each sample is drawn
    totals = counts @ values.reshape(n, -1)  # [resamples, features]
    if weights is None:
        statistic = totals / n
    else:
        weights = np.asarray(torch.as_tensor(weights).double().cpu()).reshape(n)
        statistic = totals / (counts @ weights)[:, None]
    lo, hi = np.quantile(statistic, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo.reshape(shape), hi.reshape(shape)


def intervals(samples: dict[str, torch.Tensor | np.ndarray], weights=None, **options) -> dict[str, np.ndarray]:
    """{f"{column}_lo", f"{column}_hi"} for each column's per-sample values [samples, layers, heads] (the keyword
    columns HeadScores.from_matrix takes; `score` gives score_lo / score_hi). `weights`: one [samples] array for every
    column, or a dict of them by column."""
    out = {}
    for column, values in samples.items():
        w = weights.get(column) if isinstance(weights, dict) else weights
        out[f"{column}_lo"], out[f"{column}_hi"] = bootstrap_interval(values, w, **options)
    return out


def method(samples: str, n: int) -> dict:
    """What a table's meta records about its intervals (the report states it)."""
    return {"method": "percentile bootstrap", "resamples": RESAMPLES, "level": LEVEL, "seed": SEED,
            "samples": samples, "n": n}
