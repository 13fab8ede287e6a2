"""Fused attention-with-statistics: per-head statistics at long context without an N x N tensor.

    out, stats = attention_with_stats(q, k, v, causal=True, spans={"needle": (900, 930)},
                                      want=("lse", "top1", "span_mass"), query_rows=range(-64, 0))

A Triton kernel on CUDA (and on the CPU under TRITON_INTERPRET=1, for tests) and a torch twin elsewhere,
with the same signature and results. Pure tensors: this package imports torch (and Triton when it launches the
kernel) and nothing of headlab, so it can be used, and tested, on its own.
"""

from .dispatch import (
    BACKENDS,
    DEFAULT_WANT,
    STATISTICS,
    AttentionStats,
    Problem,
    attention_with_stats,
    check_problem,
    expand_kv,
    queries_seeing,
    solve,
    triton_installed,
    triton_usable,
    visible_keys,
)
from .errors import KernelInputError

__all__ = ["AttentionStats", "BACKENDS", "DEFAULT_WANT", "KernelInputError", "Problem", "STATISTICS",
           "attention_with_stats", "check_problem", "expand_kv", "queries_seeing", "solve", "triton_installed",
           "triton_usable", "visible_keys"]
