"""attention_with_stats (Triton kernel under TRITON_INTERPRET=1, and the torch twin) against the naive
full-matrix reference."""

import os
import warnings

import headlab.kernels.dispatch as kernels
import pytest
import torch
from headlab.kernels import KernelInputError, attention_with_stats, queries_seeing
from headlab.kernels.reference import reference_stats

ALL = ("lse", "top1", "span_mass", "entropy", "colsum")
CASES = {  # name: (batch, heads, kv_heads, n_q, n_k, d, options)
    "odd-n": (1, 4, 4, 37, 37, 16, {}),
    "gqa-9-3": (1, 9, 3, 45, 45, 24, {}),
    "gqa-4-1-window": (2, 4, 1, 53, 53, 16, {"window": 8}),
    "decode-1": (1, 4, 2, 1, 41, 16, {}),
    "decode-5-window": (1, 4, 2, 5, 41, 16, {"window": 7}),
    "bidirectional": (1, 4, 2, 37, 37, 16, {"causal": False}),
    "softcap": (1, 4, 2, 37, 37, 16, {"softcap": 5.0}),
    "rows": (1, 9, 3, 70, 70, 32, {"query_rows": [0, 5, -1]}),
    "many-blocks": (1, 2, 1, 150, 150, 16, {"window": 40}),
}
BACKENDS = ["torch", "triton"]


def _inputs(b, h, kv, n_q, n_k, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n_q, d, generator=g).to(dtype), torch.randn(b, kv, n_k, d, generator=g).to(dtype),
            torch.randn(b, kv, n_k, d, generator=g).to(dtype))


