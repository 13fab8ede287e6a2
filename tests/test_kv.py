"""headlab.kv: policies, real eviction (cache + attention function), accounting, interchange, evaluation, CLI."""

import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import DynamicCache

import headlab
from headlab import kv
from headlab.attention import Splitter
from headlab.errors import InputError
from headlab.kv import evaluate as ev
from headlab.kv import far, interchange


def _plain_logits(model, ids, tokens):
    cache = DynamicCache(config=model.hf.config)
    with torch.no_grad():
        out = [model.hf(input_ids=ids, cache=cache, use_cache=True).logits]
        for t in tokens:
            out.append(model.hf(input_ids=t.view(1, 1), cache=cache, use_cache=True).logits)
    return out


def _policy_logits(model, ids, tokens, policy):
    cache = kv.PolicyCache(model, policy)
    with torch.no_grad(), kv.applying(model, cache):
        cache.feed(ids)
        out = [model.hf(input_ids=ids, cache=cache, use_cache=True).logits]
        for t in tokens:
            cache.feed(t)
            out.append(model.hf(input_ids=t.view(1, 1), cache=cache, use_cache=True).logits)
    return out, cache


def _entry_bytes(model):
    return 2 * model.d_head * torch.finfo(model.dtype).bits // 8


def _head_mask(model, policy, n, prompt=None):
    """[1, heads, n, n] per-head visibility: full heads causal, streaming heads sinks + window. With `prompt`, the
    first `prompt` queries are exact (an exact prefill, then eviction)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    causal = j <= i
    lam = causal & ((j < policy.sink) | (i - j < policy.window))
    if prompt is not None:
        lam[:prompt] = causal[:prompt]
        lam[prompt:, :] &= (j < policy.sink) | (j > prompt - 1 - policy.window) | (j >= prompt)
        lam &= causal
    keep = policy.full_matrix(model)[0]  # the tests' policies are the same in every layer
    group = model.n_heads // model.n_kv_heads
    return torch.stack([causal if keep[h // group] else lam for h in range(model.n_heads)])[None]


# ---- exactness ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_full_policy_equals_plain_model(name):
    model = headlab.load_model(name)
    torch.manual_seed(0)
    ids, tokens = torch.randint(4, 200, (1, 40)), torch.randint(4, 200, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = _policy_logits(model, ids, tokens, kv.full())
    ref = _plain_logits(model, ids, tokens)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("chunk", [None, 16])
def test_streaming_heads_match_a_per_head_mask(tiny_llama, chunk):
    model = tiny_llama
    torch.manual_seed(1)
    ids = torch.randint(4, 200, (1, 70))
    policy = kv.from_heads(model, [(0, 1), (1, 1)], sink=3, window=10)
    with torch.no_grad():
        ref = model.hf(input_ids=ids, attention_mask=_head_mask(model, policy, 70)).logits[0]
    cache = kv.prefill(model, ids[0, :-5], policy, chunk=chunk)
    got = torch.stack([kv.step(model, cache, t) for t in ids[0, -5:]])
    torch.testing.assert_close(got, ref[-5:], rtol=1e-4, atol=1e-4)
    assert cache.kept_tokens().tolist() == [[13, 70], [13, 70]]


def test_exact_prefill_then_eviction_matches_its_mask(tiny_llama):
    model = tiny_llama
    torch.manual_seed(2)
    ids = torch.randint(4, 200, (1, 60))
    policy = kv.from_heads(model, [(0, 0), (1, 0)], sink=2, window=8)
    with torch.no_grad():
        ref = model.hf(input_ids=ids, attention_mask=_head_mask(model, policy, 60, prompt=55)).logits[0]
    cache = kv.prefill(model, ids[0, :55], policy, mode="full")
    got = torch.stack([kv.step(model, cache, t) for t in ids[0, 55:]])
    torch.testing.assert_close(got[:-1], ref[55:-1], rtol=1e-4, atol=1e-4)


# ---- memory -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_cache_bytes_equal_the_analytic_count(name):
    model = headlab.load_model(name)
    ids = torch.randint(4, 200, (90,))
    longs = kv.long_layers(model)
    policies = [kv.full(), kv.streaming(4, 16), kv.from_heads(model, [(longs[-1], 0)], sink=2, window=5)]
    for policy in policies:
        for mode in ("stream", "full"):
            cache = kv.prefill(model, ids, policy, mode=mode)
            for t in range(3):
                kv.step(model, cache, 10 + t)
            analytic = policy.kept_tokens(model, 90, 3)
            assert cache.kept_tokens().tolist() == analytic.tolist(), (policy.name, mode)
            assert cache.kv_bytes() == analytic.sum() * _entry_bytes(model)
    assert kv.streaming(4, 16).kv_fraction(model, 90, 3) < 1 == kv.full().kv_fraction(model, 90, 3)


def test_budget_policy_keeps_its_budget_and_the_observation_window(tiny_llama):
    model = tiny_llama
    scores = headlab.HeadScores.from_matrix(np.array([[0.0, 0.1, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0]]),
                                            {"probe": "made-up"})
    policy = kv.budget(model, scores, total=12, floor=4, observe=8)
    assert sum(t for _, _, t in policy.budgets) == pytest.approx(12 * 4, abs=2)
    with pytest.raises(InputError, match="exact prefill"):
        kv.prefill(model, torch.randint(4, 200, (80,)), policy)
    cache = kv.prefill(model, torch.randint(4, 200, (80,)), policy, mode="full")
    kv.step(model, cache, 7)
    assert cache.kept_tokens().tolist() == policy.kept_tokens(model, 80, 1).tolist()


def test_pinned_sink_tokens_are_kept(tiny_llama):
    model = tiny_llama
    the = 50
    ids = torch.randint(60, 200, (100,))
    ids[[10, 20, 30, 40]] = the
    policy = kv.streaming(2, 8, sink_tokens=[the], pinned=3)
    cache = kv.prefill(model, ids, policy)
    stream = cache.layers[0].streams[0]
    assert stream.pos.tolist() == [0, 1, 10, 20, 30] + list(range(92, 100))
    assert cache.kept_tokens()[0, 0] <= policy.kept_tokens(model, 100)[0, 0]


# ---- planted induction --------------------------------------------------------------------------------------

def _copy_accuracy(model, policy, n=100, seed=0):
    """Teacher-forced accuracy of predicting the second copy of a random sequence of distinct tokens (BOS, x, x)."""
    generator = torch.Generator().manual_seed(seed)
    half = torch.randperm(190, generator=generator)[:n] + 10
    ids = torch.cat([torch.tensor([0]), half, half])[None]
    cache = kv.PolicyCache(model, policy)
    with torch.no_grad(), kv.applying(model, cache):
        cache.feed(ids)
        logits = model.hf(input_ids=ids, cache=cache, use_cache=True).logits[0]
    predicted = logits[n + 1:-1].argmax(-1)  # after x_k of the second copy, the model should say x_{k+1}
    return float((predicted == ids[0, n + 2:]).float().mean())


def test_planted_induction_head_full_preserves_long_range_copying():
    from planted import INDUCTION_HEAD, induction_model

    model = induction_model()
    assert _copy_accuracy(model, kv.full()) > 0.9
    keep = kv.from_heads(model, [INDUCTION_HEAD], sink=4, window=16)
    assert _copy_accuracy(model, keep) > 0.9
    assert _copy_accuracy(model, kv.streaming(4, 16)) < 0.2
    others = kv.from_heads(model, [h for h in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 3)]], sink=4, window=16)
    assert _copy_accuracy(model, others) < 0.2


def test_random_control_never_picks_an_excluded_head():
    from planted import INDUCTION_HEAD, induction_model

    model = induction_model()
    for seed in range(25):
        policy = kv.random(model, 0.5, seed=seed, exclude=[INDUCTION_HEAD])
        assert INDUCTION_HEAD not in policy.full_heads
        assert len(policy.full_heads) == 4
    assert kv.random(model, 0.5, seed=3).full_heads == kv.random(model, 0.5, seed=3).full_heads


# ---- policies -----------------------------------------------------------------------------------------------

def test_from_scores_ranks_kv_groups_by_max_or_mean(tiny_llama):
    model = tiny_llama  # 2 layers x 4 query heads, 2 KV heads: query heads (0, 1) -> KV 0, (2, 3) -> KV 1
    matrix = np.array([[0.9, 0.0, 0.4, 0.4], [0.1, 0.1, 0.2, 0.0]])
    scores = headlab.HeadScores.from_matrix(matrix, {"probe": "made-up"})
    assert kv.from_scores(model, scores, 0.25).full_heads == {(0, 0)}
    assert kv.from_scores(model, scores, 0.25, aggregate="mean").full_heads == {(0, 0)}
    assert kv.from_scores(model, scores, 0.5, aggregate="mean").full_heads == {(0, 0), (0, 1)}
    matrix[0, 1] = -0.6  # mean of KV 0 drops below KV 1, max does not
    scores = headlab.HeadScores.from_matrix(matrix, {"probe": "made-up"})
    assert kv.from_scores(model, scores, 0.25, aggregate="mean").full_heads == {(0, 1)}
    assert kv.from_scores(model, scores, 0.25).full_heads == {(0, 0)}
    assert len(kv.random(model, 0.5, seed=1).full_heads) == len(kv.from_scores(model, scores, 0.5).full_heads)


def test_razor_keeps_induction_and_echo_heads(tiny_llama):
    model = tiny_llama
    induction = np.zeros((2, 4))
    induction[1, 3] = 0.8
    duplicate = np.zeros((2, 4))
    duplicate[0, 0] = 0.5
    scores = headlab.HeadScores.from_matrix(induction, {"probe": "detectors"}, induction=induction,
                                            duplicate_token=duplicate)
    assert kv.razor(model, scores).full_heads == {(1, 1), (0, 0)}
    assert kv.razor(model, scores, 0.25).full_heads == {(1, 1)}


def test_gemma3_policies_act_on_global_layers_only(tiny_gemma3):
    model = tiny_gemma3  # layers 0-1 slide (window 8), layer 2 is global
    assert kv.long_layers(model) == [2]
    assert kv.from_heads(model, [(2, 0)]).n_full(model) == 1
    with pytest.raises(InputError, match="sliding-window layer"):
        kv.from_heads(model, [(0, 0)])
    kept = kv.streaming(2, 4).kept_tokens(model, 50)
    assert kept.tolist() == [[7], [7], [6]]


def test_bad_input(tiny_llama):
    model = tiny_llama
    scores = headlab.HeadScores.from_matrix(np.zeros((3, 4)), {"probe": "made-up"})
    with pytest.raises(InputError, match="another model"):
        kv.from_scores(model, scores, 0.5)
    ok = headlab.HeadScores.from_matrix(np.zeros((2, 4)))
    with pytest.raises(InputError, match="fraction"):
        kv.from_scores(model, ok, 1.5)
    with pytest.raises(InputError, match="no column"):
        kv.from_scores(model, ok, 0.5, column="nope")
    with pytest.raises(InputError, match="aggregate"):
        kv.from_scores(model, ok, 0.5, aggregate="median")
    with pytest.raises(InputError, match="outside"):
        kv.from_heads(model, [(5, 0)])
    with pytest.raises(InputError, match="window"):
        kv.streaming(4, 0)
    with pytest.raises(InputError, match="prefill mode"):
        kv.prefill(model, torch.arange(4, 20), kv.full(), mode="lazy")
    cache = kv.prefill(model, torch.arange(4, 20), kv.streaming(2, 4))
    with pytest.raises(InputError, match="full policy"):
        cache.evict(kv.streaming(2, 4))
    with pytest.raises(InputError, match="razor needs"):
        kv.razor(model, ok)
    with pytest.raises(InputError, match="unique"):
        ev.evaluate_tests(model, [kv.full(), kv.full()], ev.heldout_task(lengths=(128,)))


# ---- interchange --------------------------------------------------------------------------------------------

def test_duo_pattern_round_trip(tiny_llama, tmp_path):
    model = tiny_llama
    policy = kv.from_heads(model, [(0, 1), (1, 0)], sink=8, window=64)
    interchange.export_duo(model, policy, tmp_path / "pattern")
    back = interchange.import_duo(model, tmp_path / "pattern")
    assert back.full_heads == policy.full_heads and (back.sink, back.window) == (8, 64)


def test_a_duoattention_file_loads_into_the_same_policy(tiny_llama, tmp_path):
    model = tiny_llama
    folder = tmp_path / "duo"
    folder.mkdir()
    values = np.array([[0.93, 0.02], [0.4, 1.3]])  # DuoAttention writes np.savetxt floats, clips on load
    np.savetxt(folder / "full_attention_heads.tsv", values, delimiter="\t")
    (folder / "config.json").write_text(json.dumps({"sink_size": 64, "recent_size": 256}))
    policy = interchange.import_duo(model, folder)
    assert policy.full_heads == {(0, 0), (1, 1)} and (policy.sink, policy.window) == (64, 256)
    assert interchange.import_duo(model, folder, fraction=0.75).full_heads == {(0, 0), (1, 1), (1, 0)}
    graded = interchange.export_duo(model, values=np.clip(values, 0, 1), folder=tmp_path / "graded")
    assert np.allclose(interchange.read_duo(graded)[0], np.clip(values, 0, 1))
    (folder / "full_attention_heads.tsv").write_text("1\t0\t1\n")
    with pytest.raises(InputError, match="pattern"):
        interchange.import_duo(model, folder)


def test_retrieval_head_json_round_trip(tmp_path):
    scores = headlab.HeadScores.from_matrix(np.array([[0.0, 0.5], [0.25, 1.0]]), {"probe": "retrieval"})
    path = interchange.export_retrieval_head(scores, tmp_path / "heads.json")
    assert json.loads(path.read_text())["1-1"] == [1.0]
    back = interchange.import_retrieval_head(path)
    assert np.allclose(back.matrix(), scores.matrix())
    (tmp_path / "ref.json").write_text(json.dumps({"0-0": [0.0, 1.0], "0-1": [0.5, 0.5, 0.5], "1-0": [], "1-1": [0.2]}))
    imported = interchange.import_retrieval_head(tmp_path / "ref.json")
    assert imported.matrix().tolist() == [[0.5, 0.5], [0.0, 0.2]]
    results = tmp_path / "retrieval.tests.jsonl"
    results.write_text("\n".join([json.dumps({"fingerprint": {}}),
                                  json.dumps({"recall": 1.0, "head_scores": [[0.0, 1.0], [0.5, 0.0]]}),
                                  json.dumps({"recall": 0.0, "head_scores": [[9.0, 9.0], [9.0, 9.0]]}),
                                  json.dumps({"recall": 1.0, "head_scores": [[1.0, 0.0], [0.5, 0.0]]})]) + "\n")
    per_test = json.loads(interchange.export_retrieval_head(path=tmp_path / "t.json", results=results).read_text())
    assert per_test["0-0"] == [0.0, 1.0] and per_test["1-0"] == [0.5, 0.5]
    (tmp_path / "bad.json").write_text(json.dumps({"zero": [1]}))
    with pytest.raises(InputError, match="layer-head"):
        interchange.import_retrieval_head(tmp_path / "bad.json")


# ---- data, evaluation, far-attention scores -----------------------------------------------------------------

def test_heldout_needles_are_new_and_the_haystack_halves_disjoint():
    from headlab.probes import retrieval

    heldout = ev.heldout_needles()
    own = retrieval.load_needles()
    assert len(heldout) >= 16 and len({n.id for n in heldout}) == len(heldout)
    assert not {n.id for n in heldout} & {n.id for n in own}
    assert not {n.answer.lower() for n in heldout} & {n.answer.lower() for n in own}
    first, second = ev.haystack_half(0), ev.haystack_half(1)
    assert first and second and first[:2000] not in second and second[-2000:] not in first


@pytest.fixture()
def long_tiny():
    model = headlab.load_model("tiny-llama")
    model.hf.config.max_position_embeddings = 1024  # RoPE has no limit; the byte tokenizer needs long prompts
    return model


def test_multi_needle_prompt_keeps_its_length_and_holds_the_distractors(long_tiny):
    task = ev.heldout_task(lengths=(900,), depths=(0.5,))
    test = task.tests()[0]
    prompt = ev.build(long_tiny, task, test, "multi", distractors=3)
    text = long_tiny.to_string(prompt.ids)
    assert len(prompt.ids) == 900 and len(prompt.distractors) == 3
    for needle in task.needles:
        if needle.id in prompt.distractors or needle.id == test.needle.id:
            assert needle.fact.format(answer=needle.answer) in text
    assert text.count(test.needle.question) == 1


def test_evaluate_journal_resumes_and_summarizes(long_tiny, tmp_path):
    task = ev.heldout_task(lengths=(400,), depths=(0.5,), needles=2)
    policies = [kv.full(), kv.streaming(4, 32), kv.random(long_tiny, 0.5, seed=0)]
    journal = tmp_path / "kv.jsonl"
    table = ev.evaluate(long_tiny, policies, task, journal=journal, max_new_tokens=4, progress=False)
    assert set(table["policy"]) == {p.name for p in policies} and (table["n_tests"] == 2).all()
    assert {"policy", "fraction", "sink", "window", "length", "accuracy", "kv_bytes", "kv_fraction",
            "decode_ms_per_token"} <= set(table.columns)
    full_row = table[table["policy"] == "full"].iloc[0]
    assert full_row["kv_fraction"] == 1.0 and full_row["kv_fraction_measured"] == 1.0
    rows = table.attrs["tests"]
    assert (rows["kv_bytes"] == rows["kv_bytes_analytic"]).all()
    again = ev.evaluate_tests(long_tiny, policies, task, journal=journal, max_new_tokens=4, progress=False)
    assert again["response"].tolist() == rows["response"].tolist()
    shared = ev.evaluate_tests(long_tiny, policies, task, mode="full", max_new_tokens=4, progress=False)
    assert shared[shared["policy"] == "full"]["response"].tolist() == rows[rows["policy"] == "full"]["response"].tolist()
    fig = ev.pareto_figure(table)
    assert len(fig.data) == 3
    other = ev.heldout_task(lengths=(400,), depths=(0.2,), needles=2)
    with pytest.raises(InputError, match="units of another run"):
        ev.evaluate_tests(long_tiny, policies, other, journal=journal, progress=False)


def test_far_attention_scores(tiny_llama):
    ids = torch.randint(4, 200, (120,))
    mass = far.far_mass(tiny_llama, ids, sink=2, window=16, rows=8)
    assert mass.shape == (2, 4) and (mass >= 0).all() and (mass <= 1 + 1e-6).all() and mass.max() > 0
    assert np.allclose(far.far_mass(tiny_llama, ids, sink=2, window=200, rows=8), 0)
    scores = far.scan(tiny_llama, [ids, ids[:100]], sink=2, window=16, progress=False)
    assert scores.meta["probe"] == "far" and np.all(scores.matrix("far_max") >= scores.matrix())


# ---- the command ----------------------------------------------------------------------------------------------

def test_command_rejects_a_scan_without_the_needed_scores(tmp_path):
    from typer.testing import CliRunner

    from headlab.cli import app

    (tmp_path / "scan" / "probes").mkdir(parents=True)
    headlab.HeadScores.from_matrix(np.zeros((2, 4)), {"probe": "sinks"}).save(tmp_path / "scan" / "probes" / "sinks")
    runner = CliRunner()
    result = runner.invoke(app, ["kv", "tiny-llama", "--scores", str(tmp_path / "scan")])
    assert result.exit_code == 1 and "holds no retrieval scores" in result.output
    result = runner.invoke(app, ["kv", "tiny-llama", "--scores", str(tmp_path / "scan"), "--probe", "sinks",
                                 "--column", "far"])
    assert result.exit_code == 1 and "no column 'far'" in result.output
    result = runner.invoke(app, ["kv", "tiny-llama", "--scores", str(tmp_path / "scan"), "--probe", "sinks",
                                 "--fractions", "0.5,2"])
    assert result.exit_code == 1 and "[0, 1]" in result.output


def test_command_runs_on_a_scan_and_its_report_shows_the_policies(tmp_path, long_tiny, monkeypatch):
    from typer.testing import CliRunner

    from headlab.cli import app

    scan = tmp_path / "scan"
    assert CliRunner().invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out",
                                    str(scan)]).exit_code == 0
    monkeypatch.setattr(headlab, "load_model", lambda name, device=None: long_tiny)
    result = CliRunner().invoke(app, ["kv", "tiny-llama", "--scores", str(scan), "--probe", "detectors",
                                      "--lengths", "400", "--tests", "1", "--fractions", "0.5",
                                      "--max-new-tokens", "3", "--duo", str(tmp_path / "duo")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(scan / "kv" / "kv.csv")
    assert len(table) == 4 and (scan / "kv" / "pareto.html").exists()
    assert list((tmp_path / "duo").iterdir())
    report = (scan / "report.html").read_text()
    assert 'id="kv-pareto"' in report and "KV-cache policies" in report
    assert CliRunner().invoke(app, ["report", str(scan)]).exit_code == 0  # a re-render keeps them
    assert (scan / "kv" / "kv.csv").exists() and 'id="kv-pareto"' in (scan / "report.html").read_text()


def test_command_reads_a_column_of_heads_csv_and_its_kv_json_reruns_it(tmp_path, long_tiny, monkeypatch):
    """`--scores <scan>/heads.csv --column <probe>` ranks by that column exactly as the probe's own table does, and
    `--config <out>/kv.json` re-runs the run (same settings, same answers and KV bytes, from a fresh journal)."""
    from typer.testing import CliRunner

    from headlab.cli import app

    scan = tmp_path / "scan"
    assert CliRunner().invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out",
                                    str(scan)]).exit_code == 0
    monkeypatch.setattr(headlab, "load_model", lambda name, device=None: long_tiny)
    settings = ["--lengths", "400", "--tests", "1", "--fractions", "0.5", "--set", "max_new_tokens=3"]
    by_column, by_probe = tmp_path / "by-column", tmp_path / "by-probe"
    result = CliRunner().invoke(app, ["kv", "tiny-llama", "--scores", str(scan / "heads.csv"), "--column",
                                      "detectors", "--out", str(by_column), *settings])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["kv", "tiny-llama", "--scores", str(scan), "--probe", "detectors", "--out",
                                    str(by_probe), *settings]).exit_code == 0
    same = ["policy", "n_full", "accuracy", "kv_bytes", "kv_bytes_analytic"]
    first = pd.read_csv(by_column / "kv.csv")
    assert first[same].equals(pd.read_csv(by_probe / "kv.csv")[same])
    recorded = json.loads((by_column / "kv.json").read_text())
    assert recorded["settings"]["max_new_tokens"] == 3 and recorded["settings"]["fractions"] == [0.5]
    again = tmp_path / "again"
    result = CliRunner().invoke(app, ["kv", "--config", str(by_column / "kv.json"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    rows, rerun = ev.results_frame(by_column / "kv.tests.jsonl"), ev.results_frame(again / "kv.tests.jsonl")
    assert rerun[["policy", "response", "kv_bytes"]].equals(rows[["policy", "response", "kv_bytes"]])
    result = CliRunner().invoke(app, ["kv", "--config", str(by_column / "kv.json"), "--set", "mode=lazy"])
    assert result.exit_code == 1 and "--mode must be one of stream, full" in result.output


# ---- real models ------------------------------------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_model_full_policy_is_exact_and_streaming_saves_memory(name):
    model = headlab.load_model(name)
    ids = model.to_tokens("The quick brown fox jumps over the lazy dog. " * 40)
    got, _ = _policy_logits(model, ids, ids[0, 1:4], kv.full())
    ref = _plain_logits(model, ids, ids[0, 1:4])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    cache = kv.prefill(model, ids[0], kv.streaming(4, 64))
    kv.step(model, cache, int(ids[0, -1]))
    assert cache.kv_bytes() == kv.streaming(4, 64).kept_tokens(model, ids.shape[1], 1).sum() * _entry_bytes(model)


# ---- recording statistics under a policy (the attention seam composes) -----------------------------------------

def _kept_positions(policy, model, layer: int, kv_head: int, query: int) -> torch.Tensor:
    """The positions a head keeps when the query at `query` attends (a decoding step after a streamed prefill)."""
    j = torch.arange(query + 1)
    if policy.full_matrix(model)[layer][kv_head]:
        return j
    return j[(j < policy.sink) | (query - j < policy.window)]


class _SavingInputs(Splitter):
    """Keeps each layer's q, k, v of one forward (and runs it unchanged)."""

    def __init__(self):
        self.inputs = {}

    def split(self, call, attend):
        self.inputs[call.layer] = (call.query, call.key, call.value)
        return attend(call)


