"""attention_with_stats in Triton: a fused forward kernel for out and the row statistics, and two kernels that
reuse its log-sum-exp (as a FlashAttention backward does) for span mass and column sums.

Forward, per (query tile, batch x head), streaming over key tiles with an online softmax:
    s    = q k^T * scale * log2(e)        (capped: softcap * log2(e) * tanh(q k^T * scale / softcap))
    m    = running row max of s;  p = 2^(s - m);  the sums below are rescaled by 2^(m_old - m_new)
    l    = sum p                           lse = ln(2) * (m + log2 l);  top-1 probability = 1 / l
    acc  = sum p v                         out = acc / l
    t    = sum p s                         entropy = ln(2) * (m + log2 l - t / l)
    top1 = the first key that reaches m
    sink (learned, per head): after the key tiles, one more term of the softmax with no value: m, l, acc and t are
                           rescaled to max(m, sink) and l, t gain its term; top1 stays the best key (its running
                           max is kept apart from m), its probability 2^(top - m) / l
Span mass, per (query tile, batch x head): for each span, the sum over its keys of 2^(s - lse log2 e); only the
spans' key tiles are visited.
Column sums, per (key tile, batch x head): the sum over queries of 2^(s - lse log2 e).

Scores live in base 2 (the exp2 instruction) with log2(e) folded into the scale; every statistic is returned in
natural-log units. Tiles that every query (key) of the program's tile sees run without a mask; only the tiles on
the mask's edges (the causal diagonal, the ends of a sliding window, the ragged ends of the sequences) pay for one.
Batch and head offsets, sequence offsets and rows of the statistics are 64-bit: batch x heads x 1M tokens
overflows 32 bits. Launch configurations come from launch.py; compile_check.py compiles them for sm_80 and sm_90
and checks registers, spills and shared memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import LaunchConfig, launch_config
from .stats import AttentionStats, Problem

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# fp32 inputs: tf32x3 (three tf32 products per dot) keeps fp32 accuracy on the tensor cores where plain tf32 rounds
# the inputs to 11 bits; the interpreter multiplies in fp32 and knows only ieee. 16-bit inputs ignore it.
FP32_DOT = "ieee" if INTERPRETED else "tf32x3"

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _heads(pid_bh, H, GROUP):
    """Batch, query head and key/value head of a program (64-bit, for the offsets built from them)."""
    b = pid_bh // H
    h = pid_bh % H
    return b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)


@triton.jit
def _load_tile(base, first_row, n_rows, stride_row, stride_d, MASKED: tl.constexpr, UPCAST: tl.constexpr,
               ROWS: tl.constexpr, HEAD_D: tl.constexpr, D_BLOCK: tl.constexpr):
    """Rows first_row .. first_row + ROWS of a [rows, HEAD_D] matrix as a [ROWS, D_BLOCK] tile, zero past the
    head dim and (MASKED tiles only) past n_rows."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, D_BLOCK)
    ptrs = base + tl.cast(first_row, tl.int64) * stride_row + rows[:, None] * stride_row + cols[None, :] * stride_d
    if MASKED:
        tile = tl.load(ptrs, mask=(first_row + rows[:, None] < n_rows) & (cols[None, :] < HEAD_D), other=0.0)
    elif HEAD_D < D_BLOCK:
        tile = tl.load(ptrs, mask=cols[None, :] < HEAD_D, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:  # fp32 inputs, and the interpreter (whose tl.dot cannot multiply bf16)
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _scores(q, k, q_pos, k_pos, n_k, scale, softcap, window,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            PRECISION: tl.constexpr):
    """Scores of a query tile against a key tile in base 2 (capped); in MASKED tiles keys at or past n_k and keys
    the mask hides are -inf."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if HAS_SOFTCAP:  # softcap * tanh(x), x = qk * scale / softcap, tanh(x) = 2 / (1 + e^(-2x)) - 1
        s = (softcap * LOG2E) * (2.0 / (1.0 + tl.math.exp2(qk * (-2.0 * LOG2E * scale / softcap))) - 1.0)
    else:
        s = qk * (scale * LOG2E)
    if MASKED:
        visible = k_pos[None, :] < n_k
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _tile_ranges(touch_lo, touch_hi, all_lo, all_hi, n, BLOCK: tl.constexpr):
    """Tiles of BLOCK positions over [0, n) for one tile of the other sequence, which sees [touch_lo, touch_hi)
    in part and [all_lo, all_hi) entirely: tiles from lo to hi touch what it sees, those from full_lo to full_hi
    lie inside what it sees entirely. lo <= full_lo <= full_hi are multiples of BLOCK; hi may end mid-tile."""
    lo = (tl.maximum(touch_lo, 0) // BLOCK) * BLOCK
    hi = tl.minimum(touch_hi, n)
    full_lo = tl.minimum(tl.cdiv(tl.maximum(all_lo, 0), BLOCK) * BLOCK, (hi // BLOCK) * BLOCK)
    full_hi = tl.maximum((tl.minimum(all_hi, n) // BLOCK) * BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _keys_seen(start_m, n_q, n_k, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for the query tile at row start_m (see _tile_ranges); queries are the last n_q of n_k positions."""
    first_q = start_m + n_k - n_q
    last_q = tl.minimum(start_m + BLOCK_M, n_q) - 1 + n_k - n_q  # the last real query
    touch_lo, touch_hi, all_lo, all_hi = 0, n_k, 0, n_k
    if CAUSAL:
        touch_hi, all_hi = last_q + 1, first_q + 1
    if HAS_WINDOW:
        touch_lo, all_lo = first_q - window + 1, last_q - window + 1
    return _tile_ranges(touch_lo, touch_hi, all_lo, all_hi, n_k, BLOCK_N)


@triton.jit
def _queries_seeing(start_n, n_q, n_k, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles (rows) for the key tile at start_n (see _tile_ranges)."""
    offset = n_k - n_q
    last_k = tl.minimum(start_n + BLOCK_N, n_k) - 1  # the last real key
    touch_lo, touch_hi, all_lo, all_hi = 0, n_q, 0, n_q
    if CAUSAL:
        touch_lo, all_lo = start_n - offset, last_k - offset
    if HAS_WINDOW:
        touch_hi, all_hi = last_k + window - offset, start_n + window - offset
    return _tile_ranges(touch_lo, touch_hi, all_lo, all_hi, n_q, BLOCK_M)


@triton.jit
def _attend(acc, m_i, l_i, t_i, arg_i, q, k_base, v_base, start_n, q_pos, n_k, skn, skd, svn, svd,
            scale, softcap, window,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr, WANT_ENTROPY: tl.constexpr,
            BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_BLOCK: tl.constexpr):
    """One key tile of the online softmax: the running sums rescaled to the new max, then this tile added."""
    k = _load_tile(k_base, start_n, n_k, skn, skd, MASKED, UPCAST, BLOCK_N, HEAD_D, D_BLOCK)
    s = _scores(q, k, q_pos, start_n + tl.arange(0, BLOCK_N), n_k, scale, softcap, window,
                MASKED, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
    tile_max = tl.max(s, 1)
    arg_i = tl.where(tile_max > m_i, tl.argmax(s, 1).to(tl.int32) + start_n, arg_i)  # strict: first max wins
    m_new = tl.maximum(m_i, tile_max)
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    else:
        m_new_safe = m_new
    alpha = tl.math.exp2(m_i - m_new_safe)
    p = tl.math.exp2(s - m_new_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if WANT_ENTROPY:
        if MASKED:
            s = tl.where(s == float("-inf"), 0.0, s)  # p is 0 there; 0 * -inf would be nan
        t_i = t_i * alpha + tl.sum(p * s, 1)
    v = _load_tile(v_base, start_n, n_k, svn, svd, MASKED, UPCAST, BLOCK_N, HEAD_D, D_BLOCK)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i, t_i, arg_i


@triton.jit
def _forward_kernel(
    Q, K, V, Sinks, Out, Lse, Top1, Top1P, Ent,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    n_q, n_k, H, GROUP, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, WANT_ENTROPY: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, D_BLOCK: tl.constexpr,
):
    # the last query tiles see the most keys (causal): they start first, the short ones fill the tail
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h, kvh = _heads(pid_bh, H, GROUP)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_pos = offs_m + n_k - n_q  # the queries are the last n_q of the n_k positions
    q = _load_tile(Q + b * sqb + h * sqh, start_m, n_q, sqn, sqd, True, UPCAST, BLOCK_M, HEAD_D, D_BLOCK)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    arg_i = tl.zeros([BLOCK_M], tl.int32)
    acc = tl.zeros([BLOCK_M, D_BLOCK], tl.float32)

    lo, full_lo, full_hi, hi = _keys_seen(start_m, n_q, n_k, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:  # the start of the window
        for start_n in range(lo, full_lo, BLOCK_N):
            acc, m_i, l_i, t_i, arg_i = _attend(
                acc, m_i, l_i, t_i, arg_i, q, k_base, v_base, start_n, q_pos, n_k, skn, skd, svn, svd,
                scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, PRECISION, WANT_ENTROPY,
                BLOCK_N, HEAD_D, D_BLOCK)
    for start_n in range(full_lo, full_hi, BLOCK_N):  # keys every query of the tile sees
        acc, m_i, l_i, t_i, arg_i = _attend(
            acc, m_i, l_i, t_i, arg_i, q, k_base, v_base, start_n, q_pos, n_k, skn, skd, svn, svd,
            scale, softcap, window, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, PRECISION, WANT_ENTROPY,
            BLOCK_N, HEAD_D, D_BLOCK)
    for start_n in range(full_hi, hi, BLOCK_N):  # the causal diagonal and the ragged end of the keys
        acc, m_i, l_i, t_i, arg_i = _attend(
            acc, m_i, l_i, t_i, arg_i, q, k_base, v_base, start_n, q_pos, n_k, skn, skd, svn, svd,
            scale, softcap, window, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, PRECISION, WANT_ENTROPY,
            BLOCK_N, HEAD_D, D_BLOCK)

    top_i = m_i  # the best key's score
    if HAS_SINKS:  # the sink's term: the sums rescaled to max(m, sink), then the sink added (it has no value)
        sink = tl.load(Sinks + h) * LOG2E
        m_new = tl.maximum(m_i, sink)
        alpha = tl.math.exp2(m_i - m_new)
        p_sink = tl.math.exp2(sink - m_new)
        l_i = l_i * alpha + p_sink
        t_i = t_i * alpha + p_sink * sink
        acc = acc * alpha[:, None]
        m_i = m_new

    row_ok = offs_m < n_q
    l_i = tl.where(row_ok, l_i, 1.0)  # padding rows beyond n_q: keep their (unstored) numbers finite
    log2_l = tl.math.log2(l_i)
    offs_d = tl.arange(0, D_BLOCK)
    out_ptrs = (Out + b * sob + h * soh + tl.cast(start_m, tl.int64) * son
                + tl.arange(0, BLOCK_M)[:, None] * son + offs_d[None, :] * sod)
    tl.store(out_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D))
    row = pid_bh.to(tl.int64) * n_q + offs_m  # into the [batch, heads, n_q] statistics
    tl.store(Lse + row, (m_i + log2_l) * LN2, mask=row_ok)
    tl.store(Top1 + row, arg_i, mask=row_ok)
    if HAS_SINKS:
        tl.store(Top1P + row, tl.math.exp2(top_i - m_i) / l_i, mask=row_ok)
    else:
        tl.store(Top1P + row, 1.0 / l_i, mask=row_ok)  # 2^(m - log2 l) with m the top score
    if WANT_ENTROPY:
        tl.store(Ent + row, (m_i + log2_l - t_i / l_i) * LN2, mask=row_ok)


@triton.jit
def _span_mass_kernel(
    Q, K, Lse, SpanMass, SpanStart, SpanEnd,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    n_q, n_k, H, GROUP, scale, softcap, window, n_spans,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    """Per (query tile, batch x head): for each span, the attention on its keys, sum of exp(s - lse)."""
    start_m = tl.program_id(0) * BLOCK_M
    pid_bh = tl.program_id(1)
    b, h, kvh = _heads(pid_bh, H, GROUP)
    k_base = K + b * skb + kvh * skh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    q = _load_tile(Q + b * sqb + h * sqh, start_m, n_q, sqn, sqd, True, UPCAST, BLOCK_M, HEAD_D, D_BLOCK)
    row = pid_bh.to(tl.int64) * n_q + offs_m
    lse = tl.load(Lse + row, mask=row_ok, other=float("inf"))  # rows past n_q: p = 0
    lo, _, _, hi = _keys_seen(start_m, n_q, n_k, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for j in range(0, n_spans):
        span_lo = tl.maximum(tl.load(SpanStart + j), lo)
        span_hi = tl.minimum(tl.load(SpanEnd + j), hi)
        mass = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(span_lo, span_hi, BLOCK_N):  # keys at or past span_hi are masked like those past n_k
            k = _load_tile(k_base, start_n, span_hi, skn, skd, True, UPCAST, BLOCK_N, HEAD_D, D_BLOCK)
            s = _scores(q, k, offs_m + n_k - n_q, start_n + tl.arange(0, BLOCK_N), span_hi, scale, softcap, window,
                        True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
            mass += tl.sum(tl.math.exp2(s - lse[:, None] * LOG2E), 1)
        tl.store(SpanMass + row * n_spans + j, mass, mask=row_ok)


@triton.jit
def _column_tile(q_base, lse_base, start_m, k, k_pos, n_q, n_k, sqn, sqd, scale, softcap, window,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, D_BLOCK: tl.constexpr):
    """One query tile's attention on each key of the key tile, summed over the queries."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(q_base, start_m, n_q, sqn, sqd, MASKED, UPCAST, BLOCK_M, HEAD_D, D_BLOCK)
    if MASKED:  # rows past n_q: lse = inf, so p = 0
        lse = tl.load(lse_base + rows, mask=rows < n_q, other=float("inf"))
    else:
        lse = tl.load(lse_base + rows)
    s = _scores(q, k, rows + n_k - n_q, k_pos, n_k, scale, softcap, window,
                MASKED, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
    return tl.sum(tl.math.exp2(s - lse[:, None] * LOG2E), 0)


@triton.jit
def _column_sum_kernel(
    Q, K, Lse, ColSum,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    n_q, n_k, H, GROUP, scale, softcap, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    D_BLOCK: tl.constexpr,
):
    """Per (key tile, batch x head): the sum over queries of exp(s - lse_query)."""
    start_n = tl.program_id(0) * BLOCK_N
    pid_bh = tl.program_id(1)
    b, h, kvh = _heads(pid_bh, H, GROUP)
    q_base = Q + b * sqb + h * sqh
    lse_base = Lse + pid_bh.to(tl.int64) * n_q
    k_pos = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + b * skb + kvh * skh, start_n, n_k, skn, skd, True, UPCAST, BLOCK_N, HEAD_D, D_BLOCK)
    total = tl.zeros([BLOCK_N], tl.float32)

    lo, full_lo, full_hi, hi = _queries_seeing(start_n, n_q, n_k, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for start_m in range(lo, full_lo, BLOCK_M):  # the causal diagonal
        total += _column_tile(q_base, lse_base, start_m, k, k_pos, n_q, n_k, sqn, sqd, scale, softcap, window,
                              True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_M, HEAD_D, D_BLOCK)
    for start_m in range(full_lo, full_hi, BLOCK_M):  # queries that see every key of the tile
        total += _column_tile(q_base, lse_base, start_m, k, k_pos, n_q, n_k, sqn, sqd, scale, softcap, window,
                              False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_M, HEAD_D, D_BLOCK)
    for start_m in range(full_hi, hi, BLOCK_M):  # the end of the window and the ragged end of the queries
        total += _column_tile(q_base, lse_base, start_m, k, k_pos, n_q, n_k, sqn, sqd, scale, softcap, window,
                              True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_M, HEAD_D, D_BLOCK)
    tl.store(ColSum + pid_bh.to(tl.int64) * n_k + k_pos, total, mask=k_pos < n_k)


def attention_with_stats_triton(q, k, v, p: Problem, configs: dict[str, LaunchConfig] | None = None):
    """(out, AttentionStats) from the Triton kernels; see headlab.kernels.attention_with_stats.

    configs: {kernel name: LaunchConfig} overriding launch.py's table (for tuning and tests)."""
    b, h, n_q, d = q.shape
    kv, n_k = k.shape[1], k.shape[2]
    d_block = max(16, triton.next_power_of_2(d))
    config = {name: launch_config(name, d_block, q.dtype) for name in ("forward", "span_mass", "column_sum")}
    config.update(configs or {})
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    top1 = torch.empty(b, h, n_q, dtype=torch.int32, device=q.device)
    top1_prob = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device)
    want_entropy = "entropy" in p.want
    entropy = torch.empty(b, h, n_q, dtype=torch.float32, device=q.device) if want_entropy else lse
    geometry = (n_q, n_k, h, h // kv, p.scale, p.softcap or 1.0, p.window or 0)
    flags = dict(CAUSAL=p.causal, HAS_WINDOW=p.window is not None, HAS_SOFTCAP=p.softcap is not None,
                 UPCAST=INTERPRETED or q.dtype == torch.float32, PRECISION=FP32_DOT, HEAD_D=d, D_BLOCK=d_block)

    def launch(kernel, name, grid_rows, *args, **constants):
        c = config[name]
        grid = (triton.cdiv(grid_rows, c.block_n if name == "column_sum" else c.block_m), b * h)
        kernel[grid](*args, BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages,
                     **constants, **flags)

    sinks = lse if p.sinks is None else p.sinks.contiguous()  # without sinks: any pointer, never read
    launch(_forward_kernel, "forward", n_q, q, k, v, sinks, out, lse, top1, top1_prob, entropy,
           *q.stride(), *k.stride(), *v.stride(), *out.stride(), *geometry, WANT_ENTROPY=want_entropy,
           HAS_SINKS=p.sinks is not None)
    rows = p.query_rows.to(q.device)
    stats = AttentionStats(lse=lse if "lse" in p.want else None, query_rows=p.query_rows, span_names=p.span_names)
    if "top1" in p.want:
        stats.top1 = top1[:, :, rows].long()
        stats.top1_prob = top1_prob[:, :, rows]
    if want_entropy:
        stats.entropy = entropy[:, :, rows]
    if "span_mass" in p.want:
        stats.span_mass = torch.empty(b, h, n_q, len(p.spans), dtype=torch.float32, device=q.device)
        span_start = torch.tensor([s for s, _ in p.spans], dtype=torch.int32, device=q.device)
        span_end = torch.tensor([e for _, e in p.spans], dtype=torch.int32, device=q.device)
        launch(_span_mass_kernel, "span_mass", n_q, q, k, lse, stats.span_mass, span_start, span_end,
               *q.stride(), *k.stride(), *geometry, len(p.spans))
    if "colsum" in p.want:
        stats.colsum = torch.empty(b, h, n_k, dtype=torch.float32, device=q.device)
        launch(_column_sum_kernel, "column_sum", n_k, q, k, lse, stats.colsum, *q.stride(), *k.stride(), *geometry)
    return out, stats
