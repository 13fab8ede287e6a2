"""Architecture adapters: what headlab needs to know about one model family's Hugging Face module tree.

Probes and interventions never look inside a model by attribute names of their own: they ask the model's
`Architecture` for its layers, the modules whose inputs and outputs hold q, k, v and z, its norms and its masks.
The base class finds what follows the common conventions by itself (layers in `model.layers`, `decoder.layers`,
`h` or `encoder.layer`; the attention module `self_attn`, `attn` or `attention`; projections `q_proj`/`k_proj`/
`v_proj`/`o_proj` and their usual other names, or one fused q/k/v projection), so a family is a few declarative
lines: its model types and what differs (a fused layout, a q/k norm, sandwich norms, parallel attention + MLP, a
sliding window on every layer). See docs/DESIGN.md, "Adding an architecture".

    arch = architecture_for(hf)        # UnsupportedModelError names the supported families
    arch.layers()[3]                   # the fourth decoder (or encoder) layer
    arch.v(3)                          # Projection(module, columns): v is module(...)'s output, or columns of it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from headlab.errors import UnsupportedModelError

LAYER_LISTS = ("layers", "decoder.layers", "h", "encoder.layer")  # under the base model, the first that exists
ATTENTION = ("self_attn", "attn", "attention")  # inside a layer
Q, K, V = ("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")
QKV = ("qkv_proj", "query_key_value", "c_attn")  # one fused projection
O = ("o_proj", "out_proj", "dense", "c_proj")


@dataclass(frozen=True)
class Projection:
    """Where a per-head tensor is produced: the output of `module`, [batch, pos, heads * d] (a fused q/k/v
    projection: the `columns` of its last axis, a slice or an index tensor). `layout` is how that output holds the
    heads: "split" ([b, n, heads * d], shown to hooks as [b, n, heads, d]); or a q/k norm's output, shown to hooks
    heads first: "heads_first" ([b, heads, n, d]), "heads_last" ([b, n, heads, d]), or "whole" ([b, n, heads * d]
    shown as it is: a norm over the whole projection, as OLMo 2 has)."""

    module: nn.Module
    columns: slice | torch.Tensor | None = None
    layout: str = "split"


class Architecture:
    """One family's module tree. Subclasses set the class attributes and override what differs."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values of the family
    auto_class: ClassVar[str] = "AutoModelForCausalLM"  # the transformers class that loads it
    causal: ClassVar[bool] = True
    fused_layout: ClassVar[str] = "concat"  # a fused q/k/v projection: "concat" (q | k | v) or "per_head" (GPT-NeoX)
    # a q/k norm, by what it is given: "heads_first" [b, h, n, d] (Gemma3), "heads_last" [b, n, h, d] (Qwen3), both
    # over d; or "whole" [b, n, h * d], over every head at once (OLMo 2)
    qk_norm: ClassVar[str | None] = None
    post_attention_norm_name: ClassVar[str | None] = None  # a norm of the attention output before the residual
    bridge_post_attention_norm: ClassVar[str | None] = None  # that norm's name in a TransformerLens bridge block
    parallel_attention_mlp: ClassVar[bool] = False  # attention and MLP read the same residual (no resid_mid)
    window_on_every_layer: ClassVar[bool] = False  # config.sliding_window masks every layer (Mistral)
    learned_sinks: ClassVar[bool] = False  # a learned logit per head joins each softmax (its rows sum to less than 1)
    # how RoPE pairs a head's rotary features: "halves" (feature i with i + rotary_dims / 2, transformers'
    # rotate_half) or "interleaved" (2i with 2i + 1, GPT-J); and whether the rotary module returns (sin, cos)
    rotary_layout: ClassVar[str] = "halves"
    rotary_sin_first: ClassVar[bool] = False
    # where the rotary module's output holds each pair's angle: "first_half" (the first rotary_dims / 2 features:
    # transformers' angles concatenated with themselves, or given once as by gpt-oss and GPT-J) or "repeated" (each
    # angle twice in a row, Cohere)
    rotary_angles: ClassVar[str] = "first_half"

    def __init__(self, hf: nn.Module, multimodal: bool = False):
        self.hf = hf
        self.multimodal = multimodal
        self.config = hf.config.get_text_config()

    @property
    def has_qk_norm(self) -> bool:
        return self.qk_norm is not None

    @property
    def parallel(self) -> bool:
        """Attention and MLP read the same residual stream (a config may say otherwise, e.g. use_parallel_residual)."""
        return bool(getattr(self.config, "use_parallel_residual", self.parallel_attention_mlp))

    @property
    def hf_architecture(self) -> str:
        """The transformers class name TransformerLens' bridge picks its adapter by (config.architectures)."""
        return type(self.hf).__name__

    # ---- the tree ------------------------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The language model's stack (its layers, norms and embeddings); inside a LLaVA model, the language model."""
        base = self.hf.base_model
        return getattr(base, "language_model", base)

    def layers(self) -> list[nn.Module]:
        decoder = self.decoder()
        for path in LAYER_LISTS:
            try:
                return list(decoder.get_submodule(path))
            except AttributeError:
                continue
        raise UnsupportedModelError(f"{self.family}: none of {', '.join(LAYER_LISTS)} holds the layers")

    def attention(self, layer: int) -> nn.Module:
        """The module that calls the attention function (it carries `layer_idx`)."""
        return _child(self.layers()[layer], ATTENTION, self.family)

    def _projection(self, layer: int, index: int) -> Projection:
        """q, k or v (index 0, 1, 2): a projection of its own, or its columns of one fused q/k/v projection."""
        attention = self.attention(layer)
        own = next((getattr(attention, n) for n in (Q, K, V)[index] if hasattr(attention, n)), None)
        if own is not None:
            return Projection(own)
        fused = _child(attention, QKV, self.family)
        return Projection(fused, self._fused_columns(index, fused))

    def _fused_columns(self, index: int, fused: nn.Module) -> slice | torch.Tensor:
        """The columns of q, k or v in a fused projection's output."""
        d = self.d_head
        n_heads, n_kv = self.config.num_attention_heads, self.n_kv_heads
        if self.fused_layout == "per_head":  # [heads, (q k v), d] per position: q, k and v of each head together
            device = next(fused.parameters()).device
            heads = torch.arange(n_heads, device=device)[:, None] * 3 * d
            return (heads + index * d + torch.arange(d, device=device)).flatten()
        widths = (n_heads * d, n_kv * d, n_kv * d)  # q | k | v, k and v as wide as the KV heads
        start = sum(widths[:index])
        return slice(start, start + widths[index])

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    def q(self, layer: int) -> Projection:
        """Queries before RoPE, as the q projection gives them."""
        return self._projection(layer, 0)

    def k(self, layer: int) -> Projection:
        return self._projection(layer, 1)

    def v(self, layer: int) -> Projection:
        return self._projection(layer, 2)

    def q_normed(self, layer: int) -> Projection | None:
        """Queries after the family's q-norm, the vectors RoPE rotates (None: the family has no q-norm)."""
        return self._normed(layer, "q_norm")

    def k_normed(self, layer: int) -> Projection | None:
        return self._normed(layer, "k_norm")

    def _normed(self, layer: int, norm: str) -> Projection | None:
        if self.qk_norm is None:
            return None
        return Projection(getattr(self.attention(layer), norm), layout=self.qk_norm)

    def rotary_embedding(self) -> nn.Module | None:
        """The module that gives cos and sin for position ids (called as module(x, position_ids)), or None: no RoPE."""
        return getattr(self.decoder(), "rotary_emb", None)

    @property
    def rotary_dims(self) -> int:
        """The leading features of each q/k head that RoPE rotates, the rest passing unrotated (0: no RoPE)."""
        if self.rotary_embedding() is None:
            return 0
        rope = getattr(self.config, "rope_parameters", None) or {}
        return int(self.d_head * rope.get("partial_rotary_factor", 1.0))

    @property
    def logit_multiplier(self) -> float:
        """The constant the model multiplies its unembedding's output by: Granite's 1 / logits_scaling, Cohere's
        logit_scale, 1 elsewhere."""
        return getattr(self.config, "logit_scale", None) or 1 / (getattr(self.config, "logits_scaling", None) or 1)

    @property
    def final_softcap(self) -> float | None:
        """Gemma 2's cap on the final logits (cap * tanh(logit / cap)), None where there is none."""
        return getattr(self.config, "final_logit_softcapping", None)

    def o(self, layer: int) -> nn.Module:
        """The output projection: its input is z [batch, pos, heads * d], the heads' outputs before W_O."""
        return _child(self.attention(layer), O, self.family)

    def post_attention_norm(self, layer: int) -> nn.Module | None:
        """A norm applied to the attention block's output before it joins the residual stream (Gemma, OLMo 2)."""
        if self.post_attention_norm_name is None:
            return None
        return getattr(self.layers()[layer], self.post_attention_norm_name)

    def bridge_post_attention_norm_name(self, layer: int) -> str | None:
        """The bridge's hook prefix of the post-attention norm of `layer` (e.g. blocks.3.ln1_post), or None."""
        if self.post_attention_norm(layer) is None or self.bridge_post_attention_norm is None:
            return None
        return f"blocks.{layer}.{self.bridge_post_attention_norm}"

    # ---- masks ---------------------------------------------------------------------------------------------------
    def sliding_window(self, layer: int) -> int | None:
        """Keys visible to a query in `layer`: None for full attention, else w (query i sees keys i-w+1..i)."""
        attention = self.attention(layer)
        if hasattr(attention, "sliding_window"):  # set per layer by the family's own attention module
            return attention.sliding_window
        if self.window_on_every_layer:
            return getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types and layer_types[layer] == "sliding_attention":
            return self.config.sliding_window
        return None

    @staticmethod
    def layer_index(attention: nn.Module) -> int | None:
        """The layer of an attention module, as it reports itself to the attention function."""
        return getattr(attention, "layer_idx", None)


