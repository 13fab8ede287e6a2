"""Sinks and ACT: the reference redistribution, kernel column sums vs full patterns, both paths, bad input."""

import json

import pytest
import torch
from headlab.probes import sinks
from tolerances import assert_within, depth_bound

import headlab
from headlab.tasks import accuracy, load_task, word_task


def reference_act(pattern, alpha, beta, min_queries, causal=True, window=None):
    """ACT written out query by query from the paper's description."""
    b, h, n_q, n_k = pattern.shape
    out = pattern.clone().double()
    for bi in range(b):
        for hi in range(h):
            seen = []
            for j in range(n_k):
                queries = [i for i in range(n_q) if (not causal or j <= i) and (window is None or i - j < window)]
                mean = sum(float(pattern[bi, hi, i, j]) for i in queries) / max(1, len(queries))
                if j > 0 and mean > alpha and len(queries) >= min_queries:
                    seen.append(j)
            for i in range(n_q):
                row = pattern[bi, hi, i].double()
                on_sinks = float(row[seen].sum()) if seen else 0.0
                if 1 - on_sinks <= sinks.STABLE:
                    continue
                for j in range(n_k):
                    if j in seen:
                        out[bi, hi, i, j] = beta * row[j]
                    else:
                        out[bi, hi, i, j] = row[j] * (1 + (1 - beta) * on_sinks / (1 - on_sinks))
    return out, seen


def random_pattern(b, h, n, causal=True, window=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, n, n, generator=generator, dtype=torch.float64) * 2
    scores[..., 0] += 3  # an initial sink
    scores[..., n // 3] += 4  # and a hidden one
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    hidden = torch.zeros(n, n, dtype=torch.bool)
    if causal:
        hidden |= j > i
    if window is not None:
        hidden |= i - j >= window
    return scores.masked_fill(hidden, float("-inf")).softmax(-1)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 7), (False, None)])
