"""Copy-suppression (negative) heads (McDougall et al. 2023, GPT-2 Small L10H7): heads that attend to a token that
appeared earlier in the context and lower its logit.

Two scores per head:

- `score` (suppression): on prose, minus the head's direct effect on the logits of the tokens already in the
  context, relative to its effect on the average token of the vocabulary, averaged over positions:

      suppression(head) = - mean over positions p of  w_p . (mean of W_U[:, s] over the distinct tokens s at 1..p
                                                              - mean of W_U over the vocabulary)

  where w_p is the head's write at p through the final norm (its scale from the run), as in direct logit
  attribution. Logits matter only relative to each other, so the vocabulary mean is the baseline.
- `ov_negative_copying`: the sign of the head's full OV circuit on the same tokens, from its eigenvalues
  (Elhage et al. 2021): - sum(lambda) / sum(|lambda|) of C[s, t] = OV(effective embedding of s) . W_U[:, t] over the
  tokens s, t of the texts; +1 when every eigenvalue is negative (the head writes minus what it reads). The
  eigenvalues of the |T| x |T| matrix E V O U are those of the d_head x d_head matrix O U E V, plus zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int

from headlab.data import haystack_text
from headlab.errors import InputError
from headlab.hooks import run_with_cache
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.scores import HeadScores
from headlab.settings import constrained
from headlab.uncertainty import intervals, method


def context_directions(W_U: Float[torch.Tensor, "d_model vocab"], tokens: Int[torch.Tensor, "pos"], skip: int
                       ) -> Float[torch.Tensor, "pos d_model"]:
    """Row p: the mean unembedding of the distinct tokens at positions skip..p minus the vocabulary's mean one
    (zero for p < skip)."""
    out = torch.zeros(len(tokens), W_U.shape[0])
    seen: set[int] = set()
    total = torch.zeros(W_U.shape[0])
    for p, token in enumerate(tokens.tolist()):
        if p < skip:
            continue
        if token not in seen:
            seen.add(token)
            total += W_U[:, token]
        out[p] = total / len(seen)
    return out - W_U.mean(1)


@torch.no_grad()
def context_suppression(model, tokens: Int[torch.Tensor, "1 pos"], future: bool = False
                        ) -> Float[torch.Tensor, "layer head"]:
    """Minus each head's direct effect on the in-context tokens' logits relative to the vocabulary's mean, averaged
    over the positions after the first token (the text's own tokens; BOS excluded). `future` reads the tokens
    *after* each position instead (a control: no head can know them)."""
    from headlab.probes.patching import head_writes, norm_gain, write_names

    names = [n for layer in range(model.n_layers) for n in write_names(model, layer)] + ["ln_final.hook_scale"]
    _, cache = run_with_cache(model, tokens, names)
    skip = len(model.bos_ids)
    W_U = model.bridge.unembed.W_U.detach().float()
    row = tokens[0].cpu()
    if future:  # row p: the tokens at p + 1 ... (the last row: none)
        directions = torch.cat([context_directions(W_U, row.flip(0), 0).flip(0)[1:], torch.zeros(1, W_U.shape[0])])
    else:
        directions = context_directions(W_U, row, skip)  # [pos, d_model]
    readout = directions * norm_gain(model, "ln_final").float()
    if not model.bridge.ln_final.uses_rms_norm:  # a LayerNorm subtracts the write's mean before its gain
        readout = readout - readout.mean(-1, keepdim=True)
    readout = readout / cache["ln_final.hook_scale"][0].float()
    positions = slice(skip + 1, None)
    effects = torch.stack([torch.einsum("phm,pm->ph", head_writes(model, cache, layer)[0].float(), readout)[positions]
                           .mean(0) for layer in range(model.n_layers)])
    return -effects


@torch.no_grad()
def ov_eigenvalues(model, tokens: Int[torch.Tensor, "t"]) -> Float[torch.Tensor, "layer head d_head"]:
    """Eigenvalues (complex) of each head's OV circuit on `tokens` (sources and targets), from its d_head x d_head
    form O U E V in float64."""
    from headlab.probes.successor import effective_embeddings, ov_readout, ov_source, unembedding

    tokens = torch.as_tensor(tokens)
    x = effective_embeddings(model, tokens)
    W_U = unembedding(model)[:, tokens].double()
    return torch.stack([torch.linalg.eigvals(torch.einsum("hdm,mt,htk->hdk", ov_readout(model, layer).double(), W_U,
                                                          ov_source(model, layer, x).double()))
                        for layer in range(model.n_layers)])


def negative_copying(eigenvalues: torch.Tensor) -> torch.Tensor:
    """- sum(lambda) / sum(|lambda|) over the last axis (real: the imaginary parts of conjugate pairs cancel)."""
    return -eigenvalues.sum(-1).real / eigenvalues.abs().sum(-1).clamp_min(1e-30)


# ---- the probe ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """texts: your own texts (default: `n_texts` windows of `n_tokens` tokens of the pydoc haystack, from `seed`);
    max_tokens: at most this many distinct tokens of the texts (the commonest first) span the OV circuit."""

    texts: tuple[str, ...] | None = None
    n_texts: int = constrained(16, at_least=1)
    n_tokens: int = constrained(128, at_least=16)
    max_tokens: int = constrained(512, at_least=2)
    seed: int = 0


class CopySuppression(Probe):
    name = "copy_suppression"
    description = "copy-suppression heads: lower the logits of tokens already in the context (negative heads)"
    paper = "McDougall et al. 2023, Copy Suppression: Comprehensively Understanding an Attention Head"
    Params = Params
    order = 74
    quick = {"n_texts": 4, "max_tokens": 256}
    needs_decoder = "reads direct effects on next-token logits"
    min_context = 16
    columns = {
        "score": "suppression: minus the head's direct effect on the logits of tokens already in the context, relative "
                 "to the vocabulary's mean, averaged over positions (logits)",
        "ov_negative_copying": "-sum(eigenvalues) / sum(|eigenvalues|) of the head's OV circuit on the texts' tokens: "
                               "+1 writes minus what it reads, -1 copies",
    }
    signed = ("score", "ov_negative_copying")
    roles = {"copy-suppression": Role()}

    def threshold(self, scores):
        """A tenth of a logit off every in-context token relative to the rest, from one head's direct path."""
        return 0.1

    def validity(self, meta):
        source = ("your texts" if meta["params"]["texts"] is not None else
                  f"windows of {meta['params']['n_tokens']} tokens of the pydoc haystack")
        return {"rests_on": f"{meta['n_texts']} texts ({source}); the OV circuit over their {meta['circuit_tokens']} "
                            f"commonest distinct tokens",
                "baseline": "the vocabulary's mean token (suppression is relative to it); OV sign: 0 is neither "
                            "copying nor suppressing", "warning": None}

    def check_params(self, params):
        if params.texts == ():
            raise InputError("copy_suppression.scan got no texts")
        return params

    def fit_context(self, params, model, max_context):
        return params if params.texts is not None else replace(params, n_tokens=min(params.n_tokens, max_context))

    def token_rows(self, model, params) -> list[torch.Tensor]:
        """The texts' token ids [1, pos] (haystack windows: `n_tokens` tokens each, BOS in front)."""
        if params.texts is not None:
            return [model.to_tokens(text) for text in params.texts]
        ids = model.token_ids(haystack_text())
        width = params.n_tokens - len(model.bos_ids)
        starts = torch.randperm(len(ids) // width, generator=torch.Generator().manual_seed(params.seed))
        return [torch.tensor([model.bos_ids + ids[s * width:(s + 1) * width]]) for s in starts[:params.n_texts].tolist()]

    def circuit_tokens(self, model, params) -> torch.Tensor:
        """The distinct tokens of the texts (BOS excluded), commonest first (ties by id), at most max_tokens."""
        skip = len(model.bos_ids)
        ids, counts = torch.cat([row[0, skip:] for row in self.token_rows(model, params)]).unique(return_counts=True)
        order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), int(ids[i])))[:params.max_tokens]
        return ids[order]

    def plan(self, model, params):
        n = len(params.texts) if params.texts is not None else params.n_texts
        return [Unit(f"text-{i:04d}", {"text": i}) for i in range(n)] + [Unit("whole-ov")]

    def run(self, model, params, unit):
        if unit.key == "whole-ov":
            tokens = self.circuit_tokens(model, params)
            return {"ov_negative_copying": negative_copying(ov_eigenvalues(model, tokens)), "tokens": len(tokens)}
        return {"suppression": context_suppression(model, self.token_rows(model, params)[unit.data["text"]])}

    def merge(self, model, params, partials):
        total = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
        per_text = []
        for key, partial in iter_partials(partials):
            if key.startswith("text-"):
                per_text.append(torch.tensor(partial["suppression"], dtype=torch.float64))
                total += per_text[-1]
        n = len(per_text)
        ov = partials["whole-ov"]
        meta = self.meta(model, params, n_texts=n, circuit_tokens=ov["tokens"], uncertainty=method("texts", n))
        return HeadScores.from_matrix(total / n, meta,
                                      ov_negative_copying=torch.tensor(ov["ov_negative_copying"], dtype=torch.float64),
                                      **intervals({"score": torch.stack(per_text)}))


PROBE = CopySuppression()


def scan(model, texts=None, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Copy-suppression heads: `score` = suppression of in-context tokens' logits, `ov_negative_copying` the OV
    circuit's eigenvalue sign (see Params)."""
    if texts is not None:
        params["texts"] = [texts] if isinstance(texts, str) else list(texts)
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
