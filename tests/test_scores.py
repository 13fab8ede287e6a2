import json

import numpy as np
import pandas as pd
import pytest
import torch

from headlab import HeadScores, InputError, head_name, parse_head


def test_head_names_round_trip():
    assert head_name(12, 3) == "L12H3"
    assert parse_head("L12H3") == (12, 3)
    assert parse_head((4, 0)) == (4, 0)
    with pytest.raises(InputError, match="L12H3"):
        parse_head("12.3")
    with pytest.raises(InputError):
        parse_head(7)


def test_from_matrix_rows_top_and_matrix():
    score = torch.arange(12.0).reshape(3, 4)
    extra = -score
    scores = HeadScores.from_matrix(score, {"probe": "p", "model": "m"}, extra=extra)
    frame = scores.to_frame()
    assert list(frame.columns) == ["layer", "head", "name", "score", "extra"]
    assert len(frame) == 12 and frame.loc[7, "name"] == "L1H3" and frame.loc[7, "score"] == 7.0
    assert scores.top(2)["name"].tolist() == ["L2H3", "L2H2"]
    assert scores.top(1, by="extra")["name"].tolist() == ["L0H0"]
    assert scores.heads(1) == [(2, 3)]
    np.testing.assert_array_equal(scores.matrix(), score.numpy())
    with pytest.raises(InputError, match="no column"):
        scores.top(1, by="nope")


def test_figure_is_a_layer_by_head_heatmap():
    score = np.random.default_rng(0).random((5, 3))
    fig = HeadScores.from_matrix(score, {"probe": "p", "model": "m"}).figure()
    heatmap = fig.data[0]
    assert heatmap.type == "heatmap"
    np.testing.assert_allclose(np.array(heatmap.z), score)
    assert heatmap.text[4][2] == "L4H2"


def test_save_and_load(tmp_path):
    scores = HeadScores.from_matrix(torch.rand(2, 3), {"probe": "p", "seed": 3})
    scores.save(tmp_path / "p")
    again = HeadScores.load(tmp_path / "p")
    pd.testing.assert_frame_equal(again.frame, scores.frame)
    assert again.meta == {"probe": "p", "seed": 3}
    assert json.loads((tmp_path / "p.json").read_text())["seed"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_bad_frames_are_rejected():
    with pytest.raises(InputError, match="score"):
        HeadScores(pd.DataFrame({"layer": [0], "head": [0]}))
    with pytest.raises(InputError, match="matrix"):
        HeadScores.from_matrix(torch.zeros(3))
