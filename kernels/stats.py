"""The statistics attention_with_stats returns, and the argument checks both backends share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int

from .errors import KernelInputError

STATISTICS = ("lse", "top1", "span_mass", "entropy", "colsum")
DEFAULT_WANT = ("lse", "top1", "span_mass")


@dataclass
class AttentionStats:
    """Per-head attention statistics of one layer; fields not asked for are None.

    Row statistics (top1, top1_prob, entropy) cover the queries in `query_rows`; the rest cover all queries.
    With learned sink logits (`Problem.sinks`) each row's softmax runs over its keys and the head's sink: the LSE
    includes the sink, the weights on the keys sum to 1 - exp(sink - lse), top1 is a key (never the sink), span mass
    and column sums count keys only, and the entropy is that of the whole distribution, keys and sink.
    """

    lse: Float[torch.Tensor, "b h nq"] | None = None  # log-sum-exp of the (scaled, capped) scores and the sink
    top1: Int[torch.Tensor, "b h r"] | None = None  # the key each query attends to most
    top1_prob: Float[torch.Tensor, "b h r"] | None = None  # its attention weight
    entropy: Float[torch.Tensor, "b h r"] | None = None  # of the attention row (and the sink), in nats
    span_mass: Float[torch.Tensor, "b h nq s"] | None = None  # attention on each named key span
    colsum: Float[torch.Tensor, "b h nk"] | None = None  # attention each key receives, summed over queries
    query_rows: Int[torch.Tensor, "r"] | None = None
    span_names: list[str] = field(default_factory=list)
    sinks: Float[torch.Tensor, "h"] | None = None  # the learned sink logits the statistics include (None: no sinks)

    @property
    def sink_mass(self) -> Float[torch.Tensor, "b h nq"] | None:
        """The weight each query gives its head's learned sink, exp(sink - lse); None without sinks (or lse)."""
        if self.sinks is None or self.lse is None:
            return None
        return torch.exp(self.sinks.to(self.lse.device)[:, None] - self.lse)


@dataclass(frozen=True)
class Problem:
    """Checked arguments of one attention_with_stats call."""

    causal: bool
    window: int | None
    scale: float
    softcap: float | None
    spans: list[tuple[int, int]]
    span_names: list[str]
    want: frozenset[str]
    query_rows: torch.Tensor  # [r] indices into the nq queries
    sinks: torch.Tensor | None = None  # [h] fp32 learned sink logit per query head (gpt-oss), None: no sink

    @property
    def row_stats(self) -> bool:
        return bool({"top1", "entropy"} & self.want)

    def logits(self, raw: Float[torch.Tensor, "..."]) -> Float[torch.Tensor, "..."]:
        """Attention logits from raw products q . k: scaled, then capped (softcap * tanh(s / softcap))."""
        scores = raw.float() * self.scale
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def probs(self, logits: Float[torch.Tensor, "... h nq nk"]) -> Float[torch.Tensor, "... h nq nk"]:
        """Attention weights of the keys from logits (hidden keys -inf): the softmax of each row, with each head's
        learned sink in the normaliser when there are sinks (it has no value: a row then sums to less than 1)."""
        if self.sinks is None:
            return logits.softmax(-1)
        sink = self.sinks.to(logits.dtype).view(-1, 1, 1).expand(*logits.shape[:-1], 1)
        return torch.cat([logits, sink], -1).softmax(-1)[..., :-1]


def expand_kv(x: Float[torch.Tensor, "b kv ..."], n_heads: int) -> Float[torch.Tensor, "b h ..."]:
    """Keys or values per query head: query head h reads KV head h // (n_heads // kv)."""
    group = n_heads // x.shape[1]
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def check_problem(q, k, v, *, causal, window, scale, softcap, spans, want, query_rows, sinks=None) -> Problem:
    """Validate shapes, dtypes, devices, spans and options; one KernelInputError sentence per fault."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise KernelInputError(f"{name} must be a 4-d tensor [batch, heads, n, d], got "
                                   f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise KernelInputError(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelInputError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise KernelInputError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, n_q, d = q.shape
    if k.shape != v.shape[:3] + (d,) or k.shape[0] != b or v.shape[:3] != k.shape[:3]:
        raise KernelInputError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [batch, kv_heads, n, d] "
                               f"matching q {tuple(q.shape)}")
    kv, n_k = k.shape[1], k.shape[2]
    if h % kv:
        raise KernelInputError(f"query heads ({h}) must be a multiple of key/value heads ({kv})")
    if n_q > n_k or n_q == 0:
        raise KernelInputError(f"there are {n_q} queries and {n_k} keys; queries are the last 1..{n_k} positions")
    if window is not None and (not causal or window < 1):
        raise KernelInputError(f"a sliding window ({window}) needs causal attention and a size of at least 1")
    if softcap is not None and softcap <= 0:
        raise KernelInputError(f"softcap must be positive, got {softcap}")
    want = frozenset(DEFAULT_WANT if want is None else ([want] if isinstance(want, str) else want))
    unknown = want - set(STATISTICS)
    if unknown:
        raise KernelInputError(f"unknown statistics {sorted(unknown)}; choose from {', '.join(STATISTICS)}")
    names, ranges = [], []
    items = spans.items() if isinstance(spans, dict) else enumerate(spans or [])
    for name, span in items:
        start, end = (int(x) for x in span)
        if not 0 <= start < end <= n_k:
            raise KernelInputError(f"span {name!r} = [{start}, {end}) is outside the keys [0, {n_k}) or empty")
        names.append(str(name))
        ranges.append((start, end))
    if "span_mass" in want and not ranges:
        want = want - {"span_mass"}
    if query_rows is None:
        rows = torch.arange(n_q)
    else:
        rows = torch.as_tensor(list(query_rows) if isinstance(query_rows, range) else query_rows, dtype=torch.long)
        rows = torch.where(rows < 0, rows + n_q, rows).flatten()
        if rows.numel() == 0 or rows.min() < 0 or rows.max() >= n_q:
            raise KernelInputError(f"query_rows must index the {n_q} queries (negative counts from the end)")
    return Problem(causal=causal, window=window, scale=d ** -0.5 if scale is None else float(scale),
                   softcap=softcap, spans=ranges, span_names=names, want=want, query_rows=rows,
                   sinks=_check_sinks(sinks, h, q.device))


def _check_sinks(sinks, n_heads: int, device) -> torch.Tensor | None:
    """Learned sink logits (finite, like q and k: not checked, which would wait for the device) as a detached fp32
    [heads] tensor on q's device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or sinks.shape != (n_heads,) or not sinks.is_floating_point():
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise KernelInputError(f"sinks must be a float tensor of one logit per query head [{n_heads}], got {shape}")
    if sinks.device != device:
        raise KernelInputError(f"sinks are on {sinks.device} and q on {device}; put them on one device")
    return sinks.detach().float()
