"""HeadModel: one set of weights, seen through Hugging Face (`.hf`) and TransformerLens (`.bridge`).

Loading (registry names, local folders, GGUF files, hub ids, models already in memory) is in headlab.loading; what
the model's family looks like inside is its `Architecture` (headlab.architectures); hook points are headlab.hooks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, Sequence

import torch
from jaxtyping import Int

from headlab.architectures import architecture_for
from headlab.errors import InputError
from headlab.heads import Head, all_heads, check_heads, check_layers


class HeadModel:
    """A transformer with its attention heads in view.

    `.hf` is the Hugging Face model (its own attention implementation, the long-context path);
    `.bridge` is a TransformerLens 4.x `TransformerBridge` over a second module tree that shares
    every parameter and buffer with `.hf` (hook path, eager N x N attention). No weight is held twice.
    `.architecture` names the family's modules; a family headlab does not know is refused here.
    `hf` may also be a TransformerLens bridge: `.hf` is then its model, unwrapped, and `.bridge` the bridge itself.
    name: what reports call the model (default: the config's name or path, else the model's class).
    """

    def __init__(self, name: str | None, hf, tokenizer=None, *, hf_name: str | None = None, load_info=None):
        hf, tokenizer, self._bridge = model_parts(hf, tokenizer)
        self.architecture = architecture_for(hf)
        self.name = name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.hf_name = hf_name or self.name
        self.load_info = load_info

    # ---- geometry -------------------------------------------------------------------------
    @property
    def config(self):
        """The language model's config (for a vision-language model, its text config)."""
        return self.hf.config.get_text_config()

    @property
    def is_multimodal(self) -> bool:
        """Whether the model takes images (`pixel_values`) beside tokens, LLaVA-style."""
        return self.architecture.multimodal

    @property
    def image_token_id(self) -> int | None:
        """The placeholder token that the projected image features replace (vision-language models)."""
        return getattr(self.hf.config, "image_token_id", None) if self.is_multimodal else None

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.n_heads

    @property
    def n_ctx(self) -> int:
        return self.config.max_position_embeddings

    @property
    def is_causal(self) -> bool:
        return self.architecture.causal

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def sliding_window(self, layer: int) -> int | None:
        """Keys visible to a query in `layer`: None for full attention, else w (query i sees keys i-w+1..i)."""
        return self.architecture.sliding_window(layer)

    @property
    def geometry(self) -> dict:
        return {
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head, "n_ctx": self.n_ctx, "is_causal": self.is_causal,
        }

    def __repr__(self) -> str:
        g = self.geometry
        return (f"HeadModel({self.name!r}: {g['n_layers']} layers x {g['n_heads']} heads "
                f"({g['n_kv_heads']} KV), d_head={g['d_head']}, n_ctx={g['n_ctx']}, "
                f"{'causal' if g['is_causal'] else 'bidirectional'}, {self.dtype}, {self.device})")

    # ---- heads and layers -----------------------------------------------------------------
    def all_heads(self) -> list[Head]:
        return all_heads(self.n_layers, self.n_heads)

    def check_heads(self, heads: Iterable) -> list[Head]:
        """Heads as (layer, head) tuples; accepts tuples and 'L12H3' strings. Raises HeadIndexError."""
        return check_heads(heads, self.n_layers, self.n_heads, self.name)

    def check_layers(self, layers: Iterable[int]) -> list[int]:
        """Layer indices of this model; InputError for one outside it."""
        return check_layers(layers, self.n_layers, self.name)

    # ---- tokens ---------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def bos_ids(self) -> list[int]:
        """What a causal prompt starts with: [BOS] (SmolLM2: `<|im_start|>`, Gemma3: `<bos>`), or [] for a
        model without one and for encoders (their tokenizer adds [CLS] itself)."""
        return [self.bos_token_id] if self.is_causal and self.bos_token_id is not None else []

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None) -> Int[torch.Tensor, "batch pos"]:
        """Token ids [batch, pos]. Causal models get exactly one BOS in front, as TransformerLens does; encoders get
        their own [CLS] ... [SEP]."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise InputError("to_tokens got no text; pass a string or a non-empty list of strings")
        if self.is_causal:
            bos = self.bos_ids if prepend_bos is None or prepend_bos else []
            rows = [bos + self.token_ids(t) for t in texts]
        else:
            rows = [self.tokenizer(t).input_ids for t in texts]
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise InputError(
                f"the texts tokenize to different lengths {sorted(lengths)}; pass equal-length texts or one at a time"
            )
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def token_ids(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added (for prompts joined piece by piece)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def as_tokens(self, tokens) -> Int[torch.Tensor, "batch pos"]:
        """Token ids [batch, pos] on the model's device from text (tokenized with `to_tokens`), a list of ids,
        or a [pos] / [batch, pos] tensor."""
        if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and isinstance(tokens[0], str)):
            return self.to_tokens(tokens)
        tokens = torch.as_tensor(tokens)
        return (tokens[None] if tokens.ndim == 1 else tokens).to(self.device)

    def to_str_tokens(self, tokens: Int[torch.Tensor, "pos"] | str) -> list[str]:
        if isinstance(tokens, str):
            tokens = self.to_tokens(tokens)[0]
        return [self.tokenizer.decode([t]) for t in torch.as_tensor(tokens).flatten().tolist()]

    def to_string(self, tokens: Int[torch.Tensor, "pos"]) -> str:
        return self.tokenizer.decode(torch.as_tensor(tokens).flatten().tolist())

    # ---- running --------------------------------------------------------------------------
    def check_pixel_values(self, pixel_values) -> dict:
        """{"pixel_values": ...} to pass to a forward, or {} for none; raises InputError for a text-only model."""
        if pixel_values is None:
            return {}
        if not self.is_multimodal:
            raise InputError(f"{self.name} has no image input; pass pixel_values only to a vision-language model")
        return {"pixel_values": torch.as_tensor(pixel_values).to(self.device, self.dtype)}

    @torch.no_grad()
    def logits(self, tokens, pixel_values=None) -> torch.Tensor:
        """Logits [batch, pos, vocab] from `.hf` (with the image's pixel values for a vision-language model)."""
        return self.hf(input_ids=self.as_tokens(tokens), **self.check_pixel_values(pixel_values)).logits

    @property
    def bridge(self):
        """The TransformerLens TransformerBridge over the same parameters (booted on first use)."""
        if self._bridge is None:
            self._bridge = boot_bridge(self.hf, self.tokenizer, self.hf_name, self.architecture.hf_architecture)
        return self._bridge

    def run_with_cache(self, tokens, names_filter=None, pixel_values=None):
        """(logits, cache) of one `.bridge` forward on tokens (or text), with pixel values if given; the cache is
        TransformerLens' ActivationCache (see headlab.hooks.run_with_cache)."""
        from headlab.hooks import run_with_cache

        return run_with_cache(self, tokens, names_filter, **self.check_pixel_values(pixel_values))

    def attention_stats(self, tokens, *, spans=None, want=None, layers=None, query_rows=None, backend: str = "auto"):
        """{layer: AttentionStats} from one `.hf` forward without any N x N tensor (see headlab.capture);
        want=None asks for the kernel's default statistics (lse, top1, span_mass)."""
        from headlab.capture import attention_stats
        from headlab.kernels import DEFAULT_WANT

        return attention_stats(self, tokens, spans=spans, want=DEFAULT_WANT if want is None else want, layers=layers,
                               query_rows=query_rows, backend=backend)

    # ---- interventions (see headlab.interventions) ------------------------------------------
    def ablate_heads(self, heads, mode: str = "uniform", reference=None):
        from headlab.interventions import ablate_heads

        return ablate_heads(self, heads, mode=mode, reference=reference)

    def scale_heads(self, factors: dict):
        from headlab.interventions import scale_heads

        return scale_heads(self, factors)


def model_parts(model, tokenizer=None) -> tuple:
    """(hf, tokenizer, bridge or None) of a transformers model or a TransformerLens TransformerBridge (its model
    unwrapped, its tokenizer unless one is given); InputError, in one sentence, for anything else."""
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

    if isinstance(model, (PreTrainedTokenizerBase, ProcessorMixin)):
        raise InputError(f"got a tokenizer ({type(model).__name__}) where the model goes; pass the model first and "
                         "the tokenizer as tokenizer=")
    bridge = None
    if not isinstance(model, PreTrainedModel):
        bridge = model if _is_bridge(model) else None
        if bridge is None:
            what = ("a torch module that is not a transformers model" if isinstance(model, torch.nn.Module) else
                    f"a {type(model).__name__}")
            raise InputError(f"headlab takes a registry name, a folder, a GGUF file, a hub id, a transformers "
                             f"PreTrainedModel or a TransformerLens TransformerBridge; got {what} "
                             f"({type(model).__module__}.{type(model).__qualname__})")
        model = unbridged(bridge)
        tokenizer = tokenizer if tokenizer is not None else bridge.tokenizer
    if tokenizer is None:
        tokenizer = _folder_tokenizer(model.config)
    if tokenizer is None:
        raise InputError(f"the {type(model).__name__} came without a tokenizer; pass its tokenizer as tokenizer= "
                         "(transformers' AutoTokenizer.from_pretrained on the model's folder or hub id)")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise InputError(f"tokenizer= takes a transformers tokenizer, got a {type(tokenizer).__name__}")
    return model, tokenizer, bridge


def _folder_tokenizer(config):
    """The tokenizer saved in the local folder the model was loaded from, or None."""
    from transformers import AutoTokenizer

    folder = getattr(config, "_name_or_path", "")
    if folder and any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(folder)
    return None


def _is_bridge(model) -> bool:
    """Whether `model` is a TransformerLens TransformerBridge (TransformerLens is imported only to ask)."""
    if not isinstance(model, torch.nn.Module) or not type(model).__module__.startswith("transformer_lens"):
        return False
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def unbridged(bridge):
    """The Hugging Face model under a TransformerBridge, as transformers built it: a copy of its module tree that
    shares every parameter and buffer, with each bridge component replaced by the module it wraps (the bridge swaps
    its components into the model it was given; that model keeps serving the bridge)."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    from headlab.attention import use_fast_path

    original = bridge.original_model
    shared = {id(t): t for t in list(original.parameters()) + list(original.buffers())}
    hf = copy.deepcopy(original, memo=shared)
    stack = [hf]
    while stack:
        module = stack.pop()
        for name, child in list(module._modules.items()):
            while isinstance(child, GeneralizedComponent):
                child = child.original_component
            module._modules[name] = child
            if child is not None:
                stack.append(child)
    use_fast_path(hf)
    return hf


def boot_bridge(hf, tokenizer, hf_name: str, hf_architecture: str):
    """A TransformerBridge on a copy of `hf`'s module tree that shares its parameters and buffers.

    The bridge replaces attention modules in place and forces eager attention, so it gets its own
    tree; `hf` keeps its modules and attention implementation.
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import source

    if not hf.config.architectures:  # GGUF checkpoints leave it empty; the bridge picks its adapter by it
        hf.config.architectures = [hf_architecture]
    shared = {id(t): t for t in list(hf.parameters()) + list(hf.buffers())}
    tree = copy.deepcopy(hf, memo=shared)
    # For multimodal models the bridge fetches a processor from the hub and, when that fails, pip-installs
    # torchvision, which replaces the CPU torch with CUDA wheels. headlab passes pixel values itself.
    load_processor = source.load_modality_processor
    source.load_modality_processor = lambda *args, **kwargs: None
    try:
        return TransformerBridge.boot_transformers(
            hf_name, hf_model=tree, tokenizer=tokenizer, device=str(hf.device), dtype=hf.dtype
        )
    finally:
        source.load_modality_processor = load_processor
