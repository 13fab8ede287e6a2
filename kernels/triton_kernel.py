"""attention_with_stats in Triton: one fused forward kernel for out and every row statistic, and a second
kernel for column sums that reuses the saved log-sum-exp (as a FlashAttention backward does).

Forward, per (query block, batch x head): stream over key blocks keeping the running max m, the running sum
l = sum exp(s - m), acc = sum exp(s - m) v, t = sum exp(s - m) s (entropy = lse - t / l), the arg-max key
(top-1; its probability exp(m - lse) is 1 / l at the end) and, per span, sum exp(s - m) over the span's keys, computed
as p @ membership so all spans cost one small matmul. Everything rescales by exp(m_old - m_new).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from headlab.kernels.stats import AttentionStats, Problem

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scores(q, k_ptrs, k_pos, q_pos, n_k, scale, softcap, window,
            CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
            HEAD_D: tl.constexpr, d_mask):
    """Scaled (capped) scores of a query block against one key block; hidden keys are -inf."""
    k = tl.load(k_ptrs, mask=(k_pos[:, None] < n_k) & d_mask[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * scale
    if HAS_SOFTCAP:
        s = s / softcap
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s)) - 1.0)  # tanh
    visible = k_pos[None, :] < n_k
    if CAUSAL:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, Top1, Top1P, Ent, SpanMass, SpanStart, SpanEnd,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_q, n_k, H, GROUP, D, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    N_SPANS: tl.constexpr, SPAN_PAD: tl.constexpr, WANT_ENTROPY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    d_mask = offs_d < D
    q_pos = offs_m + (n_k - n_q)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < n_q) & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    arg_i = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    span_acc = tl.zeros([BLOCK_M, SPAN_PAD], tl.float32)
    offs_s = tl.arange(0, SPAN_PAD)
    if N_SPANS > 0:
        span_lo = tl.load(SpanStart + offs_s, mask=offs_s < N_SPANS, other=0)
        span_hi = tl.load(SpanEnd + offs_s, mask=offs_s < N_SPANS, other=0)

    first_q = pid_m * BLOCK_M + (n_k - n_q)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_q - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(first_q + BLOCK_M, n_k)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        k_ptrs = K + b * skb + kvh * skh + k_pos[:, None] * skn + offs_d[None, :] * skd
        s = _scores(q, k_ptrs, k_pos, q_pos, n_k, scale, softcap, window,
                    CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, HEAD_D, d_mask)
        block_max = tl.max(s, 1)
        block_arg = tl.argmax(s, 1).to(tl.int32) + start_n
        arg_i = tl.where(block_max > m_i, block_arg, arg_i)  # strict: the first maximum wins
        m_new = tl.maximum(m_i, block_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if WANT_ENTROPY:
            t_i = t_i * alpha + tl.sum(p * tl.where(s == float("-inf"), 0.0, s), 1)
        v = tl.load(V + b * svb + kvh * svh + k_pos[:, None] * svn + offs_d[None, :] * svd,
                    mask=(k_pos[:, None] < n_k) & d_mask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        if N_SPANS > 0:
            member = ((k_pos[:, None] >= span_lo[None, :]) & (k_pos[:, None] < span_hi[None, :])).to(tl.float32)
            span_acc = span_acc * alpha[:, None] + tl.dot(p, member)
        m_i = m_new

    row_ok = offs_m < n_q
    l_i = tl.where(row_ok, l_i, 1.0)  # padding rows beyond n_q: keep their (unstored) numbers finite
    lse = m_i + tl.log(l_i)
    row = b * H * n_q + h * n_q + offs_m
    out = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
    tl.store(Lse + row, lse, mask=row_ok)
    tl.store(Top1 + row, arg_i, mask=row_ok)
    tl.store(Top1P + row, 1.0 / l_i, mask=row_ok)  # exp(m - lse) with m the top score
    if WANT_ENTROPY:
        tl.store(Ent + row, lse - t_i / l_i, mask=row_ok)
    if N_SPANS > 0:
        mass = span_acc / l_i[:, None]
        tl.store(SpanMass + row[:, None] * N_SPANS + offs_s[None, :], mass,
                 mask=row_ok[:, None] & (offs_s[None, :] < N_SPANS))


@triton.jit
def _column_sum_kernel(
    Q, K, Lse, ColSum,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    n_q, n_k, H, GROUP, D, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
):
    """Per (key block, batch x head): sum over queries of exp(s - lse_query)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    d_mask = offs_d < D
    k_ptrs = K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    total = tl.zeros([BLOCK_N], tl.float32)
    offset = n_k - n_q
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    hi = n_q
    if HAS_WINDOW:
        hi = tl.minimum(pid_n * BLOCK_N + BLOCK_N + window - 1 - offset, n_q)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=(rows[:, None] < n_q) & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(Lse + b * H * n_q + h * n_q + rows, mask=rows < n_q, other=float("inf"))
        s = _scores(q, k_ptrs, offs_n, rows + offset, n_k, scale, softcap, window,
                    CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, HEAD_D, d_mask)
        p = tl.exp(s - lse[:, None])
        total += tl.sum(tl.where(rows[:, None] < n_q, p, 0.0), 0)
    tl.store(ColSum + b * H * n_k + h * n_k + offs_n, total, mask=offs_n < n_k)