@pytest.mark.parametrize("streaming", [False, True])
def test_recording_under_a_policy_equals_the_kernel_on_the_kept_keys(tiny_llama, streaming):
    """Statistics recorded while decoding under `full` and under a streaming policy equal the kernel's on the keys
    each head keeps, with q, k, v taken from one forward of the whole text under the policy's per-head mask."""
    from headlab.attention import pushed
    from headlab.capture import recording
    from headlab.kernels import attention_with_stats

    model, n, prompt = tiny_llama, 60, 50
    torch.manual_seed(3)
    ids = torch.randint(4, 200, (1, n))
    policy = kv.from_heads(model, [(0, 1), (1, 1)], sink=3, window=10) if streaming else kv.full()
    spans = {"start": (0, 3), "middle": (20, 30), "recent": (44, 50)}
    want = ("lse", "top1", "entropy", "span_mass")
    saving = _SavingInputs()
    with torch.no_grad(), pushed(model, saving):
        model.hf(input_ids=ids, attention_mask=_head_mask(model, policy, n) if streaming else None)
    cache = kv.prefill(model, ids[0, :prompt], policy)
    group = model.n_heads // model.n_kv_heads
    checked = 0
    with recording(model, want=want, spans=spans) as recorder:
        for query in range(prompt, n):
            kv.step(model, cache, ids[0, query])
            for layer in range(model.n_layers):
                q, k, v = saving.inputs[layer]
                ours = recorder.stats[layer]
                for kv_head in range(model.n_kv_heads):
                    heads = slice(kv_head * group, (kv_head + 1) * group)
                    kept = _kept_positions(policy, model, layer, kv_head, query)
                    part_spans = {name: (int(torch.searchsorted(kept, a)), int(torch.searchsorted(kept, b)))
                                  for name, (a, b) in spans.items()}
                    _, ref = attention_with_stats(q[:, heads, query:query + 1], k[:, kv_head:kv_head + 1, kept],
                                                  v[:, kv_head:kv_head + 1, kept], want=(*want, "colsum"),
                                                  spans={k_: s for k_, s in part_spans.items() if s[1] > s[0]})
                    # the two forwards (whole text vs. cached decoding) differ by fp32 rounding only (~1e-6)
                    torch.testing.assert_close(ours.lse[:, heads], ref.lse, rtol=0, atol=1e-4)
                    torch.testing.assert_close(ours.entropy[:, heads], ref.entropy, rtol=0, atol=1e-4)
                    for i, name in enumerate(spans):
                        expected = (ref.span_mass[..., ref.span_names.index(name)] if name in ref.span_names
                                    else torch.zeros_like(ours.span_mass[:, heads, :, i]))
                        torch.testing.assert_close(ours.span_mass[:, heads, :, i], expected, rtol=0, atol=1e-4)
                    top2 = ref.colsum.topk(min(2, len(kept)), dim=-1).values
                    clear = (top2[..., 0] - top2[..., -1] > 1e-3) | (len(kept) == 1)
                    assert torch.equal(ours.top1[:, heads][clear], kept[ref.top1][clear])
                    checked += int(clear.sum())
    assert checked > 0
    if streaming:  # a wrong variant, statistics over every key, differs for the streaming heads
        layer, head = 0, 0  # KV head 0 of layer 0 streams
        q, k, v = saving.inputs[layer]
        _, every_key = attention_with_stats(q[:, head:head + 1, n - 1:], k[:, :1], v[:, :1], want=("lse",))
        assert (every_key.lse - recorder.stats[layer].lse[:, head:head + 1]).abs().max() > 1e-2
        assert recorder.stats[layer].span_mass[:, head, :, 1].abs().max() == 0  # "middle" was evicted


