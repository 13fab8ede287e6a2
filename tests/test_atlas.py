"""The cross-model atlas on hand-made tables whose answers are known, and a sweep of two tiny models end to end."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from headlab.atlas import agreement_tables, atlas_frame, count_table, depth_table, top_table
from headlab.cli import app
from headlab.scores import HeadScores


def scan(n_layers, n_heads, matrices: dict) -> tuple[dict, dict]:
    summary = {"geometry": {"n_layers": n_layers, "n_heads": n_heads}}
    return summary, {probe: HeadScores.from_matrix(np.array(m, dtype=float), {"probe": probe})
                     for probe, m in matrices.items()}


def test_atlas_tables_on_known_scores():
    # model a: 4 layers x 2 heads; retrieval peaks at L3H1 then L3H0 then L2H1; detectors is retrieval reversed
    retrieval = np.arange(8, dtype=float).reshape(4, 2) / 10  # 0.0 ... 0.7
    a = scan(4, 2, {"retrieval": retrieval, "detectors": -retrieval})
    b = scan(2, 3, {"retrieval": np.array([[0.5, 0.0, 0.0], [0.0, 0.05, 0.2]])})
    frame = atlas_frame({"a": a, "b": b})
    assert len(frame) == 8 + 8 + 6
    row = frame[(frame.model == "a") & (frame.probe == "retrieval") & (frame.name == "L3H1")].iloc[0]
    assert row["rank"] == 1 and row["relative_depth"] == 3 / 4 and row["top"] and row["above"]
    depth = depth_table(frame).set_index(["probe", "model"])
    assert depth.loc[("retrieval", "a"), "top_heads"] == 3  # at least 3 top heads
    assert depth.loc[("retrieval", "a"), "mean_depth"] == pytest.approx((3 / 4 + 3 / 4 + 2 / 4) / 3)
    assert depth.loc[("retrieval", "b"), "shallowest"] == 0.0  # L0H0 of the 2-layer model
    counts = count_table(frame).set_index(["probe", "model"])
    assert counts.loc[("retrieval", "a"), "above_threshold"] == 6  # 0.2 ... 0.7 are above the paper's 0.1
    assert counts.loc[("retrieval", "b"), "above_threshold"] == 2 and counts.loc[("retrieval", "b"), "heads"] == 6
    assert counts.loc[("detectors", "a"), "above_threshold"] == 0  # all scores <= 0, under 0.5
    agreement = agreement_tables(frame)["a"]
    assert agreement.loc["retrieval", "detectors"] == pytest.approx(-1.0)
    top = top_table(frame, k=2).set_index(["model", "probe"])
    assert top.loc[("a", "retrieval"), "top heads"] == "L3H1 (0.7), L3H0 (0.6)"


def test_sweep_of_two_tiny_models(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "tiny-llama", "tiny-gemma3", "--probes", "detectors,sinks,flow",
                                      "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    atlas = pd.read_csv(out / "atlas.csv")
    assert set(atlas["model"]) == {"tiny-llama", "tiny-gemma3"} and set(atlas["probe"]) == {"detectors", "sinks",
                                                                                             "flow"}
    assert len(atlas) == 3 * (2 * 4 + 3 * 4)
    llama = pd.read_csv(out / "tiny-llama" / "heads.csv")
    merged = atlas[(atlas.model == "tiny-llama") & (atlas.probe == "flow")].set_index("name")["score"]
    assert np.array_equal(merged.loc[llama["name"]].to_numpy(), llama["flow"].to_numpy())
    assert 'id="atlas-depth"' in (out / "atlas.html").read_text()
    overlaps = pd.read_csv(out / "roles.csv")  # each role against itself counts the heads heads.csv gives it
    for model in ("tiny-llama", "tiny-gemma3"):
        roles = pd.read_csv(out / model / "heads.csv")["roles"].fillna("").str.split()
        for role in {r for found in roles for r in found}:
            row = overlaps[(overlaps.model == model) & (overlaps.role == role) & (overlaps.also == role)]
            assert row["heads"].item() == sum(role in found for found in roles)
    assert len(overlaps)  # tiny-gemma3 has flow heads above the flow probe's line


def test_roles_column_and_role_overlaps_on_known_scores():
    from headlab.atlas import role_overlap_table
    from headlab.report import heads_table

    summary = {"geometry": {"n_layers": 2, "n_heads": 2}}
    retrieval = HeadScores.from_matrix(np.array([[0.5, 0.0], [0.2, 0.05]]),
                                       {"roles": {"retrieval": {"column": "score", "threshold": 0.1, "why": ""}}})
    induction = HeadScores.from_matrix(np.array([[0.9, 0.6], [0.1, 0.5]]),
                                       {"roles": {"induction": {"column": "score", "threshold": 0.5, "why": ""}}})
    results = {"retrieval": retrieval, "detectors": induction}
    assert heads_table(results)["roles"].tolist() == ["retrieval induction", "induction", "retrieval", ""]
    overlaps = role_overlap_table({"m": (summary, results)}).set_index(["role", "also"])
    assert overlaps.loc[("retrieval", "induction"), "both"] == 1 and overlaps.loc[("retrieval", "induction"),
                                                                                    "share"] == 0.5
    assert overlaps.loc[("induction", "induction"), "heads"] == 2  # 0.5 is not above its 0.5 line
