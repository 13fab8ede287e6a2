"""Successor heads (Gould et al., ICLR 2024): heads whose OV circuit maps an ordinal token to the next one (Monday ->
Tuesday, 3 -> 4, January -> February, C -> D).

A head's OV circuit is read on each token's *effective embedding*: the token's residual after the first block, in a
prompt of BOS and the token (the paper passes the embedding through the first MLP for the same reason: raw
embeddings are a poor input to later layers). The head's write for a source token, through its layer's input norm,
W_V, W_O, a post-attention norm where the family has one, the final norm and W_U, gives logits over the tokens of
the token's own sequence:

    succession score = share of consecutive pairs (t_i, t_i+1) whose successor's logit is strictly above every other
                       token of the sequence (the token itself included)

Sequences (days, months, numbers, letters, ...) come from `datasets/ordinal_sequences.json`; words that are not one
token (with or without a leading space) are left out. The `shuffled` column scores the same heads against each
sequence in a seeded random order: a head that increments ordinals scores near chance there (1 / length).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int

from headlab.data import dataset_path
from headlab.errors import InputError, NoSignalError
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.scores import HeadScores
from headlab.uncertainty import intervals, method


def load_sequences(data: str = "ordinal_sequences.json") -> dict[str, list[str]]:
    """{name: words in order} from a headlab data file or a JSON file of yours with a "sequences" object."""
    path = Path(data) if Path(data).is_file() else dataset_path(data)
    try:
        sequences = json.loads(path.read_text(encoding="utf-8"))["sequences"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{data} is not a JSON file with a 'sequences' object ({error})") from None
    return {name: [str(word) for word in words] for name, words in sequences.items()}


def single_token(model, word: str) -> int | None:
    """The id of " word" if it is one token, else of "word" if that is, else None."""
    for text in (" " + word, word):
        ids = model.token_ids(text)
        if len(ids) == 1:
            return ids[0]
    return None


def sequence_tokens(model, words: list[str]) -> list[int]:
    """The sequence's words that are single tokens, in order (duplicate ids dropped: "I" and "I" in two guises)."""
    ids = []
    for word in words:
        token = single_token(model, word)
        if token is not None and token not in ids:
            ids.append(token)
    return ids


@torch.no_grad()
def effective_embeddings(model, tokens: Int[torch.Tensor, "n"]) -> Float[torch.Tensor, "n d_model"]:
    """Each token's residual after the first block, in a prompt of BOS (if the model has one) and the token."""
    rows = torch.as_tensor(tokens).reshape(-1, 1)
    if model.bos_ids:
        rows = torch.cat([torch.tensor(model.bos_ids).expand(len(rows), 1), rows], dim=1)
    return model.bridge(rows.to(model.device), stop_at_layer=1)[:, -1].float()


@torch.no_grad()
def ov_source(model, layer: int, x: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "head n d_head"]:
    """Each head's value of residuals `x` read by `layer`: its input norm (none in OLMo 2, which norms after attention),
    then W_V (+ b_V), per query head."""
    block = model.bridge.blocks[layer]
    attn = block.attn
    normed = block.ln1(x[:, None].to(model.dtype))[:, 0].float() if hasattr(block, "ln1") else x.float()
    kv = torch.arange(model.n_heads) // (model.n_heads // model.n_kv_heads)
    values = torch.einsum("nm,hmd->hnd", normed, attn.W_V.detach().float()[kv])
    b_V = getattr(attn, "b_V", None)
    return values + b_V.detach().float()[kv][:, None] if b_V is not None else values


@torch.no_grad()
def ov_readout(model, layer: int) -> Float[torch.Tensor, "head d_head d_model"]:
    """Each head's W_O (centred under a final LayerNorm) times the elementwise gains between it and W_U (a
    post-attention norm's, where the family has one, and the final norm's): the norms' division by the RMS is one
    positive number per row, which no comparison of logits within a row depends on."""
    from headlab.probes.patching import norm_gain

    gain = norm_gain(model, "ln_final").float()
    post = model.architecture.bridge_post_attention_norm_name(layer)
    if post is not None:
        gain = gain * norm_gain(model, post).float()
    W_O = model.bridge.blocks[layer].attn.W_O.detach().float()
    if not model.bridge.ln_final.uses_rms_norm:  # a LayerNorm subtracts the write's mean before its gain
        W_O = W_O - W_O.mean(-1, keepdim=True)
    return W_O * gain


def unembedding(model) -> Float[torch.Tensor, "d_model vocab"]:
    return model.bridge.unembed.W_U.detach().float()


@torch.no_grad()
def ov_logits(model, x: Float[torch.Tensor, "n d_model"], targets: Int[torch.Tensor, "t"]
              ) -> Float[torch.Tensor, "layer head n t"]:
    """Every head's OV-circuit logits of `targets` for source residuals `x` (up to a positive factor per row)."""
    W_U = unembedding(model)[:, torch.as_tensor(targets)]
    return torch.stack([torch.einsum("hnd,hdm,mt->hnt", ov_source(model, layer, x), ov_readout(model, layer), W_U)
                        for layer in range(model.n_layers)])


