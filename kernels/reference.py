"""Naive full-matrix attention statistics: the N x N reference every fast path is tested against."""

from __future__ import annotations

import torch
from jaxtyping import Float

from .masks import visible_keys


def attention_probs(
    q: Float[torch.Tensor, "b h nq d"],
    k: Float[torch.Tensor, "b kv nk d"],
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Float[torch.Tensor, "h"] | None = None,
) -> tuple[Float[torch.Tensor, "b h nq nk"], Float[torch.Tensor, "b h nq nk"]]:
    """(scores, probabilities) in fp64, masked scores = -inf. Queries are the last nq positions. sinks: a learned
    logit per head that joins each row's softmax with no value; the probabilities are those of the keys (the sink's
    is 1 minus their sum)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    n_q, n_k = q.shape[2], k.shape[2]
    visible = visible_keys(torch.arange(n_k - n_q, n_k), torch.arange(n_k), causal, window).to(q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        return scores, scores.softmax(-1).nan_to_num(0.0)
    return scores, _with_sink(scores, sinks).softmax(-1)[..., :-1]


def _with_sink(scores, sinks):
    """[b h nq nk+1]: each row's scores, then its head's sink logit."""
    column = sinks.double().to(scores.device).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, column], -1)


def reference_stats(q, k, v, *, causal=True, window=None, scale=None, softcap=None, spans=(), sinks=None):
    """Every statistic from the full matrix: dict of fp64 tensors (out, lse, top1, top1_prob, entropy,
    span_mass [b h nq S], colsum [b h nk], sink_prob [b h nq] (0 without sinks)). With sinks the LSE and the
    entropy are those of the keys and the sink together."""
    scores, probs = attention_probs(q, k, causal=causal, window=window, scale=scale, softcap=softcap, sinks=sinks)
    group = q.shape[1] // k.shape[1]
    out = probs @ v.double().repeat_interleave(group, dim=1)
    lse = (scores if sinks is None else _with_sink(scores, sinks)).logsumexp(-1)
    if sinks is None:
        sink_prob = torch.zeros_like(lse)
    else:
        sink_prob = torch.exp(sinks.double().to(lse.device).view(1, -1, 1) - lse)
    top1_prob, top1 = probs.max(-1)
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-300).log(), torch.zeros_like(probs)).sum(-1)
    if sinks is not None:
        plogp = plogp + sink_prob * sink_prob.clamp_min(1e-300).log()
    span_mass = torch.stack([probs[..., a:b].sum(-1) for a, b in spans], -1) if spans else None
    return {"out": out, "lse": lse, "top1": top1, "top1_prob": top1_prob, "entropy": -plogp,
            "span_mass": span_mass, "colsum": probs.sum(-2), "scores": scores, "sink_prob": sink_prob}
