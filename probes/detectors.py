"""Classic head detectors: previous-token, duplicate-token and induction scores of every head.

Semantics are TransformerLens' `detect_head` ("mul": the fraction of a head's attention that falls on
the detection pattern; "abs": 1 - mean |pattern - detection| * pos), computed for all heads and a whole
batch of prompts at once from the bridge's `hook_pattern`; a batch scores as the mean over its prompts,
as TL's list input does. Induction is measured on repeated random tokens: BOS, x_1..x_n, x_1..x_n.
`scan` reports by default the score over the queries that have a target (see `pattern_similarity`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int

from headlab.errors import InputError
from headlab.hooks import attention_patterns
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.progress import progress_bar
from headlab.scores import HeadScores
from headlab.uncertainty import intervals, method

DETECTORS = ("previous_token", "duplicate_token", "induction")
ERROR_MEASURES = ("mul", "abs")
ROW_MODES = ("all", "targets")


def previous_token_pattern(tokens: Int[torch.Tensor, "pos"]) -> Float[torch.Tensor, "pos pos"]:
    """1 where the key is the query's previous position."""
    n = tokens.shape[-1]
    return torch.diag(torch.ones(n - 1), diagonal=-1)


def duplicate_token_pattern(tokens: Int[torch.Tensor, "pos"]) -> Float[torch.Tensor, "pos pos"]:
    """1 where an earlier key holds the query's own token."""
    same = (tokens[:, None] == tokens[None, :]).float()
    return torch.tril(same, diagonal=-1)


def induction_pattern(tokens: Int[torch.Tensor, "pos"]) -> Float[torch.Tensor, "pos pos"]:
    """1 where the key follows an earlier occurrence of the query's token (the duplicate pattern shifted right)."""
    duplicate = duplicate_token_pattern(tokens)
    shifted = torch.zeros_like(duplicate)
    shifted[:, 1:] = duplicate[:, :-1]
    return torch.tril(shifted)


PATTERNS = {"previous_token": previous_token_pattern, "duplicate_token": duplicate_token_pattern,
            "induction": induction_pattern}


def detection_patterns(tokens: Int[torch.Tensor, "batch pos"], kind: str) -> Float[torch.Tensor, "batch pos pos"]:
    if kind not in PATTERNS:
        raise InputError(f"unknown detector {kind!r}; use one of {', '.join(DETECTORS)}")
    return torch.stack([PATTERNS[kind](row.cpu()) for row in tokens])


def pattern_similarity(
    patterns: Float[torch.Tensor, "batch layer head q k"],
    detection: Float[torch.Tensor, "batch q k"],
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
    rows: str = "all",
) -> Float[torch.Tensor, "batch layer head"]:
    """How well each head's pattern matches the detection pattern, per prompt.

    rows="all" is TL `detect_head` exactly ("mul": attention on the pattern / all attention; "abs":
    1 - mean |pattern - detection| * pos, without TL's rounding to 3 decimals). rows="targets" counts
    only the queries that have a target in the detection pattern: for induction on a sequence repeated
    twice, the second half (the first half has nothing to copy, which caps the "all" score near 0.5).
    """
    if error_measure not in ERROR_MEASURES:
        raise InputError(f"unknown error measure {error_measure!r}; use 'mul' or 'abs'")
    if rows not in ROW_MODES:
        raise InputError(f"unknown rows {rows!r}; use 'all' or 'targets'")
    detection = detection[:, None, None].to(patterns)
    n = patterns.shape[-1]
    keep = torch.ones(n, n, dtype=patterns.dtype, device=patterns.device)
    if exclude_bos:
        keep[:, 0] = 0
    if exclude_current_token:
        keep.fill_diagonal_(0)
    if rows == "targets":
        keep = keep * (detection.sum(-1, keepdim=True) > 0)  # [batch, 1, 1, q, 1]
    if error_measure == "mul":
        masked = patterns * keep
        return (masked * detection).sum((-1, -2)) / masked.sum((-1, -2))
    diff = (patterns - detection).abs() * keep
    n_rows = (keep.amax(-1) > 0).sum(-1)  # = n for rows="all"
    return 1 - diff.sum((-1, -2)) / n_rows