def _child(module: nn.Module, names: tuple[str, ...], family: str) -> nn.Module:
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise UnsupportedModelError(f"{family}: {type(module).__name__} has none of {', '.join(names)}")


# ---- the families: what differs from the conventions ------------------------------------------------------------

class Llama(Architecture):
    family = "Llama"
    model_types = ("llama", "granite", "granitemoe", "smollm3", "olmo", "qwen2", "qwen2_moe", "arcee", "seed_oss",
                   "nemotron")


class Mistral(Architecture):
    family = "Mistral / Mixtral"
    model_types = ("mistral", "mixtral", "starcoder2")
    window_on_every_layer = True


class Qwen3(Architecture):
    family = "Qwen3"
    model_types = ("qwen3", "qwen3_moe")
    qk_norm = "heads_last"


class Gemma(Architecture):
    family = "Gemma / VaultGemma"
    model_types = ("gemma", "vaultgemma")


class Gemma2(Architecture):
    """Sandwich norms around attention and MLP; Gemma 2 caps attention logits, Gemma 3 norms q and k per head."""

    family = "Gemma 2"
    model_types = ("gemma2",)
    post_attention_norm_name = "post_attention_layernorm"
    bridge_post_attention_norm = "ln1_post"


class Gemma3(Gemma2):
    family = "Gemma3"
    model_types = ("gemma3_text",)
    qk_norm = "heads_first"


