"""Classic head detectors: previous-token, duplicate-token and induction scores of every head.

Semantics are TransformerLens' `detect_head` ("mul": the fraction of a head's attention that falls on
the detection pattern; "abs": 1 - mean |pattern - detection| * pos), computed for all heads and a whole
batch of prompts at once from the bridge's `hook_pattern`; a batch scores as the mean over its prompts,
as TL's list input does. Induction is measured on repeated random tokens: BOS, x_1..x_n, x_1..x_n.
`scan` reports by default the score over the queries that have a target (see `pattern_similarity`).
"""

from __future__ import annotations

import time

import torch
from jaxtyping import Float, Int

from headlab.errors import InputError
from headlab.progress import progress_bar
from headlab.scores import HeadScores, versions

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


@torch.no_grad()
def attention_patterns(model, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch layer head q k"]:
    """Every layer's attention pattern from the bridge's `hook_pattern` (short context: N x N per head)."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.n_layers)]
    _, cache = model.bridge.run_with_cache(tokens.to(model.device), names_filter=lambda name: name in names)
    return torch.stack([cache[name].float() for name in names], dim=1)


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
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2:
            raise InputError(f"detectors need tokens of shape [batch, pos], got {tuple(prompts.shape)}")
        chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    else:
        chunks = [torch.as_tensor(row).reshape(1, -1) for row in prompts]
    if not chunks or min(chunk.shape[1] for chunk in chunks) < 2:
        raise InputError("detectors need at least one prompt of two or more tokens")
    sums = {kind: torch.zeros(model.n_layers, model.n_heads) for kind in detectors}
    for chunk in progress_bar(chunks, "detectors", disable=not progress):
        patterns = attention_patterns(model, chunk).cpu()
        for kind in detectors:
            similarity = pattern_similarity(
                patterns, detection_patterns(chunk, kind), exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token, error_measure=error_measure, rows=rows,
            )
            sums[kind] += similarity.sum(0)
    n_prompts = sum(len(chunk) for chunk in chunks)
    return {kind: total / n_prompts for kind, total in sums.items()}


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
    if model.bos_token_id is not None and model.is_causal:
        tokens = torch.cat([torch.full((n_prompts, 1), model.bos_token_id), tokens], dim=1)
    if tokens.shape[1] > model.n_ctx:
        raise InputError(f"{tokens.shape[1]} tokens exceed {model.name}'s context of {model.n_ctx}; lower seq_len")
    return tokens


def scan(
    model,
    texts: list[str] | None = None,
    *,
    seq_len: int = 50,
    n_prompts: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
    rows: str = "targets",
    progress: bool = True,
) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head; `score` is the induction score.

    Without `texts`, all three are measured on `n_prompts` sequences of `seq_len` random tokens repeated
    twice (seeded); with `texts`, on those texts, one prompt each. rows="targets" (default) scores each
    head over the queries that have a target (the usual induction score: attention on the token after
    the earlier copy, averaged over the repeat); rows="all" is TransformerLens' `detect_head`.
    """
    start = time.perf_counter()
    if texts is None:
        prompts = repeated_random_tokens(model, seq_len, n_prompts, seed)
    else:
        texts = [texts] if isinstance(texts, str) else list(texts)
        prompts = [model.to_tokens(text)[0] for text in texts]
    scores = detector_scores(model, prompts, batch_size=batch_size, exclude_bos=exclude_bos,
                             exclude_current_token=exclude_current_token, error_measure=error_measure,
                             rows=rows, progress=progress)
    meta = {
        "probe": "detectors", "model": model.name, "geometry": model.geometry, "score": "induction",
        "params": {"texts": texts, "seq_len": seq_len, "n_prompts": n_prompts if texts is None else len(texts),
                   "exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token,
                   "error_measure": error_measure, "rows": rows},
        "seed": seed, "versions": versions(), "seconds": time.perf_counter() - start,
    }
    return HeadScores.from_matrix(scores["induction"], meta, **scores)