def test_gpt_oss_streaming_heads_keep_their_learned_sinks(tiny_gpt_oss, monkeypatch):
    """A policy that splits gpt-oss's full-attention layer into parts (KV head 0 streams, with a window longer than
    the text, so it keeps every key) gives the plain model's eager logits: each part carries its own heads' sink
    logits. A wrong variant, parts without their sinks, does not."""
    from headlab.attention import Call

    model = tiny_gpt_oss
    torch.manual_seed(4)
    ids, tokens = torch.randint(4, 200, (1, 30)), torch.randint(4, 200, (4,))
    policy = kv.from_heads(model, [(1, 1)], sink=2, window=1000)
    ref = _plain_logits(model, ids, tokens)
    got, cache = _policy_logits(model, ids, tokens, policy)
    assert isinstance(cache.layers[1], kv.cache.PolicyLayer) and cache.layers[1].stream_idx == [0]
    # the same sums in other orders (parts, eager vs. SDPA-free maths): fp32 rounding, ~1e-6 on logits ~7
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) <= 1e-4
    part = Call.part
    monkeypatch.setattr(Call, "part", lambda self, *a, **k: dataclasses.replace(part(self, *a, **k), sinks=None))
    dropped, _ = _policy_logits(model, ids, tokens, policy)
    assert max((a - b).abs().max().item() for a, b in zip(dropped, ref)) > 1e-2
