"""Architecture adapters: what headlab needs to know about one model family's Hugging Face module tree.

Probes and interventions never look inside a model by attribute names of their own: they ask the model's
`Architecture` for its layers, the modules whose inputs and outputs hold q, k, v and z, its norms and its masks.
Supporting a new family is one subclass here, listed in FAMILIES (see docs/DESIGN.md, "Adding an architecture").

    arch = architecture_for(hf)        # UnsupportedModelError names the supported families
    arch.layers()[3]                   # the fourth decoder (or encoder) layer
    arch.v(3)                          # Projection(module, part): v is module(...)'s output, or a slice of it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from headlab.errors import UnsupportedModelError


@dataclass(frozen=True)
class Projection:
    """Where a per-head tensor is produced: the output of `module` [batch, pos, heads * d] (a fused q/k/v
    projection: `part` of its last axis). `heads_first`: the module's output is [batch, heads, pos, d] (a q/k norm
    that runs after the heads are split)."""

    module: nn.Module
    part: slice | None = None
    heads_first: bool = False


class Architecture:
    """One family's module tree. Subclasses set the class attributes and override what differs."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values of the family
    auto_class: ClassVar[str] = "AutoModelForCausalLM"  # the transformers class that loads it
    hf_architecture: ClassVar[str]  # config.architectures when a checkpoint leaves it empty (GGUF); the bridge needs it
    causal: ClassVar[bool] = True
    has_qk_norm: ClassVar[bool] = False
    projections: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")  # attributes of attention()

    def __init__(self, hf: nn.Module, multimodal: bool = False):
        self.hf = hf
        self.multimodal = multimodal
        self.config = hf.config.get_text_config()

    # ---- the tree ------------------------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        """The language model's stack (its layers, norms and embeddings); inside a LLaVA model, the language model."""
        base = self.hf.base_model
        return getattr(base, "language_model", base)

    def layers(self) -> list[nn.Module]:
        return list(self.decoder().layers)

    def attention(self, layer: int) -> nn.Module:
        """The module that calls the attention function (it carries `layer_idx`)."""
        return self.layers()[layer].self_attn

    def _projection(self, layer: int, index: int) -> Projection:
        """q, k or v (index 0, 1, 2): a projection of its own, or a third of one fused q/k/v projection."""
        names = self.projections[:3]
        module = getattr(self.attention(layer), names[index])
        if names.count(names[index]) == 1:
            return Projection(module)
        width = self.config.hidden_size  # fused: q, k and v side by side
        return Projection(module, slice(index * width, (index + 1) * width))

    def q(self, layer: int) -> Projection:
        """Queries before RoPE, as the q projection gives them."""
        return self._projection(layer, 0)

    def k(self, layer: int) -> Projection:
        return self._projection(layer, 1)

    def v(self, layer: int) -> Projection:
        return self._projection(layer, 2)

    def q_normed(self, layer: int) -> Projection | None:
        """Queries after the family's q-norm, the vectors RoPE rotates (None: the family has no q-norm)."""
        return None

    def k_normed(self, layer: int) -> Projection | None:
        return None

    def o(self, layer: int) -> nn.Module:
        """The output projection: its input is z [batch, pos, heads * d], the heads' outputs before W_O."""
        return getattr(self.attention(layer), self.projections[3])

    def post_attention_norm(self, layer: int) -> nn.Module | None:
        """A norm applied to the attention block's output before it joins the residual stream (Gemma3)."""
        return None

    bridge_post_attention_norm: ClassVar[str | None] = None  # that norm's name in a TransformerLens bridge block

    def bridge_post_attention_norm_name(self, layer: int) -> str | None:
        """The bridge's hook prefix of the post-attention norm of `layer` (e.g. blocks.3.ln1_post), or None."""
        if self.post_attention_norm(layer) is None or self.bridge_post_attention_norm is None:
            return None
        return f"blocks.{layer}.{self.bridge_post_attention_norm}"

    # ---- masks ---------------------------------------------------------------------------------------------------
    def sliding_window(self, layer: int) -> int | None:
        """Keys visible to a query in `layer`: None for full attention, else w (query i sees keys i-w+1..i)."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types and layer_types[layer] == "sliding_attention":
            return self.config.sliding_window
        return None

    @staticmethod
    def layer_index(attention: nn.Module) -> int | None:
        """The layer of an attention module, as it reports itself to the attention function."""
        return getattr(attention, "layer_idx", None)


class Llama(Architecture):
    family = "Llama / Mistral / Qwen2"
    model_types = ("llama", "mistral", "qwen2")
    hf_architecture = "LlamaForCausalLM"


class Gemma3(Architecture):
    family = "Gemma3"
    model_types = ("gemma3_text",)
    hf_architecture = "Gemma3ForCausalLM"
    has_qk_norm = True

    def q_normed(self, layer: int) -> Projection:
        return Projection(self.attention(layer).q_norm, heads_first=True)

    def k_normed(self, layer: int) -> Projection:
        return Projection(self.attention(layer).k_norm, heads_first=True)

    bridge_post_attention_norm = "ln1_post"

    def post_attention_norm(self, layer: int) -> nn.Module:
        return self.layers()[layer].post_attention_layernorm


class Bert(Architecture):
    family = "BERT"
    model_types = ("bert",)
    auto_class = "BertForMaskedLM"
    hf_architecture = "BertForMaskedLM"
    causal = False
    projections = ("query", "key", "value")  # the output projection sits outside the self-attention module

    def layers(self) -> list[nn.Module]:
        return list(self.decoder().encoder.layer)

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention.self

    def o(self, layer: int) -> nn.Module:
        return self.layers()[layer].attention.output.dense


class GPT2(Architecture):
    """GPT-2: one fused projection (c_attn) gives q, k and v side by side; learned absolute positions."""

    family = "GPT-2"
    model_types = ("gpt2",)
    hf_architecture = "GPT2LMHeadModel"
    projections = ("c_attn", "c_attn", "c_attn", "c_proj")

    def layers(self) -> list[nn.Module]:
        return list(self.decoder().h)

    def attention(self, layer: int) -> nn.Module:
        return self.layers()[layer].attn


class GptOss(Architecture):
    """gpt-oss: the Llama layout with learned per-head sink logits (the attention function's `s_aux`) and a sliding
    window on alternate layers."""

    family = "gpt-oss"
    model_types = ("gpt_oss",)
    hf_architecture = "GptOssForCausalLM"


FAMILIES: tuple[type[Architecture], ...] = (Llama, Gemma3, Bert, GPT2, GptOss)
MULTIMODAL = ("llava",)  # a vision tower and projector around a language model of one of the families


def family_for(config) -> tuple[type[Architecture], bool]:
    """(adapter class, multimodal) for a transformers config; UnsupportedModelError names the families."""
    model_type = config.model_type
    multimodal = model_type in MULTIMODAL
    if multimodal:
        model_type = config.get_text_config().model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family, multimodal
    names = ", ".join(f"{f.family} ({', '.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModelError(f"headlab does not support the model type {config.model_type!r} yet; it supports "
                                f"{names}, and LLaVA around any of them")


def architecture_for(hf: nn.Module) -> Architecture:
    """The adapter of a loaded Hugging Face model."""
    family, multimodal = family_for(hf.config)
    return family(hf, multimodal)
