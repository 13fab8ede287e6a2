"""attention_with_stats in torch, for the CPU: never an N x N tensor, memory bounded by `budget_bytes`.

Two routes, one answer:
- fused: torch's CPU flash attention returns out and the log-sum-exp; span mass then costs O(nq x span)
  and row statistics O(r x nk);
- blocked: one pass over blocks of queries, each against all the keys it can see, that computes every
  statistic (column sums included) from exact row softmaxes; a window shrinks each block's keys to a band.
The fused route is taken when the private op exists, the problem fits it (square, no window shorter than
the sequence, no softcap) and the statistics asked for do not need every score anyway (column sums, or
row statistics for more than 1/8 of the queries).
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float

from headlab.kernels.masks import key_range, visible_keys
from headlab.kernels.stats import AttentionStats, Problem

BUDGET_BYTES = 256 * 2**20


def _flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def block_scores(
    q: Float[torch.Tensor, "b kv g m d"],
    k: Float[torch.Tensor, "b kv nk d"],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    p: Problem,
) -> Float[torch.Tensor, "b kv g m nk"]:
    """fp32 scaled (and capped) scores of a block of queries against a block of keys; hidden keys are -inf."""
    scores = torch.einsum("bkgmd,bknd->bkgmn", q.float(), k.float()) * p.scale
    if p.softcap is not None:
        scores = p.softcap * torch.tanh(scores / p.softcap)
    visible = visible_keys(q_pos, k_pos, p.causal, p.window).to(scores.device)
    return scores.masked_fill(~visible, float("-inf"))


def _rows_per_block(b: int, h: int, n_keys: int, budget: int) -> int:
    return max(1, min(4096, budget // max(1, 4 * 4 * b * h * n_keys)))  # ~4 fp32 temporaries of the block


def attention_with_stats_torch(q, k, v, p: Problem, budget_bytes: int = BUDGET_BYTES):
    """(out [b h nq d], AttentionStats) for checked arguments `p` (see headlab.kernels.attention_with_stats)."""
    n_q, n_k = q.shape[2], k.shape[2]
    op = _flash_op()
    fits = op is not None and n_q == n_k and p.softcap is None and (p.window is None or p.window >= n_k)
    needs_all_scores = "colsum" in p.want or (p.row_stats and p.query_rows.numel() * 8 > n_q)
    if fits and not needs_all_scores:
        return _fused(q, k, v, p, op, budget_bytes)
    return _blocked(q, k, v, p, budget_bytes)


def _grouped(q, kv):
    return rearrange(q, "b (kv g) ... -> b kv g ...", kv=kv)


def _ungrouped(x):
    return rearrange(x, "b kv g ... -> b (kv g) ...")


def _blocked(q, k, v, p: Problem, budget: int):
    b, h, n_q, d = q.shape
    kv, n_k = k.shape[1], k.shape[2]
    offset = n_k - n_q
    qg = _grouped(q, kv)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    span_mass = torch.zeros(b, h, n_q, len(p.spans), dtype=torch.float32, device=q.device) if "span_mass" in p.want else None
    colsum = torch.zeros(b, h, n_k, dtype=torch.float32, device=q.device) if "colsum" in p.want else None
    top1 = torch.zeros(b, h, n_q, dtype=torch.long, device=q.device) if "top1" in p.want else None
    top1_prob = torch.zeros(b, h, n_q, dtype=torch.float32, device=q.device) if "top1" in p.want else None
    entropy = torch.zeros(b, h, n_q, dtype=torch.float32, device=q.device) if "entropy" in p.want else None
    span_of_key = _span_membership(p, n_k, q.device) if span_mass is not None else None
    step = _rows_per_block(b, h, n_k if p.window is None else min(n_k, p.window + 256), budget)
    for start in range(0, n_q, step):
        end = min(n_q, start + step)
        lo, hi = key_range(offset + start, offset + end, n_k, p.causal, p.window)
        q_pos = torch.arange(offset + start, offset + end)
        scores = block_scores(qg[:, :, :, start:end], k[:, :, lo:hi], q_pos, torch.arange(lo, hi), p)
        best, best_key = scores.max(-1)
        block_lse = best + torch.log(torch.exp(scores - best[..., None]).sum(-1))
        probs = torch.exp(scores - block_lse[..., None])  # exact row softmax: hidden keys give exp(-inf) = 0
        out[:, :, start:end] = _ungrouped(torch.einsum("bkgmn,bknd->bkgmd", probs, v[:, :, lo:hi].float())).to(q.dtype)
        lse[:, :, start:end] = _ungrouped(block_lse)
        if top1 is not None:
            top1[:, :, start:end] = _ungrouped(best_key + lo)
            top1_prob[:, :, start:end] = _ungrouped(torch.exp(best - block_lse))
        if entropy is not None:
            entropy[:, :, start:end] = _ungrouped(block_lse - (probs * scores.nan_to_num(0.0, neginf=0.0)).sum(-1))
        if span_mass is not None:
            span_mass[:, :, start:end] = _ungrouped(probs @ span_of_key[lo:hi])
        if colsum is not None:
            colsum[:, :, lo:hi] += _ungrouped(probs.sum(-2))
    rows = p.query_rows
    stats = AttentionStats(
        lse=lse if "lse" in p.want else None,
        top1=top1[:, :, rows] if top1 is not None else None,
        top1_prob=top1_prob[:, :, rows] if top1 is not None else None,
        entropy=entropy[:, :, rows] if entropy is not None else None,
        span_mass=span_mass, colsum=colsum, query_rows=rows, span_names=p.span_names,
    )
    return out, stats


def _span_membership(p: Problem, n_k: int, device) -> Float[torch.Tensor, "nk s"]:
    member = torch.zeros(n_k, len(p.spans), dtype=torch.float32, device=device)
    for i, (start, end) in enumerate(p.spans):
        member[start:end, i] = 1.0
    return member


def _fused(q, k, v, p: Problem, op, budget: int):
    b, h, n, d = q.shape
    kv = k.shape[1]
    group = h // kv
    k_full = k.repeat_interleave(group, dim=1) if group > 1 else k
    v_full = v.repeat_interleave(group, dim=1) if group > 1 else v
    # fp32 throughout: the op rounds half-precision scores (LSE off by ~6e-5 in bf16)
    out, lse = op(q.float(), k_full.float(), v_full.float(), 0.0, p.causal, scale=p.scale)
    out, lse = out.to(q.dtype), lse.float()
    qg = _grouped(q, kv)
    stats = AttentionStats(lse=lse if "lse" in p.want else None, query_rows=p.query_rows, span_names=p.span_names)
    positions = torch.arange(n)
    if "span_mass" in p.want:
        mass = torch.empty(b, h, n, len(p.spans), dtype=torch.float32, device=q.device)
        for i, (start, end) in enumerate(p.spans):
            step = _rows_per_block(b, h, end - start, budget)
            for q0 in range(start if p.causal else 0, n, step):  # queries before a causal span see none of it
                q1 = min(n, q0 + step)
                scores = block_scores(qg[:, :, :, q0:q1], k[:, :, start:end], positions[q0:q1], positions[start:end], p)
                block = torch.exp(scores - _grouped(lse[:, :, q0:q1], kv)[..., None]).sum(-1)
                mass[:, :, q0:q1, i] = _ungrouped(block)
            if p.causal:
                mass[:, :, :start, i] = 0.0
        stats.span_mass = mass
    if p.row_stats:
        rows = p.query_rows
        scores = block_scores(qg[:, :, :, rows], k, positions[rows], positions, p)
        row_lse = _grouped(lse[:, :, rows], kv)[..., None]
        best, best_key = scores.max(-1)
        if "top1" in p.want:
            stats.top1, stats.top1_prob = _ungrouped(best_key), _ungrouped(torch.exp(best - row_lse[..., 0]))
        if "entropy" in p.want:
            probs = torch.exp(scores - row_lse)
            stats.entropy = _ungrouped(row_lse[..., 0] - (probs * scores.nan_to_num(0.0, neginf=0.0)).sum(-1))
    return out, stats