def succession_wins(logits: Float[torch.Tensor, "layer head n n"], step: int = 1
                    ) -> Float[torch.Tensor, "pair layer head"]:
    """1 where source i (of a sequence's n tokens, logits over the same n) has token i + step strictly on top, per
    pair (i, i + step)."""
    n = logits.shape[-1]
    sources = torch.arange(max(0, -step), min(n, n - step))
    if not len(sources):
        return torch.zeros(0, *logits.shape[:2])
    rows = logits[:, :, sources]  # [layer, head, pairs, n]
    target = rows[..., torch.arange(len(sources)), sources + step]
    others = rows.clone()
    others[..., torch.arange(len(sources)), sources + step] = float("-inf")
    return (target > others.amax(-1)).float().permute(2, 0, 1)


def succession_hits(logits: Float[torch.Tensor, "layer head n n"], step: int = 1) -> Float[torch.Tensor, "layer head"]:
    """How many sources i have token i + step strictly on top (`succession_wins` summed over the pairs)."""
    return succession_wins(logits, step).sum(0)


# ---- the probe ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """sequences: names of sequences in `data` (empty: all of them); data: a headlab file or your own JSON of
    {"sequences": {name: [word, ...]}}; seed: the shuffled control's orders."""

    sequences: tuple[str, ...] = ()
    data: str = "ordinal_sequences.json"
    seed: int = 0


class Successor(Probe):
    name = "successor"
    description = "successor heads: the OV circuit maps an ordinal token to the next one (Monday -> Tuesday, 3 -> 4)"
    paper = "Gould et al. 2024, Successor Heads: Recurring, Interpretable Attention Heads In The Wild (ICLR)"
    Params = Params
    order = 72
    quick = {}
    needs_decoder = "reads the OV circuit into next-token logits"
    min_context = 2
    columns = {
        "score": "succession score: share of ordinal pairs (Monday -> Tuesday, 3 -> 4, ...) whose successor tops the "
                 "head's OV-circuit logits among the sequence's tokens",
        "shuffled": "the same score against each sequence in a seeded random order (chance level: a control)",
    }
    roles = {"successor": Role()}

    def threshold(self, scores):
        """Half of the ordinal pairs put their successor on top: far above the shuffled control's chance level
        (about 1 / 10 for these sequences)."""
        return 0.5

    def validity(self, meta):
        chance = sum(1 / n for n in meta["single_tokens"].values() if n > 1) / max(1, sum(
            n > 1 for n in meta["single_tokens"].values()))
        return {"rests_on": f"{meta['pairs']} ordinal pairs of {len(meta['single_tokens'])} sequences (words that "
                            f"are one token)",
                "baseline": f"the shuffled column (the same heads against the sequences in a random order); chance "
                            f"about {chance:.2f}", "warning": None}

    def check_params(self, params):
        known = load_sequences(params.data)
        unknown = [name for name in params.sequences if name not in known]
        if unknown:
            raise InputError(f"unknown sequence(s) {', '.join(unknown)}; {params.data} holds {', '.join(known)}")
        return params

    def plan(self, model, params):
        names = params.sequences or tuple(load_sequences(params.data))
        return [Unit(f"{i:03d}-{name}", {"name": name}) for i, name in enumerate(names)]

    def run(self, model, params, unit):
        tokens = sequence_tokens(model, load_sequences(params.data)[unit.data["name"]])
        if len(tokens) < 2:
            empty = torch.zeros(0, model.n_layers, model.n_heads)
            return {"hits": empty, "shuffled": empty, "pairs": 0, "tokens": len(tokens)}
        order = list(range(len(tokens)))
        random.Random(f"{params.seed}:{unit.data['name']}").shuffle(order)
        logits = ov_logits(model, effective_embeddings(model, torch.tensor(tokens)), torch.tensor(tokens))
        shuffled = logits[:, :, order][:, :, :, order]
        return {"hits": succession_wins(logits), "shuffled": succession_wins(shuffled), "pairs": len(tokens) - 1,
                "tokens": len(tokens)}

    def merge(self, model, params, partials):
        wins: dict[str, list] = {"score": [], "shuffled": []}  # per pair: 1 where the successor is on top
        kept = {}
        for key, partial in iter_partials(partials):
            for column, name in (("score", "hits"), ("shuffled", "shuffled")):
                wins[column].append(torch.tensor(partial[name], dtype=torch.float64).reshape(-1, model.n_layers,
                                                                                            model.n_heads))
            kept[key.split("-", 1)[1]] = partial["tokens"]
        samples = {column: torch.cat(values) for column, values in wins.items()}
        pairs = len(samples["score"])
        if not pairs:
            raise NoSignalError(f"no sequence has two words that are single tokens for {model.name}")
        meta = self.meta(model, params, pairs=pairs, single_tokens=kept, uncertainty=method("ordinal pairs", pairs))
        return HeadScores.from_matrix(samples["score"].sum(0) / pairs, meta, shuffled=samples["shuffled"].sum(0) / pairs,
                                      **intervals(samples))


PROBE = Successor()


def scan(model, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Successor heads: `score` = share of ordinal pairs whose successor tops the head's OV logits (see Params)."""
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