def detector_values(model, chunk: Int[torch.Tensor, "batch pos"], detectors=DETECTORS, *, exclude_bos: bool = False,
                    exclude_current_token: bool = False, error_measure: str = "mul", rows: str = "all"
                    ) -> dict[str, Float[torch.Tensor, "batch layer head"]]:
    """Each detector's per-head score on every prompt of one batch (fp32)."""
    patterns = attention_patterns(model, chunk).float().cpu()
    return {kind: pattern_similarity(patterns, detection_patterns(chunk, kind), exclude_bos=exclude_bos,
                                     exclude_current_token=exclude_current_token, error_measure=error_measure,
                                     rows=rows)
            for kind in detectors}


def detector_sums(model, chunk: Int[torch.Tensor, "batch pos"], detectors=DETECTORS, **options
                  ) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Each detector's per-head score summed over the prompts of one batch (fp32, in batch order)."""
    return {kind: values.sum(0) for kind, values in detector_values(model, chunk, detectors, **options).items()}


def detector_scores(
    model,
    prompts: Int[torch.Tensor, "batch pos"] | list[Int[torch.Tensor, "pos"]],
    detectors=DETECTORS,
    *,
    batch_size: int = 8,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
    rows: str = "all",
    progress: bool = True,
) -> dict[str, Float[torch.Tensor, "layer head"]]:
    """Mean over prompts of each detector's per-head score.

    `prompts` is a [batch, pos] tensor (run `batch_size` at a time) or a list of [pos] tensors of any
    lengths (run one at a time).
    """
    chunks = prompt_batches(prompts, batch_size)
    sums = {kind: torch.zeros(model.n_layers, model.n_heads) for kind in detectors}
    for chunk in progress_bar(chunks, "detectors", disable=not progress):
        for kind, total in detector_sums(model, chunk, detectors, exclude_bos=exclude_bos,
                                         exclude_current_token=exclude_current_token, error_measure=error_measure,
                                         rows=rows).items():
            sums[kind] += total
    n_prompts = sum(len(chunk) for chunk in chunks)
    return {kind: total / n_prompts for kind, total in sums.items()}


def prompt_batches(prompts, batch_size: int) -> list[Int[torch.Tensor, "batch pos"]]:
    """A [batch, pos] tensor in batches of `batch_size`, or a list of [pos] tensors one at a time."""
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2:
            raise InputError(f"detectors need tokens of shape [batch, pos], got {tuple(prompts.shape)}")
        chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    else:
        chunks = [torch.as_tensor(row).reshape(1, -1) for row in prompts]
    if not chunks or min(chunk.shape[1] for chunk in chunks) < 2:
        raise InputError("detectors need at least one prompt of two or more tokens")
    return chunks


def repeated_random_tokens(model, seq_len: int = 50, n_prompts: int = 16, seed: int = 0) -> Int[torch.Tensor, "batch pos"]:
    """[n_prompts, 1 + 2 * seq_len]: BOS (if the model has one), then seq_len random tokens, twice."""
    if seq_len < 2 or n_prompts < 1:
        raise InputError("repeated random tokens need seq_len >= 2 and n_prompts >= 1")
    special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=torch.long)
    vocab = len(model.tokenizer)
    candidates = torch.arange(vocab)[~torch.isin(torch.arange(vocab), special)]
    generator = torch.Generator().manual_seed(seed)
    half = candidates[torch.randint(len(candidates), (n_prompts, seq_len), generator=generator)]
    tokens = torch.cat([half, half], dim=1)
    if model.bos_ids:
        tokens = torch.cat([torch.tensor(model.bos_ids).expand(n_prompts, 1), tokens], dim=1)
    if tokens.shape[1] > model.n_ctx:
        raise InputError(f"{tokens.shape[1]} tokens exceed {model.name}'s context of {model.n_ctx}; lower seq_len")
    return tokens


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """texts: score these texts, one prompt each, instead of `n_prompts` seeded sequences of `seq_len` random
    tokens repeated twice. rows: "targets" scores each head over the queries that have a target (the usual induction
    score); "all" is TransformerLens' `detect_head`. error_measure: "mul" or "abs" (TransformerLens')."""

    texts: tuple[str, ...] | None = None
    seq_len: int = 50
    n_prompts: int = 16
    seed: int = 0
    batch_size: int = 8
    exclude_bos: bool = False
    exclude_current_token: bool = False
    error_measure: str = "mul"
    rows: str = "targets"