def attention_with_stats_triton(q, k, v, p: Problem, block_m: int = 64, block_n: int = 64):
    """(out, AttentionStats) from the Triton kernels; see headlab.kernels.attention_with_stats."""
    b, h, n_q, d = q.shape
    kv, n_k = k.shape[1], k.shape[2]
    head_d = max(16, triton.next_power_of_2(d))
    upcast = INTERPRETED or q.dtype == torch.float32  # the interpreter's tl.dot is wrong on bf16
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    top1 = torch.empty(b, h, n_q, dtype=torch.int32, device=q.device)
    top1_prob = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    want_entropy = "entropy" in p.want
    entropy = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device) if want_entropy else lse
    n_spans = len(p.spans) if "span_mass" in p.want else 0
    span_mass = torch.empty(b, h, n_q, max(1, n_spans), dtype=torch.float32, device=q.device)
    span_start = torch.tensor([s for s, _ in p.spans] or [0], dtype=torch.int32, device=q.device)
    span_end = torch.tensor([e for _, e in p.spans] or [0], dtype=torch.int32, device=q.device)
    flags = dict(CAUSAL=p.causal, HAS_WINDOW=p.window is not None, HAS_SOFTCAP=p.softcap is not None, UPCAST=upcast)
    window = p.window or 0
    softcap = p.softcap or 1.0
    grid = (triton.cdiv(n_q, block_m), b * h)
    _forward_kernel[grid](
        q, k, v, out, lse, top1, top1_prob, entropy, span_mass, span_start, span_end,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        n_q, n_k, h, h // kv, d, p.scale, softcap, window,
        N_SPANS=n_spans, SPAN_PAD=max(16, triton.next_power_of_2(max(1, n_spans))), WANT_ENTROPY=want_entropy,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=head_d, **flags,
    )
    rows = p.query_rows.to(q.device)
    stats = AttentionStats(lse=lse if "lse" in p.want else None, query_rows=p.query_rows, span_names=p.span_names)
    if "top1" in p.want:
        stats.top1 = top1[:, :, rows].long()
        stats.top1_prob = top1_prob[:, :, rows]
    if want_entropy:
        stats.entropy = entropy[:, :, rows]
    if n_spans:
        stats.span_mass = span_mass
    if "colsum" in p.want:
        colsum = torch.empty(b, h, n_k, dtype=torch.float32, device=q.device)
        _column_sum_kernel[(triton.cdiv(n_k, block_n), b * h)](
            q, k, lse, colsum, *q.stride(), *k.stride(),
            n_q, n_k, h, h // kv, d, p.scale, softcap, window,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=head_d, **flags,
        )
        stats.colsum = colsum
    return out, stats
