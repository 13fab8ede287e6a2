"""Confidence intervals of head scores: the bootstrap against its definition, exact under shuffled shards, shrinking
as a planted head's samples grow, and in heads.csv and HeadScores.top()."""

import random

import numpy as np
import pandas as pd
import pytest
import torch
from headlab.probes import get_probe
from typer.testing import CliRunner

import headlab
from headlab.cli import app
from headlab.engines.local import run_local, run_units
from headlab.engines.scheduler import merge
from headlab.scores import HeadScores
from headlab.uncertainty import bootstrap_interval


def planted(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 2, 3] samples: head L1H2 scores 0.8 with noise (sd 0.1), the others 0.1 (sd 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    values = 0.1 + 0.1 * torch.randn(n, 2, 3, generator=generator, dtype=torch.float64)
    values[:, 1, 2] += 0.7
    return values


def test_the_interval_is_the_percentiles_of_resampled_means():
    values = planted(12)
    lo, hi = bootstrap_interval(values, resamples=200, seed=3)
    draws = np.random.default_rng(3).integers(0, 12, size=(200, 12))
    means = np.stack([values.numpy()[d].mean(0) for d in draws])  # the definition, one resample at a time
    # np.quantile of the same 200 numbers; the sums differ from counts @ values only in rounding order (1e-15)
    assert np.allclose(lo, np.quantile(means, 0.025, axis=0), atol=1e-12, rtol=0)
    assert np.allclose(hi, np.quantile(means, 0.975, axis=0), atol=1e-12, rtol=0)
    weights = torch.arange(1, 13, dtype=torch.float64)
    lo, hi = bootstrap_interval(values * weights[:, None, None], weights, resamples=200, seed=3)
    ratios = np.stack([(values.numpy() * weights.numpy()[:, None, None])[d].sum(0) / weights.numpy()[d].sum()
                       for d in draws])
    assert np.allclose(lo, np.quantile(ratios, 0.025, axis=0), atol=1e-12, rtol=0)
    assert (lo <= hi).all() and np.isnan(bootstrap_interval(values[:0])[0]).all()


def test_resampling_follows_the_sample_index_not_the_order_units_arrive_in():
    values = planted(16)
    once = bootstrap_interval(values)
    assert all(np.array_equal(a, b) for a, b in zip(once, bootstrap_interval(values.clone())))
    # a wrong variant: the samples in the order shards happened to finish gives another interval
    shuffled = values[torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    assert not np.array_equal(bootstrap_interval(shuffled)[0], once[0])


def test_intervals_shrink_as_a_planted_heads_samples_grow():
    widths = {}
    for n in (8, 32, 128):
        values = planted(n, seed=n)
        values[:, 1, 2] = 0.8 + 0.1 * torch.tensor([(-1) ** i for i in range(n)])  # sd exactly 0.1 at every n
        lo, hi = bootstrap_interval(values)
        widths[n] = hi[1, 2] - lo[1, 2]
        assert lo[1, 2] > 0.6 and hi[1, 2] < 1.0 and lo[1, 2] > hi[0, 0]  # the planted head stands apart
        assert abs(widths[n] - 2 * 1.96 * 0.1 / np.sqrt(n)) < 0.25 * widths[n]  # the normal interval's width
    # the width of a mean's interval goes as 1 / sqrt(n): four times the samples halve it; 0.4 to 0.6 is the
    # bootstrap's own noise with 1,000 resamples (a few percent) and the discreteness of n = 8
    assert 0.4 < widths[32] / widths[8] < 0.6 and 0.4 < widths[128] / widths[32] < 0.6


@pytest.mark.parametrize("probe_name,model_name,overrides", [
    ("detectors", "tiny-llama", {"seq_len": 6, "n_prompts": 5, "batch_size": 2}),
    ("sinks", "tiny-gemma3", {"n_texts": 4, "n_tokens": 40, "min_queries": 4}),
    ("patching", "tiny-llama", {"task": {"name": "tiny pairs", "clean": [[0, 70, 71, 72, 73, 74], [0, 60, 61, 62, 63, 64]],
                                          "corrupted": [[0, 70, 75, 72, 73, 74], [0, 60, 65, 62, 63, 64]],
                                          "answer": [80, 90], "wrong": [81, 91]}, "layers_per_unit": 1}),
])
def test_intervals_are_identical_under_three_shuffled_shards(probe_name, model_name, overrides, tmp_path):
    model, probe = headlab.load_model(model_name), get_probe(probe_name)
    params = probe.params(**overrides)
    whole = run_local(probe, model, params, progress=False)
    bounds = [c for c in whole.frame.columns if c.endswith(("_lo", "_hi"))]
    scores = [c for c in whole.frame.columns if c not in ("layer", "head", "name") and not c.endswith(("_lo", "_hi"))]
    assert {f"{c}_lo" for c in scores if c not in ("tokens", "n_counted")} <= set(bounds)
    for seed in range(3):
        units = probe.plan(model, params)
        random.Random(seed).shuffle(units)
        partials = {}
        for i in range(3):
            partials.update(run_units(probe, model, params, units[i::3], journal=tmp_path / f"{seed}-{i}.jsonl",
                                      progress=False))
        merged = merge(probe, model, params, partials)
        assert merged.frame[bounds].equals(whole.frame[bounds])
    finite = whole.frame[[c for c in bounds if c.startswith("score")]].dropna()
    assert (finite["score_lo"] <= finite["score_hi"]).all()


def test_a_sinks_interval_shrinks_with_more_texts():
    model, probe = headlab.load_model("tiny-gemma3"), get_probe("sinks")
    width = {n: run_local(probe, model, probe.params(n_texts=n, n_tokens=40, min_queries=4), progress=False).frame
             for n in (4, 24)}
    narrower = (width[24]["first_mass_hi"] - width[24]["first_mass_lo"]) < (width[4]["first_mass_hi"]
                                                                            - width[4]["first_mass_lo"])
    assert narrower.mean() > 0.8  # every head's width falls as 1/sqrt(n) in expectation; a few may not in one draw


def test_top_flags_heads_whose_intervals_overlap_the_next():
    frame = pd.DataFrame({"layer": [0, 0, 0], "head": [0, 1, 2], "score": [0.9, 0.85, 0.2],
                          "score_lo": [0.8, 0.7, 0.1], "score_hi": [0.95, 0.9, 0.3]})
    top = HeadScores(frame).top(3)
    assert top["name"].tolist() == ["L0H0", "L0H1", "L0H2"]
    assert top["overlaps_next"].tolist() == [True, False, False]


def test_heads_csv_has_lo_and_hi_beside_every_score_column(tmp_path):
    out = tmp_path / "scan"
    result = CliRunner().invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    heads = pd.read_csv(out / "heads.csv")
    for column in ("detectors", "detectors_previous_token", "detectors_duplicate_token", "flow"):
        assert {f"{column}_lo", f"{column}_hi"} <= set(heads.columns)
        assert ((heads[f"{column}_lo"] <= heads[column] + 1e-6) & (heads[column] <= heads[f"{column}_hi"] + 1e-6)).all()
    assert "detectors_induction_lo" not in heads.columns  # induction is the score: its interval is detectors_lo
