"""Fused attention-with-statistics: per-head statistics at long context without an N x N tensor.

    out, stats = attention_with_stats(q, k, v, causal=True, spans={"needle": (900, 930)},
                                      want=("lse", "top1", "span_mass"), query_rows=range(-64, 0))

A Triton kernel on CUDA (and on the CPU under TRITON_INTERPRET=1, for tests) and a torch twin elsewhere,
with the same signature and results. Pure tensors: no model, no tokenizer.
"""

if __name__ == "headlab.kernels":
    # Only as headlab.kernels. From the repository root (a script or REPL started there) the directory is also
    # importable as top-level `kernels`, which transformers imports to probe for Hugging Face's package of that
    # name; it must stay an empty module then, or it would import headlab while transformers is half-initialised.
    from headlab.kernels.dispatch import (  # noqa: F401
        BACKENDS,
        AttentionStats,
        DEFAULT_WANT,
        STATISTICS,
        attention_with_stats,
        queries_seeing,
        triton_usable,
        visible_keys,
    )

    __all__ = ["AttentionStats", "BACKENDS", "DEFAULT_WANT", "STATISTICS", "attention_with_stats", "queries_seeing",
               "triton_usable", "visible_keys"]