class Olmo2(Architecture):
    """The norms sit after attention and MLP; q and k are normed over all heads at once."""

    family = "OLMo 2 / OLMo 3"
    model_types = ("olmo2", "olmo3")
    qk_norm = "whole"
    post_attention_norm_name = "post_attention_layernorm"
    bridge_post_attention_norm = "ln1_post"


class Exaone4(Architecture):
    """EXAONE 4: the norms sit after attention and MLP, as in OLMo 2; q and k are normed per head, heads first."""

    family = "EXAONE 4"
    model_types = ("exaone4",)
    qk_norm = "heads_first"
    post_attention_norm_name = "post_attention_layernorm"
    bridge_post_attention_norm = "ln1_post"


class Apertus(Architecture):
    family = "Apertus"
    model_types = ("apertus",)
    qk_norm = "heads_first"


class Glm(Architecture):
    """RoPE on part of each head (partial_rotary_factor), in interleaved pairs."""

    family = "GLM"
    model_types = ("glm",)
    rotary_layout = "interleaved"


class Glm4(Glm):
    """GLM-4: GLM with a norm on the attention output before it joins the residual stream (sandwich norms)."""

    family = "GLM-4"
    model_types = ("glm4",)
    post_attention_norm_name = "post_self_attn_layernorm"
    bridge_post_attention_norm = "ln1_post"


class Ernie45(Architecture):
    """RoPE in interleaved pairs."""

    family = "ERNIE 4.5"
    model_types = ("ernie4_5",)
    rotary_layout = "interleaved"


class Cohere(Architecture):
    """Command R: attention and MLP in parallel; RoPE in interleaved pairs, each angle repeated in place; q and k
    normed per head (heads last) where the model has those norms (Cohere's use_qk_norm)."""

    family = "Cohere"
    model_types = ("cohere", "cohere2")
    parallel_attention_mlp = True
    rotary_layout = "interleaved"
    rotary_angles = "repeated"

    @property
    def qk_norm(self) -> str | None:
        return "heads_last" if hasattr(self.attention(0), "q_norm") else None