def test_calibration_equals_the_reference_redistribution(causal, window):
    pattern = random_pattern(2, 3, 20, causal, window)
    alpha, beta, min_queries = 0.1, 0.4, 3
    calibrated = sinks.calibrate_pattern(pattern, alpha=alpha, beta=beta, min_queries=min_queries, causal=causal,
                                         window=window)
    expected, _ = reference_act(pattern, alpha, beta, min_queries, causal, window)
    assert (calibrated - expected).abs().max() < 1e-6
    assert torch.allclose(calibrated.sum(-1), torch.ones(2, 3, 20, dtype=torch.float64), atol=1e-12)
    mean, seeing = sinks.mean_received(pattern.sum(-2), 20, causal, window)
    mask = sinks.sink_mask(mean, seeing, alpha, min_queries)
    assert mask[..., 20 // 3].all() and not mask[..., 0].any()  # the planted sink is found, the first is not touched
    column = calibrated.transpose(-1, -2)[mask]
    assert torch.allclose(column, beta * pattern.transpose(-1, -2)[mask])
    assert (calibrated[..., 0] >= pattern[..., 0] - 1e-15).all()  # the initial token only gains


def test_calibration_keeps_each_rows_mass_under_a_learned_sink():
    """gpt-oss: a learned sink takes part of every row, so a row's keys hold less than 1. ACT moves mass among the
    keys and keeps what the row had; the rule for rows summing to 1 would change it."""
    pattern = random_pattern(2, 3, 20, True, None)
    held = 0.4 + 0.5 * torch.rand(2, 3, 20, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pattern = pattern * held  # the rest of each row goes to the head's learned sink
    settings = dict(alpha=0.1, beta=0.4, min_queries=3)
    calibrated = sinks.calibrate_pattern(pattern, learned_sinks=True, **settings)
    assert not torch.equal(calibrated, pattern)
    # fp64, but a row with little left besides its sinks divides by that little: 5e-9 seen, bound 1e-7
    torch.testing.assert_close(calibrated.sum(-1), held[..., 0], atol=1e-7, rtol=0)
    assumed_one = sinks.calibrate_pattern(pattern, learned_sinks=False, **settings)  # rows taken to hold 1
    assert (assumed_one.sum(-1) - held[..., 0]).abs().max() > 1e-3


def test_fast_path_calibration_equals_the_pattern_rule_under_learned_sinks():
    """The fast path's correction (column sums, LSE and each row's learned-sink weight) gives the layer output of the
    calibrated fp64 pattern: 1e-5 (fp32 kernel against fp64, outputs of order one). Taking rows to hold 1, as
    without learned sinks, misses it by more than 1e-3."""
    from headlab.kernels import check_problem, solve

    generator = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 4, 24, 16
    q, k, v = (torch.randn(b, h, n, d, generator=generator) for _ in range(3))
    k[:, :, 5] += 2 * q.mean(2)  # a key every query attends to: a sink past the first token
    learned = torch.tensor([1.5, -2.0, 0.5, 3.0])
    problem = check_problem(q, k, v, causal=True, window=None, scale=d ** -0.5, softcap=None, spans=None,
                            want=("lse", "colsum"), query_rows=None, sinks=learned)
    out, stats = solve(q, k, v, problem, backend="torch")
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    with_sink = torch.cat([scores, learned.double().view(1, h, 1, 1).expand(b, h, n, 1)], -1)
    pattern = with_sink.softmax(-1)[..., :-1]  # rows sum to less than 1
    settings = dict(alpha=0.05, beta=0.4, min_queries=4)
    expected = sinks.calibrate_pattern(pattern, learned_sinks=True, **settings) @ v.double()
    assert (expected - pattern @ v.double()).abs().max() > 1e-2  # the calibration does something here
    fast = sinks._calibrated_output(list(range(h)), **settings)(q, k, v, out, stats, problem)
    torch.testing.assert_close(fast.double(), expected, atol=1e-5, rtol=0)
    stats.sinks = None  # rows taken to hold 1
    rows_of_one = sinks._calibrated_output(list(range(h)), **settings)(q, k, v, out, stats, problem)
    assert (rows_of_one.double() - expected).abs().max() > 1e-3


def test_few_query_keys_are_not_sinks():
    pattern = torch.zeros(1, 1, 10, 10, dtype=torch.float64)
    pattern[..., torch.arange(10), torch.arange(10)] = 0.5
    pattern[..., :, 0] += 0.5
    pattern[0, 0, 0, 0] = 1.0
    mean, seeing = sinks.mean_received(pattern.sum(-2), 10, True, None)
    assert mean[0, 0, 9] == 0.5  # the last key, seen by one query, looks like a sink
    assert not sinks.sink_mask(mean, seeing, 0.1, min_queries=2)[0, 0, 9]
    assert sinks.sink_mask(mean, seeing, 0.1, min_queries=1)[0, 0, 9]


def _pattern_column_sums(model, tokens) -> list[torch.Tensor]:
    """Per layer, the attention each key receives summed over queries [head, key], from the bridge's full patterns."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    return [cache[f"blocks.{layer}.attn.hook_pattern"][0].double().sum(-2) for layer in range(model.n_layers)]


def _pattern_sinks(model, tokens, alpha, min_queries, causal=True, colsums=None):
    """Mean attention each key receives from the queries that see it, and the sink mask; causal=False counts every
    query as seeing every key (a wrong variant on a causal model)."""
    colsums = colsums if colsums is not None else _pattern_column_sums(model, tokens)
    out = []
    for layer, colsum in enumerate(colsums):
        mean, seeing = sinks.mean_received(colsum, tokens.shape[1], causal, model.sliding_window(layer))
        out.append((mean, sinks.sink_mask(mean, seeing, alpha, min_queries)))
    return torch.stack([m for m, _ in out]), torch.stack([s for _, s in out])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_column_sums_find_the_sinks_full_patterns_find(name):
    model = headlab.load_model(name)
    tokens = torch.randint(4, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    found = sinks.sink_stats(model, tokens, alpha=0.05, min_queries=4)
    mean, mask = _pattern_sinks(model, tokens, 0.05, 4)
    assert (found["mean"] - mean).abs().max() < 1e-5
    assert torch.equal(found["sinks"], mask) and mask.any()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_calibrate_gives_one_answer_on_both_paths_and_restores(name):
    model = headlab.load_model(name)
    tokens = torch.randint(4, 200, (2, 40), generator=torch.Generator().manual_seed(3))
    before = model.logits(tokens)
    with sinks.calibrate(model, ["L0H0", "L1H1", "L1H3"], alpha=0.05, beta=0.4, min_queries=4):
        fast = model.logits(tokens)
        hooked = model.bridge(tokens)
    assert (fast - hooked).abs().max() < 1e-4
    assert (fast - before).abs().max() > 1e-2  # the calibration did something
    assert torch.equal(model.logits(tokens), before)
    assert not any(point.fwd_hooks for block in model.bridge.blocks for point in [block.attn.hook_pattern])


@pytest.mark.real
def test_smollm2_sinks_from_column_sums_match_patterns_and_calibration_paths_agree(smollm2):
    tokens = sinks.default_texts(smollm2, n_texts=1, n_tokens=256, seed=3)[0]
    found = sinks.sink_stats(smollm2, tokens)
    colsums = _pattern_column_sums(smollm2, tokens)
    mean, mask = _pattern_sinks(smollm2, tokens, sinks.ALPHA, sinks.MIN_QUERIES, colsums=colsums)
    assert_within(found["mean"], mean, depth_bound(smollm2.n_layers, 1.0))  # mean attention: probabilities
    wrong, _ = _pattern_sinks(smollm2, tokens, sinks.ALPHA, sinks.MIN_QUERIES, causal=False, colsums=colsums)
    with pytest.raises(AssertionError):
        assert_within(found["mean"], wrong, depth_bound(smollm2.n_layers, 1.0))
    clear = ((mean - sinks.ALPHA).abs() > 1e-3)  # away from the threshold the sink sets agree exactly
    assert torch.equal(found["sinks"][clear], mask[clear])
    assert found["sinks"].any()  # SmolLM2 has non-initial sinks
    heads = ["L4H4", "L5H5", "L7H1"]
    with sinks.calibrate(smollm2, heads):
        fast = smollm2.logits(tokens)
        hooked = smollm2.bridge(tokens)
    with sinks.calibrate(smollm2, heads, beta=0.5):  # a wrong variant: another beta on one path
        other_beta = smollm2.logits(tokens)
    bound = depth_bound(smollm2.n_layers, fast.abs().max())
    assert_within(fast, hooked, bound)
    with pytest.raises(AssertionError):
        assert_within(other_beta, hooked, bound)
    assert (fast - smollm2.logits(tokens)).abs().max() > 1e-3


@pytest.mark.real
def test_head_search_reports_consistent_accuracies(smollm2):
    task = word_task("sentiment", n=12, shots=2, seed=0)
    result = sinks.search_heads(smollm2, task, candidates=3, seeds=(0,), progress=False)
    run = result["runs"][0]
    assert set(run["heads"]) <= set(result["candidates"])
    _, held_out = task.split(0.5, 0)
    assert run["held_out_before"] == accuracy(smollm2, held_out)
    if run["heads"]:
        with sinks.calibrate(smollm2, run["heads"], min_queries=result["min_queries"]):
            assert run["held_out_after"] == accuracy(smollm2, held_out)


def test_bad_input(tiny_llama, tmp_path):
    pattern = random_pattern(1, 1, 8)
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.5}, {"beta": 0.0}, {"beta": 2.0}):
        with pytest.raises(headlab.InputError, match="alpha|beta"):
            sinks.calibrate_pattern(pattern, **kwargs)
    with pytest.raises(headlab.HeadIndexError, match="L9H0"):
        with sinks.calibrate(tiny_llama, ["L9H0"]):
            pass
    bad = tmp_path / "task.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b"]}) + "\n")
    with pytest.raises(headlab.InputError, match="lacks the field.*answer"):
        load_task(bad)
    bad.write_text(json.dumps({"text": "good"}) + "\n")
    with pytest.raises(headlab.InputError, match="'label'"):
        load_task(bad)


def test_user_task_files(tmp_path):
    sst = tmp_path / "sst.jsonl"
    sst.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in
                           [("great film", 1), ("dull film", 0), ("lovely", 1), ("awful", 0)]))
    task = load_task(sst, label_names=["negative", "positive"], shots=2, seed=0)
    assert [e.answer for e in task.examples] == [1, 0, 1, 0]
    assert task.examples[0].options == (" negative", " positive")
    assert task.examples[0].prompt.endswith("Text: great film\nLabel:") and task.examples[0].prompt.count("Text:") == 3
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "B"}) + "\n")
    example = load_task(mmlu).examples[0]
    assert example.answer == 1 and example.prompt == "Question: 2+2?\nA. 3\nB. 4\nAnswer:"


def test_learned_sink_mass_of_gpt_oss_matches_its_eager_probabilities(tiny_gpt_oss, tiny_llama):
    """learned_sink_mass: per head, the mean over texts and queries of 1 - (the row's weights on the keys), the
    weights from gpt-oss's own eager attention in fp64; first_mass beside it likewise. A model without learned sinks
    has no such column."""
    from gpt_oss import SINKS, eager_reference

    model = tiny_gpt_oss
    texts = ["A first text about attention sinks and where they go.", "Another, shorter one!"]
    table = sinks.scan(model, texts, min_queries=4, progress=False).frame
    expected_learned, expected_first, wrong = torch.zeros(model.n_layers, model.n_heads), 0, 0
    for text in texts:
        reference = eager_reference(model, model.to_tokens(text), [(0, 1)])
        expected_learned += torch.stack([ref["sink_prob"][0].mean(-1) for ref in reference.values()]).float()
        # a wrong variant: the sink's weight against the keys alone, exp(sink - lse of the keys)
        wrong += torch.stack([(ref["sink_prob"] / (1 - ref["sink_prob"]))[0].mean(-1)
                              for ref in reference.values()]).float()
        expected_first += torch.stack([ref["p"][0, :, :, 0].mean(-1) for ref in reference.values()]).float()
    learned = torch.tensor(table["learned_sink_mass"].to_numpy(), dtype=torch.float32).view(model.n_layers, -1)
    first = torch.tensor(table["first_mass"].to_numpy(), dtype=torch.float32).view(model.n_layers, -1)
    # fp32 model against fp64 (two layers): ~1e-6
    assert (learned - expected_learned / len(texts)).abs().max() <= 1e-5
    assert (learned - wrong / len(texts)).abs().max() > 1e-2
    assert (first - expected_first / len(texts)).abs().max() <= 1e-5
    assert learned[1, 0] > 0.15 and SINKS[1][0] == max(max(SINKS))  # the largest sink logit takes the most
    assert {"learned_sink_mass_lo", "learned_sink_mass_hi"} <= set(table.columns)
    assert "learned_sink_mass" not in sinks.scan(tiny_llama, texts[:1], min_queries=4, progress=False).frame
