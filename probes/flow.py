"""Attention rollout and attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Both start from the residual-augmented attention of each layer, A' = (1 - r) A + r I with r = 0.5 (heads fused
by mean, max or min; rows renormalised):
- rollout: the product A'_L ... A'_1 (from a start layer up): row o gives every input token's share in output o;
- flow: the layered graph of the paper (layer 0 holds the input tokens; the edge from token a in layer l to token b
  in layer l - 1 has capacity A'_l[a, b]); the max-flow value from output node (L, o) to each input node (0, t),
  normalised per output node.

Max flow runs in compiled code (numba, `headlab[flow]`; without it the same code runs as plain Python, far slower):
Dinic's algorithm with exact float capacities on the pair's own subgraph (for causal models only tokens t..o can
carry flow from o to t), all (o, t) pairs in parallel.

    patterns = attention_patterns(model, text)                 # [L, H, n, n]
    flow_relevance = flow(patterns, outputs=[-1])              # [1, n]
    scan(model, texts) -> HeadScores (how much each head's attention agrees with the flow)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from headlab import hooks
from headlab.data import haystack_sentences
from headlab.errors import InputError, UnsupportedModelError
from headlab.probe import Probe, Unit, iter_partials
from headlab.scores import HeadScores
from headlab.uncertainty import intervals, method
from headlab.stats import pearson, spearman  # noqa: F401 - spearman: part of this module's API (studies)

FUSIONS = ("mean", "max", "min")
EPS = 1e-12  # residual capacity below this is saturated


# ---- inputs -------------------------------------------------------------------------------------------------

def check_attention(attentions, tol: float = 1e-4) -> torch.Tensor:
    """Attention of one sequence as float64 [L, H, n, n] (a [L, n, n] input gets H = 1); rows must be
    stochastic within `tol`."""
    if isinstance(attentions, (list, tuple)):
        shapes = {tuple(a.shape) for a in attentions}
        if len(shapes) != 1:
            raise InputError(f"the layers' attention tensors have different shapes {sorted(shapes)}")
        attentions = torch.stack([torch.as_tensor(a) for a in attentions])
    a = torch.as_tensor(attentions).double()
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim == 5 and a.shape[1] == 1:
        a = a[:, 0]  # [L, batch=1, H, n, n]
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise InputError(f"attention must be [layers, heads, n, n] for one sequence, got {tuple(a.shape)}")
    sums = a.sum(-1)
    worst = float((sums - 1).abs().max())
    if worst > tol or bool((a < -tol).any()):
        raise InputError(f"attention rows must be non-negative and sum to 1 (worst row sum is off by {worst:.2g}); "
                         "pass softmax probabilities, not scores")
    return a


def residual_attention(attentions, *, fuse: str = "mean", residual: float = 0.5, discard_ratio: float = 0.0
                       ) -> Float[torch.Tensor, "L n n"]:
    """A' per layer: heads fused, optionally the smallest `discard_ratio` of each row's weights dropped (the ViT
    variant, per row), then (1 - residual) A + residual I with rows renormalised (over keys, the last axis)."""
    a = check_attention(attentions)
    if fuse not in FUSIONS:
        raise InputError(f"unknown head fusion {fuse!r}; use one of {', '.join(FUSIONS)}")
    if not 0 <= residual <= 1 or not 0 <= discard_ratio < 1:
        raise InputError(f"residual must lie in [0, 1] and discard_ratio in [0, 1), got {residual}, {discard_ratio}")
    fused = {"mean": a.mean(1), "max": a.amax(1), "min": a.amin(1)}[fuse]
    if discard_ratio > 0:
        n = fused.shape[-1]
        k = int(discard_ratio * n)
        if k:
            drop = fused.topk(k, dim=-1, largest=False).indices
            fused = fused.scatter(-1, drop, 0.0)
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype)
    augmented = (1 - residual) * fused + residual * eye
    return augmented / augmented.sum(-1, keepdim=True)


def _outputs(outputs, n: int) -> list[int]:
    if outputs is None:
        return list(range(n))
    rows = [int(o) + n if int(o) < 0 else int(o) for o in ([outputs] if isinstance(outputs, int) else outputs)]
    if not rows or any(not 0 <= o < n for o in rows):
        raise InputError(f"output positions {outputs} are outside the sequence of {n} tokens")
    return rows


# ---- rollout ------------------------------------------------------------------------------------------------

def rollout(attentions, *, outputs=None, start_layer: int = 0, fuse: str = "mean", residual: float = 0.5,
            discard_ratio: float = 0.0) -> Float[torch.Tensor, "out n"]:
    """Rows of A'_{L-1} ... A'_{start_layer} for `outputs` (default all positions)."""
    augmented = residual_attention(attentions, fuse=fuse, residual=residual, discard_ratio=discard_ratio)
    if not 0 <= start_layer < augmented.shape[0]:
        raise InputError(f"start_layer {start_layer} is outside the {augmented.shape[0]} layers")
    product = augmented[start_layer]
    for layer in range(start_layer + 1, augmented.shape[0]):
        product = augmented[layer] @ product
    return product[_outputs(outputs, product.shape[0])]


# ---- flow ---------------------------------------------------------------------------------------------------

def _compiled():
    """The numba kernels, compiled on first use (cached on disk)."""
    global _max_flow_pairs
    if _max_flow_pairs is None:
        _max_flow_pairs = _build_kernels()
    return _max_flow_pairs


_max_flow_pairs = None


def _build_kernels():
    try:
        from numba import njit, prange
    except ImportError:  # numba is optional (headlab[flow]): the same code as plain Python, same values, far slower
        def njit(**options):
            return lambda function: function

        prange = range

    @njit(cache=True)
    def max_flow(cap, o, t, lo, hi):
        """Dinic on the layered graph: source (L, o), sink (0, t), tokens lo..hi-1; cap[l, a, b] is the edge
        (l+1, a) -> (l, b). Returns the max-flow value."""
        n_layers = cap.shape[0]
        m = hi - lo
        flow = np.zeros((n_layers, m, m))
        level = np.empty((n_layers + 1, m), np.int64)
        arc = np.empty((n_layers + 1, m), np.int64)
        queue = np.empty((n_layers + 1) * m, np.int64)
        path = np.empty(4 * (n_layers + 1) * m + 8, np.int64)
        source, sink = n_layers * m + (o - lo), t - lo
        total = 0.0
        while True:
            level[:, :] = -1
            level[n_layers, o - lo] = 0
            head, tail = 0, 1
            queue[0] = source
            while head < tail:  # BFS levels over the residual graph
                u = queue[head]
                head += 1
                layer, a = u // m, u % m
                if layer > 0:
                    for b in range(m):
                        if layer == 1 and b != sink:
                            continue
                        if level[layer - 1, b] < 0 and cap[layer - 1, lo + a, lo + b] - flow[layer - 1, a, b] > EPS:
                            level[layer - 1, b] = level[layer, a] + 1
                            queue[tail] = (layer - 1) * m + b
                            tail += 1
                if layer < n_layers:
                    for c in range(m):
                        if level[layer + 1, c] < 0 and flow[layer, c, a] > EPS:
                            level[layer + 1, c] = level[layer, a] + 1
                            queue[tail] = (layer + 1) * m + c
                            tail += 1
            if level[0, sink] < 0:
                return total
            arc[:, :] = 0
            depth = 0
            path[0] = source
            while True:  # blocking flow: advance along admissible arcs, augment at the sink, retreat at dead ends
                u = path[depth]
                layer, a = u // m, u % m
                if layer == 0 and a == sink:
                    bottleneck = np.inf
                    for i in range(depth):
                        v, w = path[i], path[i + 1]
                        lv, av, lw, aw = v // m, v % m, w // m, w % m
                        r = cap[lv - 1, lo + av, lo + aw] - flow[lv - 1, av, aw] if lw < lv else flow[lv, aw, av]
                        bottleneck = min(bottleneck, r)
                    for i in range(depth):
                        v, w = path[i], path[i + 1]
                        lv, av, lw, aw = v // m, v % m, w // m, w % m
                        if lw < lv:
                            flow[lv - 1, av, aw] += bottleneck
                        else:
                            flow[lv, aw, av] -= bottleneck
                    total += bottleneck
                    depth = 0
                    continue
                advanced = False
                while arc[layer, a] < 2 * m:
                    k = arc[layer, a]
                    if k < m:
                        ok = (layer > 0 and level[layer - 1, k] == level[layer, a] + 1
                              and cap[layer - 1, lo + a, lo + k] - flow[layer - 1, a, k] > EPS)
                        nxt = (layer - 1) * m + k
                    else:
                        c = k - m
                        ok = (layer < n_layers and level[layer + 1, c] == level[layer, a] + 1
                              and flow[layer, c, a] > EPS)
                        nxt = (layer + 1) * m + c
                    if ok:
                        depth += 1
                        path[depth] = nxt
                        advanced = True
                        break
                    arc[layer, a] += 1
                if not advanced:
                    if depth == 0:
                        break
                    level[layer, a] = -1  # dead end
                    depth -= 1
                    p = path[depth]
                    arc[p // m, p % m] += 1

    @njit(parallel=True, cache=True)
    def max_flow_pairs(cap, outputs, causal):
        n = cap.shape[1]
        values = np.zeros((len(outputs), n))
        for index in prange(len(outputs) * n):
            i, t = index // n, index % n
            o = outputs[i]
            if causal and t > o:
                continue
            lo, hi = (t, o + 1) if causal else (0, n)
            values[i, t] = max_flow(cap, o, t, lo, hi)
        return values

    return max_flow_pairs


def flow(attentions, *, outputs=None, fuse: str = "mean", residual: float = 0.5, normalize: bool = True
         ) -> Float[torch.Tensor, "out n"]:
    """Max-flow value from each output node (L, o) to each input token (0, t), normalised per output node
    (rows sum to 1) unless normalize=False. Causal structure is detected from the attention itself."""
    augmented = residual_attention(attentions, fuse=fuse, residual=residual)
    rows = _outputs(outputs, augmented.shape[-1])
    causal = bool((augmented.triu(diagonal=1) == 0).all())  # no key after its query in any layer
    values = _compiled()(augmented.numpy(), np.asarray(rows, dtype=np.int64), causal)
    values = torch.from_numpy(values)
    return values / values.sum(-1, keepdim=True) if normalize else values


# ---- on a model -------------------------------------------------------------------------------------------

@torch.no_grad()
def attention_patterns(model, tokens) -> Float[torch.Tensor, "L H n n"]:
    """Every layer's attention pattern of one sequence (hook path; short context)."""
    tokens = model.as_tokens(tokens)
    if tokens.shape[0] != 1:
        raise InputError("attention_patterns takes one sequence at a time")
    return hooks.attention_patterns(model, tokens)[0]