class Detectors(Probe):
    name = "detectors"
    description = "previous-token, duplicate-token and induction heads (TransformerLens detect_head semantics)"
    paper = "Olsson et al. 2022, In-context learning and induction heads; TransformerLens head_detector"
    Params = Params
    order = 10
    quick = {"seq_len": 25, "n_prompts": 8}
    min_context = 5
    columns = {
        "score": "induction score: attention from the second copy of a token to the token after its first copy",
        "previous_token": "attention on the previous position",
        "duplicate_token": "attention on earlier copies of the same token",
        "induction": "the induction score (= score)",
    }
    roles = {kind.replace("_", "-"): Role(kind, 0.5, "more than half of the attention on the detection pattern: the "
                                                     "head does this more than anything else")
             for kind in ("induction", "previous_token", "duplicate_token")}

    def threshold(self, scores):
        """Half of the attention on the induction target: the head does more of it than anything else."""
        return 0.5

    def validity(self, meta):
        params = meta["params"]
        prompts = (f"{meta['n_prompts']} texts" if params["texts"] is not None else
                   f"{meta['n_prompts']} prompts of {params['seq_len']} random tokens repeated twice")
        return {"rests_on": prompts, "baseline": "none: each score is a share of the head's attention (0 to 1)",
                "warning": None}

    def check_params(self, params):
        if params.error_measure not in ERROR_MEASURES:
            raise InputError(f"unknown error measure {params.error_measure!r}; use 'mul' or 'abs'")
        if params.rows not in ROW_MODES:
            raise InputError(f"unknown rows {params.rows!r}; use 'all' or 'targets'")
        if params.texts is None and (params.seq_len < 2 or params.n_prompts < 1 or params.batch_size < 1):
            raise InputError("detectors need seq_len >= 2, n_prompts >= 1 and batch_size >= 1")
        return params

    def fit_context(self, params, model, max_context):
        longest = max(2, (min(max_context, model.n_ctx) - 1) // 2)
        if max_context < self.min_context:
            raise InputError(f"the detectors probe needs prompts of at least {self.min_context} tokens; "
                             f"--max-context is {max_context}")
        return replace(params, seq_len=min(params.seq_len, longest)) if params.texts is None else params

    def prompts(self, model, params):
        if params.texts is None:
            return repeated_random_tokens(model, params.seq_len, params.n_prompts, params.seed)
        return [model.to_tokens(text)[0] for text in params.texts]

    def plan(self, model, params):
        n = len(params.texts) if params.texts is not None else params.n_prompts
        step = params.batch_size if params.texts is None else 1
        return [Unit(f"{i:06d}", {"start": i, "stop": min(n, i + step)}) for i in range(0, n, step)]

    def run(self, model, params, unit):
        prompts = self.prompts(model, params)
        start, stop = unit.data["start"], unit.data["stop"]
        chunk = prompts[start:stop] if isinstance(prompts, torch.Tensor) else prompt_batches(prompts[start:stop], 1)[0]
        values = detector_values(model, chunk, exclude_bos=params.exclude_bos,
                                 exclude_current_token=params.exclude_current_token,
                                 error_measure=params.error_measure, rows=params.rows)
        return {"sums": {kind: v.sum(0) for kind, v in values.items()}, "values": values, "n": stop - start}

    def merge(self, model, params, partials):
        sums = {kind: torch.zeros(model.n_layers, model.n_heads) for kind in DETECTORS}
        values: dict[str, list] = {kind: [] for kind in DETECTORS}  # per prompt, in prompt order
        for _, partial in iter_partials(partials):
            for kind in DETECTORS:
                sums[kind] += torch.tensor(partial["sums"][kind], dtype=torch.float32)
                values[kind] += partial["values"][kind]
        n_prompts = sum(partial["n"] for partial in partials.values())
        scores = {kind: total / n_prompts for kind, total in sums.items()}
        bounds = intervals({"score": values["induction"], **values})
        meta = self.meta(model, params, n_prompts=n_prompts, uncertainty=method("prompts", n_prompts))
        return HeadScores.from_matrix(scores["induction"], meta, **scores, **bounds)


PROBE = Detectors()


def scan(model, texts=None, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head; `score` is the induction score (see
    Params for every parameter: seq_len, n_prompts, seed, rows, ...)."""
    if texts is not None:
        params["texts"] = [texts] if isinstance(texts, str) else list(texts)
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
