"""Weight-only head scores: the OV circuit's copying score and the QK circuit's positional structure (Elhage et al.
2021, "A Mathematical Framework for Transformer Circuits"; MAPS, Elhelo & Geva 2024). No data: one pass over the
weights.

Copying: the full OV circuit of head h maps a token to logits, W_E W_V W_O W_U [vocab, vocab] (the embedding read
through the layer's input norm, the unembedding through the final norm, a post-attention norm folded in; a LayerNorm
centres what it reads, a norm without weight has gain one, and a family without an input norm, OLMo 2, reads the
embedding as it is). A copying head raises the logit of the token it attends to, so its eigenvalues are mostly
positive: the copying score is Re(sum lambda) / sum |lambda| (1: all positive, -1: all negative, a copy-suppression
head). Its nonzero eigenvalues are those of the d_head x d_head matrix W_O W_U W_E W_V (AB and BA share them), so no
vocab x vocab matrix is formed.

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
from jaxtyping import Complex, Float, Int
from torch import nn

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


def norm_scale(model, module) -> Float[torch.Tensor, "d"]:
    """The per-feature gain of a norm (ones where there is none): (module(x) - module(-x)) / 2x for x = +-1
    alternating, whose mean is 0 and RMS 1, so that an RMS norm's and a LayerNorm's division and centring leave x
    as it is and a bias cancels. A norm without a weight (OLMo) has gain one."""
    width = model.architecture.config.hidden_size
    if module is None:
        return torch.ones(width, dtype=torch.float64)
    x = torch.ones(width, dtype=torch.float64)
    x[1::2] = -1
    probe = x[None].to(model.dtype).to(model.device)
    return ((module(probe) - module(-probe))[0].double().cpu() / 2) * x


def rms_normalised(x: Float[torch.Tensor, "n d"]) -> Float[torch.Tensor, "n d"]:
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


@functools.lru_cache(maxsize=2)
@torch.no_grad()
def embedding_gram(model, normalisation: str | None = "rms", chunk: int = 8192) -> Float[torch.Tensor, "d d"]:
    """U^T N [d_model, d_model]: the unembedding against the embeddings as the layers' input norm normalises them
    ("rms": divided by their RMS; "layer": centred, then that; None: as they are, with no input norm), summed over
    the vocabulary in chunks (float64)."""
    embed, unembed = model.hf.get_input_embeddings(), model.hf.get_output_embeddings().weight
    vocab = unembed.shape[0]
    gram = torch.zeros(unembed.shape[1], unembed.shape[1], dtype=torch.float64)
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(vocab, start + chunk), device=unembed.device)
        rows = embed(ids).double().cpu()
        if normalisation == "layer":
            rows = rows - rows.mean(-1, keepdim=True)
        gram += unembed[ids].double().cpu().T @ (rows if normalisation is None else rms_normalised(rows))
    return gram


def _bridge_norm(bridge_norm) -> tuple[nn.Module | None, str | None]:
    """(the Hugging Face module, "rms" or "layer": whether it centres) of a bridge norm; (None, None) for none."""
    if bridge_norm is None:
        return None, None
    return bridge_norm.original_component, "rms" if bridge_norm.uses_rms_norm else "layer"


def input_norm(model, layer: int) -> tuple[nn.Module | None, str | None]:
    """The norm of the residual stream `layer`'s attention reads (the bridge's blocks.<layer>.ln1) and its kind, or
    (None, None): the family has no norm there (OLMo 2 norms after attention) or a post-norm model."""
    return _bridge_norm(getattr(model.bridge.blocks[layer], "ln1", None))


def final_norm(model) -> tuple[nn.Module | None, str | None]:
    """The norm of the residual stream before the unembedding (the bridge's ln_final) and its kind, or (None, None)."""
    return _bridge_norm(getattr(model.bridge, "ln_final", None))


def ov_matrices(model, layer: int) -> Float[torch.Tensor, "head d_head d_head"]:
    """Each head's W_O C Gamma_post Gamma_final U^T N Gamma_in W_V (the small twin of the full OV circuit; C centres
    the head's write where the final norm is a LayerNorm)."""
    arch, d, dh = model.architecture, model.architecture.config.hidden_size, model.d_head
    v_proj = arch.v(layer)
    w_v = linear_map(v_proj.module, d, v_proj.columns)  # [d, kv * dh]
    w_o = linear_map(arch.o(layer), model.n_heads * dh)  # [heads * dh, d]
    norm_out, kind_out = final_norm(model)
    scale_out = norm_scale(model, norm_out) * norm_scale(model, arch.post_attention_norm(layer))
    norm_in, kind_in = input_norm(model, layer)
    middle = (scale_out[:, None] * embedding_gram(model, kind_in)) * norm_scale(model, norm_in)[None, :]
    if kind_out == "layer":
        middle = middle - middle.mean(0, keepdim=True)  # C middle: the final norm subtracts the write's mean
    group = model.n_heads // (w_v.shape[1] // dh)
    return torch.stack([w_o[h * dh:(h + 1) * dh] @ middle @ w_v[:, (h // group) * dh:(h // group + 1) * dh]
                        for h in range(model.n_heads)])


@dataclass(frozen=True)
class Rotary:
    """A layer's RoPE as a per-feature rotation of a q or k head: feature i at position p becomes
    x_i cos[p, i] + x_partner[i] sin[p, i] (sin carries the sign: minus on the first feature of each pair; cos 1 and
    sin 0 on the features past the rotary dimensions, which pass unrotated)."""

    cos: Float[torch.Tensor, "pos d"]
    sin: Float[torch.Tensor, "pos d"]
    partner: Int[torch.Tensor, "d"]

    def rotate(self, x: Float[torch.Tensor, "... pos d"], positions: torch.Tensor, sign: int = 1
               ) -> Float[torch.Tensor, "... pos d"]:
        """x rotated to `positions` (sign -1: the inverse rotation)."""
        return x * self.cos[positions] + sign * x[..., self.partner] * self.sin[positions]


def rotary_of(model, layer: int, positions: torch.Tensor) -> Rotary | None:
    """The family's RoPE of `layer` at `positions` (None: the model has none), from its own rotary module and the
    adapter's rotary dimensions and pairing."""
    arch = model.architecture
    module, rot, d = arch.rotary_embedding(), arch.rotary_dims, model.d_head
    if module is None:
        return None
    x = torch.zeros(1, len(positions), d, dtype=model.dtype, device=model.device)
    kwargs = {}
    if "layer_type" in inspect.signature(module.forward).parameters:
        kwargs["layer_type"] = arch.config.layer_types[layer]
    first, second = module(x, positions[None].to(model.device), **kwargs)
    cos, sin = (second, first) if arch.rotary_sin_first else (first, second)
    # one angle per pair: transformers repeats the rotate_half angles over both halves (gpt-oss and GPT-J give each
    # once), Cohere repeats each in place
    angles = slice(0, rot, 2) if arch.rotary_angles == "repeated" else slice(0, rot // 2)
    cos, sin = cos[0, :, angles].double().cpu(), sin[0, :, angles].double().cpu()
    pairs = torch.arange(rot // 2)
    lead, follow = (2 * pairs, 2 * pairs + 1) if arch.rotary_layout == "interleaved" else (pairs, pairs + rot // 2)
    full_cos = torch.ones(len(positions), d, dtype=torch.float64)
    full_sin = torch.zeros(len(positions), d, dtype=torch.float64)
    full_cos[:, lead], full_cos[:, follow] = cos, cos
    full_sin[:, lead], full_sin[:, follow] = -sin, sin
    partner = torch.arange(d)
    partner[lead], partner[follow] = follow, lead
    return Rotary(full_cos, full_sin, partner)


def positional_kernel(q: Float[torch.Tensor, "head d"], k: Float[torch.Tensor, "head d"], rotary: Rotary,
                      scale: float, sign: int = 1) -> Float[torch.Tensor, "head distance"]:
    """Attention logits of a query at the last position over keys at distance 0, 1, ... (`rotary` for positions
    0 .. n-1): the query rotated to n-1, the key to n-1-distance (sign -1: the key rotated the wrong way)."""
    n = rotary.cos.shape[0]
    q_rot = rotary.rotate(q[:, None, :], torch.tensor([n - 1]))  # [head, 1, d]
    positions = torch.arange(n - 1, -1, -1)  # key position at distance 0, 1, ...
    k_rot = rotary.rotate(k[:, None, :], positions, sign)  # [head, distance, d]
    return (q_rot * k_rot).sum(-1) * scale


@torch.no_grad()
def mean_qk(model, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qbar, kbar [head, d_head]: q and k of each sampled token (input norm, projection, q/k norm), averaged."""
    arch = model.architecture
    x = model.hf.get_input_embeddings()(tokens[None].to(model.device))
    norm, _ = input_norm(model, layer)
    x = (x if norm is None else norm(x))[0]
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
        no_input_norm = input_norm(model, 0)[0] is None and model.architecture.post_attention_norm(0) is None
        if final_norm(model)[0] is None or no_input_norm:
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
        eigenvalues = torch.linalg.eigvals(ov_matrices(model, layer))  # [head, d_head]
        rotary = rotary_of(model, layer, torch.arange(params.distances))
        if rotary is None:
            positional = torch.full((model.n_heads, 3), float("nan"))
        else:
            q, k = mean_qk(model, layer, self.tokens(model, params))
            scale = float(getattr(model.architecture.attention(layer), "scaling", model.d_head ** -0.5))
            window = model.architecture.sliding_window(layer)
            logits = positional_kernel(q, k, rotary, scale)[:, :min(params.distances, window or params.distances)]
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