@dataclass
class FlowResult:
    """Relevance of every input token for the output positions of one text."""

    tokens: list[str]
    outputs: list[int]
    raw: torch.Tensor  # [out, n] last layer's attention, heads averaged
    rollout: torch.Tensor  # [out, n]
    flow: torch.Tensor  # [out, n]

    def figure(self, output: int = -1):
        """Token heat bars: raw attention, rollout and flow for one output position."""
        import plotly.graph_objects as go

        row = self.outputs.index(self.outputs[output] if output < 0 else output)
        labels = [f"{i}:{t}" for i, t in enumerate(self.tokens)]
        values = np.stack([self.raw[row].numpy(), self.rollout[row].numpy(), self.flow[row].numpy()])
        fig = go.Figure(go.Heatmap(z=values, x=labels, y=["raw attention", "rollout", "flow"], colorscale="Blues",
                                   hovertemplate="%{x}<br>%{y}: %{z:.3f}<extra></extra>"))
        fig.update_layout(title=f"relevance for output position {self.outputs[row]} ({self.tokens[self.outputs[row]]!r})",
                          height=260, xaxis_tickangle=-60)
        return fig


def explain(model, text, *, outputs=None, fuse: str = "mean", residual: float = 0.5) -> FlowResult:
    """Raw attention, rollout and flow of one text for `outputs` (default: the last position)."""
    tokens = model.as_tokens(text)
    patterns = attention_patterns(model, tokens)
    rows = _outputs(-1 if outputs is None else outputs, tokens.shape[1])
    return FlowResult(model.to_str_tokens(tokens[0]), rows, patterns[-1].double().mean(0)[rows],
                      rollout(patterns, outputs=rows, fuse=fuse, residual=residual),
                      flow(patterns, outputs=rows, fuse=fuse, residual=residual))


