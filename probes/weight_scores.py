"""Weight-only head scores: the OV circuit's copying score and the QK circuit's positional structure (Elhage et al.
2021, "A Mathematical Framework for Transformer Circuits"; MAPS, Elhelo & Geva 2024). No data: one pass over the
weights.

Copying: the full OV circuit of head h maps a token to logits, W_E W_V W_O W_U [vocab, vocab] (the embedding read
through the layer's input norm, the unembedding through the final norm, a post-attention norm folded in). A copying
head raises the logit of the token it attends to, so its eigenvalues are mostly positive: the copying score is
Re(sum lambda) / sum |lambda| (1: all positive, -1: all negative, a copy-suppression head). Its nonzero eigenvalues are
those of the d_head x d_head matrix W_O W_U W_E W_V (AB and BA share them), so no vocab x vocab matrix is formed.

Position: for a rotary model, the part of a head's attention logit that depends only on the distance d between query
and key, averaged over tokens, is s(d) = qbar . R(d) kbar (q and k of a seeded sample of tokens through the layer's
input norm, q/k norms and RoPE, then averaged); softmax over d = 0 .. distances - 1 gives the attention a typical query
puts at each distance; previous_token is the share at d = 1.

    table = scan(model)        # score (copying), positive_share, previous_token, self_token, mean_distance
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from jaxtyping import Complex, Float

from headlab.errors import UnsupportedModelError
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.scores import HeadScores
from headlab.settings import constrained

COPYING_THRESHOLD = 0.5
PREVIOUS_THRESHOLD = 0.5


def copying_score(eigenvalues: Complex[torch.Tensor, "... n"]) -> Float[torch.Tensor, "..."]:
    """Re(sum lambda) / sum |lambda|; 0 for a circuit with no nonzero eigenvalue."""
    total = eigenvalues.abs().sum(-1)
    return torch.where(total > 0, eigenvalues.sum(-1).real / total.clamp_min(1e-300), torch.zeros_like(total))


def positive_share(eigenvalues: Complex[torch.Tensor, "... n"]) -> Float[torch.Tensor, "..."]:
    """The share of the eigenvalues' magnitude that has a positive real part."""
    total = eigenvalues.abs().sum(-1)
    positive = (eigenvalues.abs() * (eigenvalues.real > 0)).sum(-1)
    return torch.where(total > 0, positive / total.clamp_min(1e-300), torch.zeros_like(total))


def linear_map(module, width: int, columns=None) -> Float[torch.Tensor, "d_in d_out"]:
    """The matrix of a (possibly biased) linear module, read by applying it to the identity: module(I) - module(0)."""
    weight = next(module.parameters())
    eye = torch.eye(width, dtype=weight.dtype, device=weight.device)
    out = module(eye) - module(torch.zeros_like(eye[:1]))
    return (out if columns is None else out[:, columns]).double().cpu()


def norm_scale(module, width: int) -> Float[torch.Tensor, "d"]:
    """The per-feature scale of an RMS-type norm: its output on a vector of ones (whose RMS is one)."""
    weight = next(module.parameters())
    return module(torch.ones(1, width, dtype=weight.dtype, device=weight.device))[0].double().cpu()


def rms_normalised(x: Float[torch.Tensor, "n d"]) -> Float[torch.Tensor, "n d"]:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


@functools.lru_cache(maxsize=1)
@torch.no_grad()
def embedding_gram(model, chunk: int = 8192) -> Float[torch.Tensor, "d d"]:
    """U^T N [d_model, d_model]: the unembedding against the RMS-normalised embeddings, summed over the vocabulary
    in chunks (float64)."""
    embed, unembed = model.hf.get_input_embeddings(), model.hf.get_output_embeddings().weight
    vocab = unembed.shape[0]
    gram = torch.zeros(unembed.shape[1], unembed.shape[1], dtype=torch.float64)
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(vocab, start + chunk), device=unembed.device)
        gram += unembed[ids].double().cpu().T @ rms_normalised(embed(ids).double().cpu())
    return gram


def input_norm(model, layer: int):
    """The module that normalises the residual stream `layer`'s attention reads (the bridge's blocks.<layer>.ln1), or
    None: a post-norm model."""
    norm = getattr(model.bridge.blocks[layer], "ln1", None)
    return None if norm is None else norm.original_component


