"""Attention sinks at every position and ACT calibration (Yu et al. 2024, "Unveiling and Harnessing Hidden
Attention Sinks").

Sink rule (the reference's): in a head, key j is a sink when the attention it receives, summed over the queries that
can see it and divided by their number, exceeds alpha (0.1). The last keys of a causal sequence are seen by few
queries, so one query's attention can make them "sinks": keys seen by fewer than `min_queries` queries are never
sinks (default 32; documented artefact, not a finding). The first token (position 0) is reported apart.

A model with learned sink logits (gpt-oss: one per head, in each row's softmax with no value) is also reported with
the mass each head gives its learned sink beside the mass on the first token (`learned_sink_mass`; models without
learned sinks have no such column).

ACT: in chosen heads every detected sink except the initial token keeps beta (0.4) of its attention; the removed
mass goes to the query's other keys in proportion to their weights, so each row still sums to 1.

    table = scan(model)                                  # HeadScores: non-initial sink mass per head
    with calibrate(model, ["L3H1", "L5H0"]):             # both execution paths
        model.logits(tokens)
    search = search_heads(model, task)                   # the paper's head search on a calibration split
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from headlab.kernels import expand_kv, queries_seeing, visible_keys
from jaxtyping import Bool, Float

from headlab.capture import AttentionEdit, attention_stats, editing, stack_stats
from headlab.data import haystack_text
from headlab.errors import InputError
from headlab.heads import by_layer
from headlab.hooks import attach
from headlab.hooks import name as hook_name
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.progress import progress_bar
from headlab.scores import HeadScores, head_name
from headlab.tasks import ClassificationTask, evaluate
from headlab.uncertainty import intervals, method

ALPHA, BETA, MIN_QUERIES = 0.1, 0.4, 32
STABLE = 1e-6  # rows with less non-sink mass than this are left as they are (nothing to hand the mass to)


def _check(alpha: float, beta: float, min_queries: int) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not 0 < value <= 1:
            raise InputError(f"{name} must lie in (0, 1], got {value}")
    if min_queries < 1:
        raise InputError(f"min_queries must be at least 1, got {min_queries}")


# ---- detection ----------------------------------------------------------------------------------------------

def mean_received(
    colsum: Float[torch.Tensor, "... nk"], n_q: int, causal: bool, window: int | None
) -> tuple[Float[torch.Tensor, "... nk"], torch.Tensor]:
    """(attention each key receives per query that sees it, number of such queries [nk])."""
    seeing = queries_seeing(n_q, colsum.shape[-1], causal, window).to(colsum.device)
    return colsum / seeing.clamp(min=1), seeing


def sink_mask(
    mean: Float[torch.Tensor, "... nk"], seeing: torch.Tensor, alpha: float = ALPHA, min_queries: int = MIN_QUERIES,
    initial: bool = False,
) -> Bool[torch.Tensor, "... nk"]:
    """Keys that are sinks: mean received attention > alpha, seen by >= min_queries queries; position 0 only if
    `initial`."""
    sinks = (mean > alpha) & (seeing >= min_queries)
    if not initial:
        sinks[..., 0] = False
    return sinks


def default_texts(model, n_texts: int = 8, n_tokens: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """Seeded windows of the pydoc haystack, each [1, n_tokens] with the model's BOS first."""
    text = haystack_text()
    ids = model.tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if n_tokens > len(ids):
        raise InputError(f"the haystack has {len(ids)} tokens; asked for windows of {n_tokens}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - n_tokens, size=n_texts)
    bos = model.bos_ids
    return [torch.tensor([bos + ids[s:s + n_tokens - len(bos)]]) for s in starts]


@torch.no_grad()
def sink_stats(model, tokens, *, alpha: float = ALPHA, min_queries: int = MIN_QUERIES, backend: str = "auto") -> dict:
    """Sinks of every head on one sequence, from the kernel's column sums (no N x N tensor).

    Returns mean [L, H, n] (received attention per seeing query), sinks [L, H, n] (non-initial sinks),
    first_mass [L, H] (mean attention on position 0 over all queries), other_mass [L, H] (mean attention on the
    non-initial sinks over all queries), learned_mass [L, H] (mean weight of the heads' learned sinks over all
    queries; None for a model without learned sinks) and tokens (the sequence's str tokens).
    """
    _check(alpha, beta=BETA, min_queries=min_queries)
    tokens = model.as_tokens(tokens)
    if tokens.shape[0] != 1:
        raise InputError("sink_stats takes one sequence at a time ([1, pos])")
    n = tokens.shape[1]
    stats = attention_stats(model, tokens, want=("colsum", "lse"), backend=backend)
    colsum = stack_stats(stats, "colsum")[:, 0]  # [L, H, n]
    learned = [layer.sink_mass for layer in stats.values()]  # [1, H, n] each, None without learned sinks
    means, sinks = [], []
    for layer in range(model.n_layers):
        mean, seeing = mean_received(colsum[layer], n, model.is_causal, model.sliding_window(layer))
        means.append(mean)
        sinks.append(sink_mask(mean, seeing, alpha, min_queries))
    sinks = torch.stack(sinks)
    learned_mass = None
    if any(mass is not None for mass in learned):  # a layer without learned sinks gives them no weight
        learned_mass = torch.stack([torch.zeros(model.n_heads) if mass is None else mass[0].mean(-1).cpu()
                                    for mass in learned])
    return {"mean": torch.stack(means), "sinks": sinks, "first_mass": colsum[..., 0] / n,
            "other_mass": (colsum * sinks).sum(-1) / n, "tokens": model.to_str_tokens(tokens[0]),
            "learned_mass": learned_mass}


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """texts: your texts (or token-id sequences) instead of n_texts seeded n_tokens-long windows of the pydoc
    haystack. A key is a sink when the attention it receives per query that sees it exceeds alpha; keys seen by
    fewer than min_queries queries never are."""

    texts: tuple[str | tuple[int, ...], ...] | None = None
    alpha: float = ALPHA
    min_queries: int = MIN_QUERIES
    n_texts: int = 8
    n_tokens: int = 512
    seed: int = 0
    backend: str = "auto"


class Sinks(Probe):
    name = "sinks"
    description = "attention sinks at every position, not only the first token"
    paper = "Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks"
    Params = Params
    order = 30
    quick = {"n_texts": 4, "n_tokens": 256}
    columns = {
        "score": "attention on non-initial sinks (Yu et al.): mean attention per query on keys, other than the first, "
                 "that receive more than alpha on average",
        "first_mass": "mean attention per query on the first token",
        "n_sinks": "non-initial sinks per text",
        "sink_rate": "fraction of texts with at least one non-initial sink",
        "learned_sink_mass": "mean weight per query on the head's learned sink logit (models with learned sinks, "
                             "e.g. gpt-oss; absent for others)",
    }
    roles = {"sink": Role()}

    def threshold(self, scores):
        """Any attention on a non-initial sink: the head has at least one (score is 0 when it has none)."""
        return 0.0

    def validity(self, meta):
        return {"rests_on": f"{meta['n_texts']} texts of {max(meta['lengths'])} tokens",
                "baseline": f"a key is a sink above alpha = {meta['params']['alpha']} received attention per query; "
                            f"{meta['heads_with_sinks']} heads have one", "warning": None}

    def check_params(self, params):
        _check(params.alpha, BETA, params.min_queries)
        if params.texts == () or (params.texts is None and params.n_texts < 1):
            raise InputError("sinks.scan got no texts")
        return params

    def fit_context(self, params, model, max_context):
        n_tokens = min(params.n_tokens, max_context, model.n_ctx)
        if n_tokens < self.min_context:
            raise InputError(f"the sinks probe needs windows of at least {self.min_context} tokens; "
                             f"--max-context is {max_context}")
        return replace(params, n_tokens=n_tokens, min_queries=max(1, min(params.min_queries, n_tokens // 4)))

    def sequences(self, model, params) -> list[torch.Tensor]:
        if params.texts is None:
            return default_texts(model, params.n_texts, params.n_tokens, params.seed)
        return [model.as_tokens(text) for text in params.texts]

    def plan(self, model, params):
        n = len(params.texts) if params.texts is not None else params.n_texts
        return [Unit(f"{i:06d}", {"index": i}) for i in range(n)]

    def run(self, model, params, unit):
        tokens = self.sequences(model, params)[unit.data["index"]]
        found = sink_stats(model, tokens, alpha=params.alpha, min_queries=params.min_queries, backend=params.backend)
        partial = {"first_mass": found["first_mass"], "other_mass": found["other_mass"],
                   "per_head": found["sinks"].sum(-1), "length": int(tokens.shape[1]),
                   "sinks": [[layer, head, position, found["tokens"][position]]
                             for layer, head, position in found["sinks"].nonzero().tolist()]}
        if found["learned_mass"] is not None:
            partial["learned_mass"] = found["learned_mass"]
        return partial

    def merge(self, model, params, partials):
        first, other, count, present = 0, 0, 0, 0
        samples: dict[str, list] = {"score": [], "first_mass": [], "n_sinks": [], "sink_rate": []}  # per text
        sink_tokens: Counter = Counter()
        positions: dict[str, list] = {}
        learned = "learned_mass" in next(iter_partials(partials))[1]
        if learned:
            samples["learned_sink_mass"] = []
        for index, (_, partial) in enumerate(iter_partials(partials)):
            if learned:
                samples["learned_sink_mass"].append(torch.tensor(partial["learned_mass"], dtype=torch.float64))
            first = first + torch.tensor(partial["first_mass"], dtype=torch.float32)
            other = other + torch.tensor(partial["other_mass"], dtype=torch.float32)
            per_head = torch.tensor(partial["per_head"], dtype=torch.long)
            count = count + per_head
            present = present + (per_head > 0)
            for column, value in zip(("score", "first_mass", "n_sinks", "sink_rate"),
                                     (partial["other_mass"], partial["first_mass"], per_head, per_head > 0)):
                samples[column].append(torch.as_tensor(value, dtype=torch.float64))
            for layer, head, position, token in partial["sinks"]:
                sink_tokens[token] += 1
                positions.setdefault(head_name(layer, head), []).append([index, position, token])
        n = len(partials)
        meta = self.meta(model, params, n_texts=n, lengths=[p["length"] for _, p in iter_partials(partials)],
                         sink_tokens=sink_tokens.most_common(20), sink_positions=positions,
                         heads_with_sinks=int(((count / n) > 0).sum()), uncertainty=method("texts", n))
        bounds = intervals({column: torch.stack(values) for column, values in samples.items()})
        extra = {"learned_sink_mass": torch.stack(samples["learned_sink_mass"]).mean(0)} if learned else {}
        return HeadScores.from_matrix(other / n, meta, first_mass=first / n, n_sinks=count / n, sink_rate=present / n,
                                      **extra, **bounds)


PROBE = Sinks()


def scan(model, texts=None, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Sinks of every head over `texts` (default: n_texts seeded n_tokens-long windows of the pydoc haystack).

    score = mean attention on non-initial sinks; columns first_mass, n_sinks (non-initial sinks per text) and
    sink_rate (fraction of texts with at least one). meta: sink positions and tokens per head, the tokens that are
    most often sinks. See Params.
    """
    if texts is not None:
        texts = [texts] if isinstance(texts, str) else list(texts)
        params["texts"] = [t if isinstance(t, str) else tuple(torch.as_tensor(t).flatten().tolist()) for t in texts]
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)


# ---- ACT calibration ----------------------------------------------------------------------------------------

def _redistribution(on_sinks: torch.Tensor, beta: float, row_mass: torch.Tensor | float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor for sink weights, factor for the other weights) of rows with `on_sinks` mass on the calibrated
    sinks: sinks keep beta, the rest grows to give the removed mass back; rows with (almost) nothing else stay.
    `row_mass`: what a row's keys hold together (1; less where a learned sink takes part of the row, gpt-oss)."""
    rest = row_mass - on_sinks
    ok = rest > STABLE
    return torch.where(ok, beta, 1.0), torch.where(ok, (rest + (1 - beta) * on_sinks) / rest.clamp(min=STABLE), 1.0)


def calibrate_pattern(
    pattern: Float[torch.Tensor, "b h nq nk"], *, alpha: float = ALPHA, beta: float = BETA,
    min_queries: int = MIN_QUERIES, causal: bool = True, window: int | None = None,
    heads: list[int] | None = None, learned_sinks: bool = False,
) -> Float[torch.Tensor, "b h nq nk"]:
    """ACT on full attention patterns (the hook path and the reference): in `heads` (default all), every
    non-initial sink keeps beta of its attention; the rest of the row is scaled to give the mass back.
    learned_sinks: rows sum to less than 1 (gpt-oss); each keeps the mass it had on its keys."""
    _check(alpha, beta, min_queries)
    mean, seeing = mean_received(pattern.sum(-2), pattern.shape[-2], causal, window)
    sinks = sink_mask(mean, seeing, alpha, min_queries)
    if heads is not None:
        chosen = torch.zeros(pattern.shape[1], dtype=torch.bool, device=pattern.device)
        chosen[heads] = True
        sinks &= chosen[None, :, None]
    sinks = sinks[:, :, None, :]  # [b, h, 1, nk]
    row_mass = pattern.sum(-1, keepdim=True) if learned_sinks else 1.0
    keep, scale = _redistribution((pattern * sinks).sum(-1, keepdim=True), beta, row_mass)
    return torch.where(sinks, pattern * keep, pattern * scale)


def _calibrated_output(heads: list[int], alpha: float, beta: float, min_queries: int):
    """ACT on the fast path: z' = c z + (beta - c) sum_{j in sinks} p_j v_j with c = (1 - beta S) / (1 - S),
    S the row's mass on the sinks; p_j recomputed for the sink keys only from the saved LSE (O(n x sinks)). With
    learned sinks (gpt-oss) a row's keys hold 1 - its learned sink's weight, and the 1s above are that."""

    def apply(q, k, v, out, stats, problem):
        b, h, n_q, d = q.shape
        n_k = k.shape[2]
        mean, seeing = mean_received(stats.colsum, n_q, problem.causal, problem.window)
        sinks = sink_mask(mean, seeing, alpha, min_queries)  # [b, h, nk]
        chosen = torch.zeros(h, dtype=torch.bool, device=q.device)
        chosen[heads] = True
        sinks &= chosen[None, :, None]
        keys = sinks.any(dim=(0, 1)).nonzero().flatten()
        if len(keys) == 0:
            return out
        k_s, v_s = expand_kv(k[:, :, keys], h).float(), expand_kv(v[:, :, keys], h).float()
        scores = problem.logits(torch.einsum("bhqd,bhkd->bhqk", q.float(), k_s))
        visible = visible_keys(torch.arange(n_k - n_q, n_k, device=q.device), keys, problem.causal, problem.window)
        p = torch.exp(scores - stats.lse[..., None]) * (visible & sinks[:, :, None, keys])
        row_mass = 1.0 if stats.sink_mass is None else (1 - stats.sink_mass)[..., None]
        keep, c = _redistribution(p.sum(-1, keepdim=True), beta, row_mass)
        calibrated = c * out.float() + (keep - c) * (p @ v_s)
        return calibrated.to(out.dtype)

    return apply


@contextmanager
def calibrate(model, heads, alpha: float = ALPHA, beta: float = BETA, min_queries: int = MIN_QUERIES
              ) -> Iterator[None]:
    """ACT inside the block, on both execution paths: `.hf` (the kernel computes the listed layers and the
    output is corrected from column sums and LSE, no N x N) and `.bridge` (hook_pattern is rewritten)."""
    _check(alpha, beta, min_queries)
    layers = by_layer(model.check_heads(heads))
    edits = {layer: AttentionEdit(_calibrated_output(hs, alpha, beta, min_queries), want=("lse", "colsum"))
             for layer, hs in layers.items()}
    with ExitStack() as stack:
        stack.enter_context(editing(model, edits))
        if model.is_causal:  # TransformerLens' BERT bridge ignores hook_pattern edits: encoders use `.hf` only
            def rewrite(pattern, point):
                return calibrate_pattern(pattern, alpha=alpha, beta=beta, min_queries=min_queries, causal=True,
                                         window=model.sliding_window(point.layer), heads=layers[point.layer],
                                         learned_sinks=model.architecture.learned_sinks)
            stack.enter_context(attach(model, [(hook_name("pattern", layer), rewrite) for layer in layers],
                                       tree="bridge"))
        yield


# ---- head search (the paper's procedure, greedy) ------------------------------------------------------------

def search_heads(model, task: ClassificationTask, *, candidates: int = 24, max_heads: int = 8,
                 calibration_fraction: float = 0.5, seeds=(0, 1, 2), alpha: float = ALPHA, beta: float = BETA,
                 min_queries: int | None = None, progress: bool = True) -> dict:
    """Choose ACT heads on a calibration split, evaluate them on the held-out split, for several seeds.

    Candidates: the heads with the most non-initial sink mass on the task's own prompts. Each is scored alone on the
    calibration split by (accuracy, mean log-probability of the right option): accuracy decides, the log-probability
    breaks its ties. Heads that improve on the uncalibrated model are then added greedily, best first, while the
    calibration split keeps improving. min_queries defaults to a quarter of the shortest prompt (task prompts are
    short).
    """
    prompts = [model.to_tokens(example.prompt) for example in task.examples]
    shortest = min(p.shape[1] for p in prompts)
    min_queries = min_queries or max(2, shortest // 4)
    sink_mass = scan(model, prompts[:16], alpha=alpha, min_queries=min_queries, progress=False).matrix()
    order = np.argsort(-sink_mass.ravel(), kind="stable")[:candidates]
    pool = [(int(i) // model.n_heads, int(i) % model.n_heads) for i in order if sink_mass.ravel()[i] > 0]
    runs = []
    for seed in seeds:
        calibration, held_out = task.split(calibration_fraction, seed)
        base = evaluate(model, calibration)
        alone = []
        for head in progress_bar(pool, f"ACT search, seed {seed}", disable=not progress):
            with calibrate(model, [head], alpha, beta, min_queries):
                alone.append(evaluate(model, calibration))
        chosen, best = [], base
        for result, head in sorted(zip(alone, pool), key=lambda x: x[0], reverse=True):
            if result <= base or len(chosen) >= max_heads:
                break
            with calibrate(model, chosen + [head], alpha, beta, min_queries):
                trial = evaluate(model, calibration)
            if trial > best:
                chosen, best = chosen + [head], trial
        before = evaluate(model, held_out)
        after = before
        if chosen:
            with calibrate(model, chosen, alpha, beta, min_queries):
                after = evaluate(model, held_out)
        runs.append({"seed": seed, "heads": [head_name(*h) for h in chosen],
                     "calibration_before": base[0], "calibration_after": best[0],
                     "held_out_before": before[0], "held_out_after": after[0], "change": after[0] - before[0],
                     "held_out_logprob_before": before[1], "held_out_logprob_after": after[1],
                     "alone_accuracy_change": {head_name(*h): r[0] - base[0] for h, r in zip(pool, alone)}})
    changes = [r["change"] for r in runs]
    return {"task": task.name, "alpha": alpha, "beta": beta, "min_queries": min_queries,
            "candidates": [head_name(*h) for h in pool], "runs": runs,
            "mean_change": float(np.mean(changes)), "std_change": float(np.std(changes))}


def runs_frame(result: dict) -> pd.DataFrame:
    """search_heads' runs as a table."""
    return pd.DataFrame(result["runs"])