def flow_agreement(model, text, *, outputs=None, fuse: str = "mean", residual: float = 0.5
                   ) -> Float[torch.Tensor, "L H"]:
    """Pearson correlation of each head's attention row with the flow relevance, averaged over the output
    positions (default the last) of one text (fp64)."""
    tokens = model.as_tokens(text)
    patterns = attention_patterns(model, tokens).double()
    rows = _outputs(-1 if outputs is None else outputs, tokens.shape[1])
    relevance = flow(patterns, outputs=rows, fuse=fuse, residual=residual)  # [out, n]
    return pearson(patterns[:, :, rows], relevance[None, None]).mean(-1)  # heads [L, H, out, n]


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """texts: your texts instead of n_texts seeded sentences of the pydoc haystack. outputs: the output positions
    whose flow each head's attention row is compared with (default: the last). fuse: how heads are fused into one
    attention per layer ("mean", "max", "min"); residual: the weight of the identity in A' = (1 - r) A + r I."""

    texts: tuple[str, ...] | None = None
    outputs: tuple[int, ...] | None = None
    fuse: str = "mean"
    residual: float = 0.5
    n_texts: int = 32
    seed: int = 0


class Flow(Probe):
    name = "flow"
    description = "agreement of each head's attention with the attention flow of the whole model"
    paper = "Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers"
    Params = Params
    order = 50
    quick = {"n_texts": 8}
    columns = {"score": "agreement (Pearson) of the head's attention from the last position with the attention flow "
                        "(Abnar & Zuidema) of the whole model"}

    signed = ("score",)

    def threshold(self, scores):
        """A Pearson correlation above 0.5 with the flow: the head's attention follows it more than it departs."""
        return 0.5

    def validity(self, meta):
        return {"rests_on": f"{meta['n_texts']} texts", "baseline": "0: no correlation with the model's attention flow",
                "warning": None}

    def check(self, model, params) -> None:
        super().check(model, params)
        if model.architecture.learned_sinks:
            raise UnsupportedModelError(f"attention flow needs attention rows that sum to 1, and {model.name}'s learned "
                                        "sinks take part of every row's mass")

    def check_params(self, params):
        if params.fuse not in FUSIONS or not 0 <= params.residual <= 1:
            raise InputError(f"fuse must be one of {', '.join(FUSIONS)} and residual in [0, 1]")
        if params.texts is None and params.n_texts < 1 or params.texts == ():
            raise InputError("flow needs at least one text")
        return params

    def texts(self, params) -> list[str]:
        return list(params.texts) if params.texts is not None else haystack_sentences(params.n_texts, params.seed)

    def plan(self, model, params):
        return [Unit(f"{i:06d}", {"index": i}) for i in range(len(self.texts(params)))]

    def run(self, model, params, unit):
        text = self.texts(params)[unit.data["index"]]
        outputs = list(params.outputs) if params.outputs is not None else None
        return {"agreement": flow_agreement(model, text, outputs=outputs, fuse=params.fuse,
                                            residual=params.residual)}

    def merge(self, model, params, partials):
        agreement = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
        per_text = []
        for _, partial in iter_partials(partials):
            per_text.append(torch.tensor(partial["agreement"], dtype=torch.float64))
            agreement += per_text[-1]
        count = len(partials)
        return HeadScores.from_matrix(agreement / count, self.meta(model, params, n_texts=count,
                                                                   uncertainty=method("texts", count)),
                                      **intervals({"score": torch.stack(per_text)}))


PROBE = Flow()


def scan(model, texts=None, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """How much each head's attention agrees with the flow: score = mean Pearson correlation, over texts
    (default: n_texts seeded sentences of the pydoc haystack) and output positions (default the last), between the
    head's attention row and the flow relevance. See Params."""
    if texts is not None:
        params["texts"] = [texts] if isinstance(texts, str) else list(texts)
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