def _spans(n_k):
    return {"first": (0, 1), "start": (0, 5), "middle": (n_k // 3, n_k // 3 + 7), "last": (n_k - 1, n_k)}


def _compare(out, stats, ref, tol):
    rows = stats.query_rows
    assert (out.double() - ref["out"]).abs().max() <= tol["out"]
    assert (stats.lse - ref["lse"]).abs().max() <= tol["stat"]
    assert (stats.span_mass - ref["span_mass"]).abs().max() <= tol["stat"]
    assert (stats.colsum - ref["colsum"]).abs().max() <= tol["stat"] * 10  # a sum of up to n_q probabilities
    assert (stats.entropy - ref["entropy"][:, :, rows]).abs().max() <= tol["stat"]
    assert (stats.top1_prob - ref["top1_prob"][:, :, rows]).abs().max() <= tol["stat"]
    top2 = ref["scores"][:, :, rows].topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert torch.equal(stats.top1[clear], ref["top1"][:, :, rows][clear])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fp32_equals_the_full_matrix(backend, case):
    b, h, kv, n_q, n_k, d, options = CASES[case]
    q, k, v = _inputs(b, h, kv, n_q, n_k, d)
    spans = _spans(n_k)
    out, stats = attention_with_stats(q, k, v, spans=spans, want=ALL, backend=backend, strict=True, **options)
    options.pop("query_rows", None)
    ref = reference_stats(q, k, v, spans=list(spans.values()), **options)
    assert stats.span_names == list(spans)
    _compare(out, stats, ref, {"out": 1e-5, "stat": 1e-5})


SINK_CASES = ["odd-n", "gqa-4-1-window", "decode-5-window", "softcap", "rows"]  # the fused and the blocked route


def _sinks(h, seed=1):
    """Sink logits around the scores' scale (|q . k| / sqrt(d) ~ 1) and one far above them: a head whose rows give
    their sink almost everything, where top1 must still be a key."""
    sinks = 2 * torch.randn(h, generator=torch.Generator().manual_seed(seed))
    sinks[0] = 8.0
    return sinks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SINK_CASES)
def test_learned_sinks_equal_the_full_matrix(backend, case):
    """Sinks join each row's normaliser: every statistic, and the sink's own weight, as the fp64 reference gives
    them (same fp32 bound as without sinks: the sink adds one term to each row's sums)."""
    b, h, kv, n_q, n_k, d, options = CASES[case]
    q, k, v = _inputs(b, h, kv, n_q, n_k, d)
    spans, sinks = _spans(n_k), _sinks(h)
    out, stats = attention_with_stats(q, k, v, spans=spans, want=ALL, sinks=sinks, backend=backend, strict=True,
                                      **options)
    options.pop("query_rows", None)
    ref = reference_stats(q, k, v, spans=list(spans.values()), sinks=sinks, **options)
    _compare(out, stats, ref, {"out": 1e-5, "stat": 1e-5})
    assert (stats.sink_mass - ref["sink_prob"]).abs().max() <= 1e-5
    assert ref["sink_prob"][:, 0].min() > 0.5  # the dominant sink takes most of head 0's rows


def test_a_dropped_sink_fails_the_bound():
    """The statistics without the sink logit are far outside the bound above: the sinks matter in these tests."""
    b, h, kv, n_q, n_k, d, options = CASES["odd-n"]
    q, k, v = _inputs(b, h, kv, n_q, n_k, d)
    spans, sinks = _spans(n_k), _sinks(h)
    out, stats = attention_with_stats(q, k, v, spans=spans, want=ALL, backend="torch", **options)
    ref = reference_stats(q, k, v, spans=list(spans.values()), sinks=sinks, **options)
    with pytest.raises(AssertionError):
        _compare(out, stats, ref, {"out": 1e-5, "stat": 1e-5})
    for name in ("lse", "entropy", "top1_prob", "colsum"):
        assert (getattr(stats, name) - ref[name]).abs().max() > 0.1, name


def test_bad_sinks_are_one_clear_error():
    q, k, v = _inputs(1, 4, 2, 8, 8, 16)
    for sinks, words in ((torch.zeros(3), "one logit per query head [4]"), ([0.0] * 4, "float tensor"),
                         (torch.zeros(4, dtype=torch.long), "float tensor")):
        with pytest.raises(KernelInputError, match=words.replace("[", r"\[")):
            attention_with_stats(q, k, v, sinks=sinks, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_fp32(backend, dtype):
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, dtype=dtype)
    spans = _spans(40)
    out, stats = attention_with_stats(q, k, v, spans=spans, want=ALL, backend=backend, strict=True)
    ref = reference_stats(q, k, v, spans=list(spans.values()))  # from the same rounded inputs, in fp64
    assert out.dtype == dtype and stats.lse.dtype == torch.float32
    _compare(out, stats, ref, {"out": 4 * torch.finfo(dtype).eps, "stat": 1e-5})


@pytest.mark.parametrize("sinks", [False, True], ids=["plain", "sinks"])
@pytest.mark.parametrize("rows", [None, range(-8, 0), [3, 50, 120]])
def test_torch_twin_routes_agree(rows, sinks):
    """The fused route (CPU flash attention + LSE; with sinks its output rescaled to the LSE with the sink) and the
    blocked route give the same statistics."""
    from headlab.kernels.stats import check_problem
    from headlab.kernels.torch_twin import attention_with_stats_torch

    q, k, v = _inputs(1, 9, 3, 200, 200, 32)
    problem = check_problem(q, k, v, causal=True, window=None, scale=None, softcap=None, spans=_spans(200),
                            want=ALL, query_rows=rows, sinks=_sinks(9) if sinks else None)
    fused_out, fused = attention_with_stats_torch(q, k, v, problem, route="fused")
    blocked_out, blocked = attention_with_stats_torch(q, k, v, problem, route="blocked")
    assert (fused_out - blocked_out).abs().max() < 1e-5
    for name in ("lse", "span_mass", "top1_prob", "entropy", "colsum"):
        assert (getattr(fused, name) - getattr(blocked, name)).abs().max() < 1e-4, name
    assert torch.equal(fused.top1, blocked.top1)


def test_small_memory_budget_gives_the_same_answer():
    from headlab.kernels.stats import check_problem
    from headlab.kernels.torch_twin import attention_with_stats_torch

    q, k, v = _inputs(1, 4, 2, 60, 60, 16)
    problem = check_problem(q, k, v, causal=True, window=9, scale=None, softcap=None, spans=_spans(60), want=ALL,
                            query_rows=None)
    big = attention_with_stats_torch(q, k, v, problem)
    small = attention_with_stats_torch(q, k, v, problem, budget_bytes=1)  # one query per block
    assert torch.allclose(big[0], small[0], atol=1e-6)
    assert torch.allclose(big[1].colsum, small[1].colsum, atol=1e-5)


def test_queries_seeing_counts_the_mask():
    for n_q, n_k, causal, window in [(7, 7, True, None), (7, 7, True, 3), (3, 9, True, 4), (5, 5, False, None)]:
        q_pos, k_pos = torch.arange(n_k - n_q, n_k), torch.arange(n_k)
        expected = kernels.visible_keys(q_pos, k_pos, causal, window).sum(0)
        assert torch.equal(queries_seeing(n_q, n_k, causal, window), expected)


def test_bad_input_is_one_clear_error():
    q, k, v = _inputs(1, 4, 2, 10, 10, 8)
    with pytest.raises(KernelInputError, match="multiple"):
        attention_with_stats(q[:, :3], k, v)
    with pytest.raises(KernelInputError, match="4-d"):
        attention_with_stats(q[0], k, v)
    with pytest.raises(KernelInputError, match="dtype"):
        attention_with_stats(q, k.half(), v)
    with pytest.raises(KernelInputError, match="dtype"):
        attention_with_stats(q.long(), k.long(), v.long())
    with pytest.raises(KernelInputError, match="outside the keys"):
        attention_with_stats(q, k, v, spans={"x": (8, 11)})
    with pytest.raises(KernelInputError, match="outside the keys"):
        attention_with_stats(q, k, v, spans=[(-1, 3)])
    with pytest.raises(KernelInputError, match="unknown statistics"):
        attention_with_stats(q, k, v, want=("lse", "mass"))
    with pytest.raises(KernelInputError, match="query_rows"):
        attention_with_stats(q, k, v, query_rows=[10])
    with pytest.raises(KernelInputError, match="queries"):
        attention_with_stats(torch.randn(1, 4, 12, 8), k, v)
    with pytest.raises(KernelInputError, match="causal"):
        attention_with_stats(q, k, v, causal=False, window=4)
    with pytest.raises(KernelInputError, match="backend"):
        attention_with_stats(q, k, v, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(KernelInputError, match="one device"):
            attention_with_stats(q.cuda(), k, v)


def test_triton_without_cuda_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "_warned", False)
    q, k, v = _inputs(1, 2, 1, 9, 9, 8)
    with pytest.warns(UserWarning, match="torch twin"):
        out, _ = attention_with_stats(q, k, v, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_with_stats(q, k, v, backend="triton")  # the warning comes once
    assert torch.allclose(out, attention_with_stats(q, k, v, backend="torch")[0])
    with pytest.raises(KernelInputError, match="CUDA"):
        attention_with_stats(q, k, v, backend="triton", strict=True)
    assert os.environ["TRITON_INTERPRET"] == "0"
