"""attention_with_stats: checks the arguments and sends them to the Triton kernel or the torch twin."""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .errors import KernelInputError
from .masks import queries_seeing, visible_keys
from .stats import DEFAULT_WANT, STATISTICS, AttentionStats, Problem, check_problem, expand_kv
from .torch_twin import attention_with_stats_torch

BACKENDS = ("auto", "torch", "triton")
_warned = False


def triton_installed() -> bool:
    """Whether Triton can be imported (it is optional: `pip install 'headlab[gpu]'`)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:
        return False


def triton_usable(device: torch.device) -> bool:
    """Triton is installed and runs on these tensors: CUDA, or CPU under its interpreter (TRITON_INTERPRET=1)."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def attention_with_stats(
    q,
    k,
    v,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    spans=None,
    want=DEFAULT_WANT,
    query_rows=None,
    sinks=None,
    backend: str = "auto",
    strict: bool = False,
):
    """Attention output and per-head statistics.

    q: [batch, heads, nq, d]; k, v: [batch, kv_heads, nk, d] (heads a multiple of kv_heads); queries are the
    last nq of the nk positions. window: keys more than window-1 behind a query are hidden (causal only).
    softcap: scores -> softcap * tanh(scores / softcap). spans: {name: (start, end)} or [(start, end), ...]
    of keys. want: any of "lse", "top1", "span_mass", "entropy", "colsum". query_rows: the queries for top1
    and entropy (default all; negative counts from the end). sinks: [heads] learned sink logits (gpt-oss), one
    more logit in each row's softmax with no value: the weights on the keys then sum to less than 1 (see
    AttentionStats for what each statistic counts).
    backend: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton"; Triton without CUDA falls back
    to torch with one warning, or raises when strict=True.
    Returns (out [batch, heads, nq, d] in q's dtype, AttentionStats in float32 / int64).
    """
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    problem = check_problem(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap, spans=spans,
                            want=want, query_rows=query_rows, sinks=sinks)
    return solve(q, k, v, problem, backend=backend, strict=strict)


def solve(q, k, v, problem: Problem, *, backend: str = "auto", strict: bool = False):
    """(out, AttentionStats) of an already checked problem (see `check_problem`), on the chosen backend."""
    global _warned
    if backend not in BACKENDS:
        raise KernelInputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    use_triton = backend == "triton" or (backend == "auto" and q.device.type == "cuda")
    if use_triton and not triton_usable(q.device):
        if not triton_installed():
            reason = "Triton is not installed (pip install 'headlab[gpu]')"
        else:
            reason = "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
        if strict:
            raise KernelInputError(reason)
        if not _warned:
            warnings.warn(f"{reason}: using the torch twin instead", stacklevel=3)
            _warned = True
        use_triton = False
    if use_triton:
        from .triton_kernel import attention_with_stats_triton

        out, stats = attention_with_stats_triton(q, k, v, problem)
    else:
        out, stats = attention_with_stats_torch(q, k, v, problem)
    stats.sinks = problem.sinks
    return out, stats


__all__ = ["AttentionStats", "BACKENDS", "DEFAULT_WANT", "Problem", "STATISTICS", "attention_with_stats",
           "check_problem", "expand_kv", "queries_seeing", "solve", "triton_installed", "triton_usable",
           "visible_keys"]
