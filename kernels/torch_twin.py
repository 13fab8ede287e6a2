"""attention_with_stats in torch, for the CPU: never an N x N tensor, memory bounded by `budget_bytes`.

- Square causal or bidirectional problems without softcap or a window shorter than the sequence: torch's CPU
  flash attention returns out and the log-sum-exp (LSE); span mass then costs O(nq x span), row statistics
  one pass of scores over the asked rows, column sums one pass over the scores that reuses the saved LSE
  (as a FlashAttention backward does).
- Everything else (sliding window, softcap, decoding with nq < nk): one pass over blocks of queries, each
  against the band of keys it can see, computing every statistic from exact row softmaxes.

Learned sinks join each row's LSE (lse = logaddexp(lse over the keys, sink)); the fused route rescales torch's
output by exp(lse over the keys - lse), and every statistic then follows from the LSE as without sinks, except the
entropy, which adds the sink's own term.
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float

from .masks import key_range
from .stats import AttentionStats, Problem

BUDGET_BYTES = 128 * 2**20
NEG_INF = float("-inf")


def _flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _grouped(x, kv):
    return rearrange(x, "b (kv g) ... -> b kv g ...", kv=kv)


def _ungrouped(x):
    return rearrange(x, "b kv g ... -> b (kv g) ...")


def block_scores(
    q: Float[torch.Tensor, "b kv g m d"],
    k: Float[torch.Tensor, "b kv n d"],
    q_pos: torch.Tensor,
    k_lo: int,
    p: Problem,
) -> Float[torch.Tensor, "b kv g m n"]:
    """fp32 scaled (and capped) scores of queries at positions q_pos against keys k_lo, k_lo + 1, ...;
    hidden keys are -inf. Only the columns a mask can cut (at most m of them per mask) are masked."""
    b, kv, g, m, d = q.shape
    n = k.shape[2]
    scores = torch.matmul(q.reshape(b, kv, g * m, d).float(), k.float().transpose(-1, -2)).mul_(p.scale)
    scores = scores.view(b, kv, g, m, n)
    if p.softcap is not None:
        scores = scores.div_(p.softcap).tanh_().mul_(p.softcap)
    first, last = int(q_pos[0]), int(q_pos[-1])
    k_pos = torch.arange(k_lo, k_lo + n)
    if p.causal and last >= first and k_lo + n - 1 > first:  # keys after the first query
        lo = max(first + 1, k_lo) - k_lo
        hidden = k_pos[None, lo:] > q_pos[:, None]
        scores[..., lo:].masked_fill_(hidden.to(scores.device), NEG_INF)
    if p.window is not None and k_lo <= last - p.window:  # keys out of the last query's window
        hi = last - p.window + 1 - k_lo
        hidden = q_pos[:, None] - k_pos[None, :hi] >= p.window
        scores[..., :hi].masked_fill_(hidden.to(scores.device), NEG_INF)
    return scores


def _grouped_sinks(p: Problem, kv: int) -> Float[torch.Tensor, "1 kv g 1"] | None:
    """The sink logits shaped to broadcast against grouped [b, kv, g, rows] statistics; None without sinks."""
    return None if p.sinks is None else _grouped(p.sinks.view(1, -1, 1), kv)


def _sink_entropy(lse, sinks):
    """The sink's term of a row's entropy, -p_sink log p_sink minus its share of lse: -exp(sink - lse) * sink
    (the entropy is lse - sum_j p_j s_j - p_sink * sink, lse over the keys and the sink)."""
    return -torch.exp(sinks - lse) * sinks


def _rows_per_block(b: int, h: int, n_keys: int, budget: int) -> int:
    return max(1, min(4096, budget // max(1, 3 * 4 * b * h * n_keys)))  # ~3 fp32 temporaries of a block


def attention_with_stats_torch(q, k, v, p: Problem, budget_bytes: int = BUDGET_BYTES, route: str = "auto"):
    """(out [b h nq d], AttentionStats) for checked arguments `p` (see headlab.kernels.attention_with_stats).

    route: "auto", or "fused" / "blocked" to force one (tests hold the two equal)."""
    n_q, n_k = q.shape[2], k.shape[2]
    op = _flash_op()
    fits = op is not None and n_q == n_k and p.softcap is None and (p.window is None or p.window >= n_k)
    if route == "fused" or (route == "auto" and fits):
        return _fused(q, k, v, p, op, budget_bytes)
    return _blocked(q, k, v, p, budget_bytes)


def _fused(q, k, v, p: Problem, op, budget: int):
    b, h, n, d = q.shape
    kv = k.shape[1]
    group = h // kv
    k_full = k.repeat_interleave(group, dim=1) if group > 1 else k
    v_full = v.repeat_interleave(group, dim=1) if group > 1 else v
    # fp32 throughout: the op rounds half-precision scores (its LSE is off by ~6e-5 in bf16)
    out, lse = op(q.float(), k_full.float(), v_full.float(), 0.0, p.causal, scale=p.scale)
    lse = lse.float()
    del k_full, v_full
    if p.sinks is not None:
        lse_keys, lse = lse, torch.logaddexp(lse, p.sinks.view(1, -1, 1))
        out = out * torch.exp(lse_keys - lse)[..., None]
    out = out.to(q.dtype)
    qg, lse_g = _grouped(q, kv), _grouped(lse, kv)
    positions = torch.arange(n)
    stats = AttentionStats(lse=lse if "lse" in p.want else None, query_rows=p.query_rows, span_names=p.span_names)
    if "span_mass" in p.want:
        mass = torch.zeros(b, kv, group, n, len(p.spans), dtype=torch.float32, device=q.device)
        for i, (start, end) in enumerate(p.spans):
            step = _rows_per_block(b, h, end - start, budget)
            for q0 in range(start if p.causal else 0, n, step):  # queries before a causal span see none of it
                q1 = min(n, q0 + step)
                scores = block_scores(qg[:, :, :, q0:q1], k[:, :, start:end], positions[q0:q1], start, p)
                mass[:, :, :, q0:q1, i] = scores.sub_(lse_g[:, :, :, q0:q1, None]).exp_().sum(-1)
        stats.span_mass = _ungrouped(mass)
    if p.row_stats:
        _row_stats(qg, k, lse_g, p, stats, budget)
    if "colsum" in p.want:
        stats.colsum = _column_sums(qg, k, lse_g, p, budget)
    return out, stats


def _row_stats(qg, k, lse_g, p: Problem, stats: AttentionStats, budget: int) -> None:
    """top1, top1_prob and entropy of the query rows, from their scores and the saved LSE."""
    b, kv, g, n, d = qg.shape
    rows = p.query_rows
    top1 = torch.empty(b, kv, g, len(rows), dtype=torch.long, device=qg.device)
    best = torch.empty(b, kv, g, len(rows), dtype=torch.float32, device=qg.device)
    entropy = torch.empty_like(best) if "entropy" in p.want else None
    sinks = _grouped_sinks(p, kv)
    step = _rows_per_block(b, kv * g, n, budget)
    for r0 in range(0, len(rows), step):
        block = rows[r0:r0 + step]
        contiguous = bool((block[1:] - block[:-1] == 1).all())
        q_block = qg[:, :, :, int(block[0]):int(block[-1]) + 1] if contiguous else qg[:, :, :, block]
        hi = int(block.max()) + 1 if p.causal else n
        scores = block_scores(q_block, k[:, :, :hi], block, 0, p)
        best[..., r0:r0 + len(block)], top1[..., r0:r0 + len(block)] = scores.max(-1)
        if entropy is not None:
            lse = lse_g[:, :, :, block]
            weighted = scores.nan_to_num(0.0, neginf=0.0)
            weighted *= scores.sub_(lse[..., None]).exp_()
            entropy[..., r0:r0 + len(block)] = lse - weighted.sum(-1)
            if sinks is not None:
                entropy[..., r0:r0 + len(block)] += _sink_entropy(lse, sinks)
    if "top1" in p.want:
        stats.top1 = _ungrouped(top1)
        stats.top1_prob = _ungrouped(torch.exp(best - lse_g[:, :, :, rows]))
    if entropy is not None:
        stats.entropy = _ungrouped(entropy)


def _column_sums(qg, k, lse_g, p: Problem, budget: int) -> Float[torch.Tensor, "b h nk"]:
    """Attention each key receives, summed over queries: a second pass over the scores that reuses the LSE."""
    b, kv, g, n, d = qg.shape
    colsum = torch.zeros(b, kv, g, n, dtype=torch.float32, device=qg.device)
    step = _rows_per_block(b, kv * g, n, budget)
    for start in range(0, n, step):
        end = min(n, start + step)
        lo, hi = key_range(start, end, n, p.causal, p.window)
        scores = block_scores(qg[:, :, :, start:end], k[:, :, lo:hi], torch.arange(start, end), lo, p)
        colsum[..., lo:hi] += scores.sub_(lse_g[:, :, :, start:end, None]).exp_().sum(-2)
    return _ungrouped(colsum)


def _blocked(q, k, v, p: Problem, budget: int):
    b, h, n_q, d = q.shape
    kv, n_k = k.shape[1], k.shape[2]
    offset = n_k - n_q
    qg = _grouped(q, kv)
    want = p.want

    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(b, kv, h // kv, *shape, dtype=dtype, device=q.device)

    out = zeros(n_q, d)
    lse = zeros(n_q)
    span_mass = zeros(n_q, len(p.spans)) if "span_mass" in want else None
    colsum = zeros(n_k) if "colsum" in want else None
    top1, top1_prob = (zeros(n_q, dtype=torch.long), zeros(n_q)) if "top1" in want else (None, None)
    entropy = zeros(n_q) if "entropy" in want else None
    membership = _span_membership(p, n_k, q.device) if span_mass is not None else None
    sinks = _grouped_sinks(p, kv)
    band = n_k if p.window is None else min(n_k, p.window)
    step = _rows_per_block(b, h, band + 64, budget)
    for start in range(0, n_q, step):
        end = min(n_q, start + step)
        lo, hi = key_range(offset + start, offset + end, n_k, p.causal, p.window)
        scores = block_scores(qg[:, :, :, start:end], k[:, :, lo:hi], torch.arange(offset + start, offset + end), lo, p)
        best, best_key = scores.max(-1)
        weighted = scores.nan_to_num(0.0, neginf=0.0) if entropy is not None else None
        probs = scores.sub_(best[..., None]).exp_()  # in place: scores are now exp(s - max)
        block_lse = best + probs.sum(-1).log()
        sink_entropy = 0.0
        if sinks is not None:
            block_lse = torch.logaddexp(block_lse, sinks)
            sink_entropy = _sink_entropy(block_lse, sinks)
        probs *= torch.exp(best - block_lse)[..., None]  # exact row softmax; hidden keys are 0
        out[..., start:end, :] = torch.matmul(probs, v[:, :, None, lo:hi].float())
        lse[..., start:end] = block_lse
        if top1 is not None:
            top1[..., start:end] = best_key + lo
            top1_prob[..., start:end] = torch.exp(best - block_lse)
        if entropy is not None:
            entropy[..., start:end] = block_lse - (probs * weighted).sum(-1) + sink_entropy
        if span_mass is not None:
            span_mass[..., start:end, :] = probs @ membership[lo:hi]
        if colsum is not None:
            colsum[..., lo:hi] += probs.sum(-2)
    rows = p.query_rows

    def rows_of(x):
        return None if x is None else _ungrouped(x[..., rows])

    stats = AttentionStats(
        lse=_ungrouped(lse) if "lse" in want else None, top1=rows_of(top1), top1_prob=rows_of(top1_prob),
        entropy=rows_of(entropy), span_mass=None if span_mass is None else _ungrouped(span_mass),
        colsum=None if colsum is None else _ungrouped(colsum), query_rows=rows, span_names=p.span_names,
    )
    return _ungrouped(out).to(q.dtype), stats


def _span_membership(p: Problem, n_k: int, device) -> Float[torch.Tensor, "nk s"]:
    member = torch.zeros(n_k, len(p.spans), dtype=torch.float32, device=device)
    for i, (start, end) in enumerate(p.spans):
        member[start:end, i] = 1.0
    return member