def final_norm(model):
    """The module that normalises the residual stream before the unembedding (the bridge's ln_final), or None."""
    norm = getattr(model.bridge, "ln_final", None)
    return None if norm is None else norm.original_component


def ov_matrices(model, layer: int, gram: Float[torch.Tensor, "d d"]) -> Float[torch.Tensor, "head d_head d_head"]:
    """Each head's W_O Gamma_post Gamma_final U^T N Gamma_in W_V (the small twin of the full OV circuit)."""
    arch, d, dh = model.architecture, model.architecture.config.hidden_size, model.d_head
    v_proj = arch.v(layer)
    w_v = linear_map(v_proj.module, d, v_proj.columns)  # [d, kv * dh]
    w_o = linear_map(arch.o(layer), model.n_heads * dh)  # [heads * dh, d]
    scale_out = norm_scale(final_norm(model), d)
    if arch.post_attention_norm(layer) is not None:
        scale_out = scale_out * norm_scale(arch.post_attention_norm(layer), d)
    middle = (scale_out[:, None] * gram) * norm_scale(input_norm(model, layer), d)[None, :]
    group = model.n_heads // (w_v.shape[1] // dh)
    return torch.stack([w_o[h * dh:(h + 1) * dh] @ middle @ w_v[:, (h // group) * dh:(h // group + 1) * dh]
                        for h in range(model.n_heads)])


def rotary_cos_sin(model, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [pos, d_head] of the model's rotary embedding for `layer` (None, None: the model has none)."""
    rotary = getattr(model.architecture.decoder(), "rotary_emb", None)
    if rotary is None:
        return None, None
    weight = next(model.hf.parameters())
    x = torch.zeros(1, len(positions), model.d_head, dtype=weight.dtype, device=weight.device)
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        kwargs["layer_type"] = model.architecture.config.layer_types[layer]
    cos, sin = rotary(x, positions[None].to(weight.device), **kwargs)
    return cos[0].double().cpu(), sin[0].double().cpu()


def rotate(x: Float[torch.Tensor, "... pos d"], cos, sin, sign: int = 1) -> Float[torch.Tensor, "... pos d"]:
    """RoPE as transformers applies it (halves rotated): x cos + rotate_half(x) sin (sign -1: the inverse)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + sign * rotated * sin


def positional_kernel(q: Float[torch.Tensor, "head d"], k: Float[torch.Tensor, "head d"], cos, sin, scale: float,
                      sign: int = 1) -> Float[torch.Tensor, "head distance"]:
    """Attention logits of a query at the last position over keys at distance 0, 1, ... (cos, sin [n, d] for
    positions 0 .. n-1): the query rotated to n-1, the key to n-1-distance."""
    n = cos.shape[0]
    q_rot = rotate(q[:, None, :], cos[n - 1:], sin[n - 1:])  # [head, 1, d]
    positions = torch.arange(n - 1, -1, -1)  # key position at distance 0, 1, ...
    k_rot = rotate(k[:, None, :], cos[positions], sign * sin[positions])  # [head, distance, d]
    return (q_rot * k_rot).sum(-1) * scale


@torch.no_grad()
def mean_qk(model, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qbar, kbar [head, d_head]: q and k of each sampled token (input norm, projection, q/k norm), averaged."""
    arch = model.architecture
    x = input_norm(model, layer)(model.hf.get_input_embeddings()(tokens[None].to(model.device)))[0]
    out = []
    for projection, normed, heads in ((arch.q(layer), arch.q_normed(layer), model.n_heads),
                                      (arch.k(layer), arch.k_normed(layer), model.n_kv_heads)):
        y = projection.module(x)
        y = y if projection.columns is None else y[:, projection.columns]
        if normed is not None and normed.layout == "whole":  # one norm over every head's columns
            y = normed.module(y)
        y = y.reshape(len(tokens), heads, model.d_head)
        if normed is not None and normed.layout != "whole":
            y = normed.module(y)
        out.append(y.double().mean(0).cpu())
    q, k = out
    return q, k.repeat_interleave(model.n_heads // model.n_kv_heads, 0)


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """distances: the keys a typical query sees for the positional scores (distance 0 .. distances - 1); n_tokens:
    the seeded sample of ordinary tokens whose q and k are averaged."""

    distances: int = constrained(64, at_least=2)
    n_tokens: int = constrained(4096, at_least=1)
    seed: int = 0


class WeightScores(Probe):
    name = "weight_scores"
    description = "weight-only scores: each head's OV copying score and its QK circuit's positional preference"
    paper = ("Elhage et al. 2021, A Mathematical Framework for Transformer Circuits; Elhelo & Geva 2024, "
             "Inferring Functionality of Attention Heads from their Parameters (MAPS)")
    Params = Params
    order = 90
    quick = {"n_tokens": 1024}
    needs_decoder = "reads the unembedding"
    min_context = 2
    columns = {
        "score": "OV copying score (Elhage et al.): Re(sum of eigenvalues) / sum of |eigenvalues| of W_E W_V W_O W_U "
                 "(1: copies the attended token into the logits, -1: suppresses it)",
        "positive_share": "the share of the OV eigenvalues' magnitude with a positive real part",
        "previous_token": "weights only: the share of a typical query's positional attention (mean q, k, RoPE) on "
                          "the previous token (NaN without rotary embeddings)",
        "self_token": "the same on the query's own position",
        "mean_distance": "the mean distance (tokens) of that positional attention",
    }
    signed = ("score",)
    roles = {"ov-copying": Role(),  # cut at threshold()
             "qk-previous-token": Role("previous_token", PREVIOUS_THRESHOLD, "by its weights alone, more than half "
                                                                              "of the head's positional attention "
                                                                              "falls on the previous token")}

    def threshold(self, scores):
        """Three quarters of the OV eigenvalues' magnitude positive: the head copies what it attends to."""
        return COPYING_THRESHOLD

    def validity(self, meta):
        return {"rests_on": f"the weights alone (the OV score: exact, no samples; the positional scores: q and k "
                            f"averaged over {meta['params']['n_tokens']} seeded ordinary tokens)",
                "baseline": "none: the OV score runs from -1 (suppresses) to 1 (copies), 0 neither; the positional "
                            "scores are shares of a typical query's attention", "warning": None}

    def check(self, model, params):
        super().check(model, params)
        if final_norm(model) is None or input_norm(model, 0) is None:
            raise UnsupportedModelError(f"weight_scores reads a pre-norm decoder's input and final norms; "
                                        f"{model.name} has none")

    def plan(self, model, params):
        return [Unit(f"{layer:04d}", {"layer": layer}) for layer in range(model.n_layers)]

    def tokens(self, model, params) -> torch.Tensor:
        vocab = model.hf.get_input_embeddings().weight.shape[0]
        special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=torch.long)
        ordinary = torch.arange(min(vocab, len(model.tokenizer)))
        ordinary = ordinary[~torch.isin(ordinary, special)]
        generator = torch.Generator().manual_seed(params.seed)
        return ordinary[torch.randperm(len(ordinary), generator=generator)[:params.n_tokens]]

    @torch.no_grad()
    def run(self, model, params, unit):
        layer = unit.data["layer"]
        eigenvalues = torch.linalg.eigvals(ov_matrices(model, layer, embedding_gram(model)))  # [head, d_head]
        cos, sin = rotary_cos_sin(model, layer, torch.arange(params.distances))
        if cos is None:
            positional = torch.full((model.n_heads, 3), float("nan"))
        else:
            q, k = mean_qk(model, layer, self.tokens(model, params))
            scale = float(getattr(model.architecture.attention(layer), "scaling", model.d_head ** -0.5))
            window = model.architecture.sliding_window(layer)
            logits = positional_kernel(q, k, cos, sin, scale)[:, :min(params.distances, window or params.distances)]
            probs = logits.softmax(-1)
            distance = torch.arange(probs.shape[-1], dtype=torch.float64)
            positional = torch.stack([probs[:, 1], probs[:, 0], (probs * distance).sum(-1)], -1)
        return {"copying": copying_score(eigenvalues), "positive": positive_share(eigenvalues),
                "positional": positional}

    def merge(self, model, params, partials):
        rows = [partial for _, partial in iter_partials(partials)]
        column = {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in ("copying", "positive")}
        positional = torch.tensor([r["positional"] for r in rows], dtype=torch.float64)  # [layer, head, 3]
        # no interval: no score here is a mean over data samples (the OV score is exact, see validity)
        return HeadScores.from_matrix(column["copying"], self.meta(model, params), positive_share=column["positive"],
                                      previous_token=positional[..., 0], self_token=positional[..., 1],
                                      mean_distance=positional[..., 2])


PROBE = WeightScores()


def scan(model, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Every head's OV copying score and positional QK scores from the weights alone. See Params."""
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