class Olmoe(Architecture):
    family = "OLMoE"
    model_types = ("olmoe",)
    qk_norm = "whole"


class Phi3(Architecture):
    """One fused projection q | k | v, k and v as wide as the KV heads."""

    family = "Phi-3"
    model_types = ("phi3",)
    window_on_every_layer = True


class Phi(Architecture):
    family = "Phi"
    model_types = ("phi",)
    parallel_attention_mlp = True


class StableLM(Architecture):
    family = "StableLM"
    model_types = ("stablelm",)  # parallel attention + MLP where the config's use_parallel_residual says so

    def __init__(self, hf: nn.Module, multimodal: bool = False):
        super().__init__(hf, multimodal)
        if getattr(self.config, "qk_layernorm", False):
            raise UnsupportedModelError("headlab does not support StableLM with per-head q/k layer norms "
                                        "(qk_layernorm) yet: its q and k before RoPE would be read before those norms")


class GptOss(Architecture):
    """Learned per-head sink logits join each softmax's normaliser; sliding and full layers alternate."""

    family = "gpt-oss"
    model_types = ("gpt_oss",)
    learned_sinks = True


class GPTNeoX(Architecture):
    """Pythia: one fused projection holding q, k and v of each head together; attention and MLP in parallel."""

    family = "GPT-NeoX"
    model_types = ("gpt_neox",)
    fused_layout = "per_head"
    parallel_attention_mlp = True


class GPTJ(Architecture):
    """RoPE on the first rotary_dim features in interleaved pairs; its rotary module returns sin before cos."""

    family = "GPT-J"
    model_types = ("gptj",)
    parallel_attention_mlp = True
    rotary_layout = "interleaved"
    rotary_sin_first = True

    @property
    def rotary_dims(self) -> int:
        return self.config.rotary_dim or self.d_head


class OPT(Architecture):
    family = "OPT"
    model_types = ("opt",)

    def __init__(self, hf: nn.Module, multimodal: bool = False):
        super().__init__(hf, multimodal)
        if not getattr(self.config, "do_layer_norm_before", True):
            raise UnsupportedModelError("headlab does not support post-norm OPT (do_layer_norm_before=False, as in "
                                        "OPT-350M): it has no final norm, which TransformerLens' bridge needs")


class GPT2(Architecture):
    """GPT-2: one fused projection (c_attn, a Conv1D) gives q | k | v; learned absolute positions. GPTBigCode
    (StarCoder, SantaCoder): the same with a Linear c_attn whose k and v are one shared head (multi-query)."""

    family = "GPT-2 / GPTBigCode"
    model_types = ("gpt2", "gpt_bigcode")


class Bert(Architecture):
    family = "BERT"
    model_types = ("bert",)
    auto_class = "BertForMaskedLM"
    causal = False

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention.self

    def o(self, layer: int) -> nn.Module:  # outside the self-attention module
        return self.layers()[layer].attention.output.dense


def _subclasses(base: type[Architecture]) -> list[type[Architecture]]:
    return [family for sub in base.__subclasses__() for family in (sub, *_subclasses(sub))]


FAMILIES: tuple[type[Architecture], ...] = tuple(_subclasses(Architecture))  # every adapter defined above
MULTIMODAL = ("llava",)  # a vision tower and projector around a language model of one of the families
REFUSED = {  # model types headlab cannot read heads from, with the reason
    **dict.fromkeys(("falcon", "bloom", "mpt", "gpt_neo", "xglm"), "transformers computes its attention inside the "
                    "model's own attention module, not through the attention functions whose place headlab's "
                    "attention seam takes, so no head's attention can be read or edited"),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "kimi_k2"), "its multi-head latent attention compresses keys and "
                    "values into one shared latent, so there is no per-head key or value projection to read"),
}


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(config) -> tuple[type[Architecture], bool]:
    """(adapter class, multimodal) for a transformers config; UnsupportedModelError names the families."""
    model_type = config.model_type
    multimodal = model_type in MULTIMODAL
    if multimodal:
        model_type = config.get_text_config().model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family, multimodal
    if model_type in REFUSED:
        raise UnsupportedModelError(f"headlab cannot support the model type {model_type!r}: {REFUSED[model_type]}")
    raise UnsupportedModelError(f"headlab does not support the model type {config.model_type!r} yet; it supports "
                                f"{', '.join(supported_model_types())}, and LLaVA around any of them")


def architecture_for(hf: nn.Module) -> Architecture:
    """The adapter of a loaded Hugging Face model."""
    family, multimodal = family_for(hf.config)
    return family(hf, multimodal)
