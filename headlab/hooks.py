"""One vocabulary of hook points on both module trees, attached by context managers that remove exactly the
handles they added.

A point is named the way TransformerLens names it - `blocks.3.attn.hook_z` - and the same name addresses the same
tensor on `.bridge` (TransformerLens' own hook point) and on `.hf` (a torch hook on the module the model's
`Architecture` names). `name("z", 3)` builds the name from a site and a layer.

    with attach(model, [(name("z", 3), fn)], tree="hf"):      # or tree="bridge"
        model.logits(tokens)
    logits, cache = run_with_cache(model, tokens, [name("pattern", layer) for layer in range(model.n_layers)])

A hook is fn(activation, point) -> a replacement or None, with the activation in the site's axes (SITES) on
either tree; `point.name`, `point.layer`, `point.tree`; on `.hf`, `point.continued` says whether the forward extends
a KV cache (decoding: the activation then holds only the new positions).
"""

from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from einops import rearrange
from jaxtyping import Float

from headlab.errors import InputError, UnsupportedModelError

# site -> (TransformerLens name inside block `layer`, axes of the activation after batch)
SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("pos", "d_model")),
    "resid_mid": ("hook_resid_mid", ("pos", "d_model")),
    "resid_post": ("hook_resid_post", ("pos", "d_model")),
    "attn_out": ("hook_attn_out", ("pos", "d_model")),
    "mlp_out": ("hook_mlp_out", ("pos", "d_model")),
    "q": ("attn.hook_q", ("pos", "head", "d")),
    "k": ("attn.hook_k", ("pos", "kv_head", "d")),
    "v": ("attn.hook_v", ("pos", "kv_head", "d")),
    # after a q/k norm, as the norm gives it: heads first after a per-head norm (Gemma3, Qwen3); [pos, heads * d]
    # after a norm over the whole projection (OLMo 2), see `normed_axes`
    "q_normed": ("attn.hook_q_normed", ("head", "pos", "d")),
    "k_normed": ("attn.hook_k_normed", ("kv_head", "pos", "d")),
    "z": ("attn.hook_z", ("pos", "head", "d")),
    "pattern": ("attn.hook_pattern", ("head", "dest", "src")),
    "scores": ("attn.hook_attn_scores", ("head", "dest", "src")),
    "q_input": ("attn.hook_q_input", ("pos", "head", "d_model")),
    "k_input": ("attn.hook_k_input", ("pos", "kv_head", "d_model")),
    "v_input": ("attn.hook_v_input", ("pos", "kv_head", "d_model")),
}
HF_SITES = ("resid_pre", "resid_post", "q", "k", "v", "q_normed", "k_normed", "z")  # the rest exist on .bridge only
TREES = ("hf", "bridge")
_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")

Hook = Callable[[torch.Tensor, "Point"], "torch.Tensor | None"]


def name(site: str, layer: int) -> str:
    """The point of `site` in `layer`, e.g. name("z", 3) == "blocks.3.attn.hook_z"."""
    if site not in SITES:
        raise InputError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
    return f"blocks.{layer}.{SITES[site][0]}"


def check_site(model, site: str | None) -> None:
    """UnsupportedModelError for a site the model's family does not have."""
    if site == "resid_mid" and model.architecture.parallel:
        raise UnsupportedModelError(f"{model.name} has no resid_mid: {model.architecture.family} runs attention and "
                                    "the MLP in parallel on the same residual stream; use resid_pre or resid_post")


def normed_axes(model, site: str) -> tuple[str, ...]:
    """The axes (after batch) of `site` on `model`; q_normed / k_normed depend on where the family's norm runs."""
    axes = SITES[site][1]
    if site.endswith("_normed") and model.architecture.qk_norm == "whole":
        return ("pos", f"{axes[0]} d")
    return axes


def per_head(model, site: str, activation: torch.Tensor) -> Float[torch.Tensor, "batch pos head d"]:
    """A q, k or v site's activation (normed or not) as [batch, pos, head, d], whatever the family's layout."""
    axes = normed_axes(model, site)
    if axes[0] == "pos" and len(axes) == 2:
        return rearrange(activation, "b n (h d) -> b n h d", d=model.d_head)
    return activation.transpose(1, 2) if axes[1] == "pos" else activation


def parse(point: str) -> tuple[str | None, int | None]:
    """(site, layer) of a block point's name, or (None, None) for a point outside the blocks' vocabulary (a
    TransformerLens name such as `ln_final.hook_scale`, which exists on `.bridge` only)."""
    match = _NAME.match(point)
    sites = {hook: site for site, (hook, _) in SITES.items()}
    if not match or match[2] not in sites:
        return None, None
    return sites[match[2]], int(match[1])


@dataclass
class Point:
    """What a hook is told about the point it runs at."""

    name: str
    layer: int | None
    tree: str
    state: dict = field(default_factory=dict, repr=False)

    @property
    def continued(self) -> bool:
        """On `.hf`: the forward extends a KV cache (its activations hold the new positions only)."""
        return bool(self.state.get("continued", False))


@contextmanager
def on_module(module: torch.nn.Module, *, pre=None, post=None, with_kwargs: bool = False) -> Iterator[None]:
    """Plain torch forward hooks on one module for the duration of the block, removed by their own handles."""
    with ExitStack() as stack:
        if pre is not None:
            stack.callback(module.register_forward_pre_hook(pre, with_kwargs=with_kwargs).remove)
        if post is not None:
            stack.callback(module.register_forward_hook(post, with_kwargs=with_kwargs).remove)
        yield


@contextmanager
def attach(model, hooks: Sequence[tuple[str, Hook]], tree: str = "hf") -> Iterator[None]:
    """Run `hooks` [(point name, fn)] on `tree` ("hf" or "bridge") inside the block; exactly these are removed."""
    if tree not in TREES:
        raise InputError(f"tree must be one of {', '.join(TREES)}, got {tree!r}")
    hooks = [(point, fn, *parse(point)) for point, fn in hooks]
    for point, _, site, layer in hooks:
        if layer is not None:
            model.check_layers([layer])
        check_site(model, site)
        if tree == "hf" and site not in HF_SITES:
            raise InputError(f"{point} has no counterpart on .hf (its sites: {', '.join(HF_SITES)}); attach it with "
                             "tree='bridge'")
        if tree == "bridge" and site is None and point not in model.bridge.hook_dict:
            raise InputError(f"{point!r} is not a hook point of {model.name}; build block points with "
                             f"hooks.name(site, layer) from the sites {', '.join(SITES)}")
    if tree == "bridge":
        wrapped = [(point, _bridge_hook(fn, point, layer)) for point, fn, _, layer in hooks]
        with model.bridge.hooks(fwd_hooks=wrapped):  # TransformerLens removes exactly the hooks this context added
            yield
        return
    state: dict = {"continued": False}
    with ExitStack() as stack:
        stack.enter_context(on_module(model.architecture.decoder(), pre=_mark_continued(state), with_kwargs=True))
        for point, fn, site, layer in hooks:
            stack.enter_context(_hf_point(model, site, layer, fn, Point(point, layer, "hf", state)))
        yield


def run_with_cache(model, tokens, points: Sequence[str] | Callable[[str], bool] | None = None, **forward_kwargs):
    """(logits, cache) of one `.bridge` forward, caching `points` (names, a filter, or None for every point);
    the cache is TransformerLens' ActivationCache, read by point name."""
    if isinstance(points, (list, tuple, set)):
        for point in points:
            check_site(model, parse(point)[0])
    names_filter = (lambda point: point in set(points)) if isinstance(points, (list, tuple, set)) else points
    with torch.no_grad():
        return model.bridge.run_with_cache(model.as_tokens(tokens), names_filter=names_filter, **forward_kwargs)


def attention_patterns(model, tokens, **forward_kwargs) -> Float[torch.Tensor, "batch layer head dest src"]:
    """Every layer's attention pattern from the bridge's `hook_pattern` (short context: N x N per head)."""
    points = [name("pattern", layer) for layer in range(model.n_layers)]
    _, cache = run_with_cache(model, tokens, points, **forward_kwargs)
    return torch.stack([cache[point] for point in points], dim=1)


def hf_activations(model, tokens, points: Sequence[str], **forward_kwargs) -> dict[str, torch.Tensor]:
    """{point: activation} of one `.hf` forward (the language-model head skipped when there are no pixel values)."""
    cache: dict[str, torch.Tensor] = {}

    def keep(activation, point):
        cache[point.name] = activation

    with attach(model, [(point, keep) for point in points], tree="hf"), torch.no_grad():
        model.hf(input_ids=model.as_tokens(tokens), **forward_kwargs)
    return cache


# ---- the .hf side ------------------------------------------------------------------------------------------------

def _bridge_hook(fn: Hook, point: str, layer: int):
    def hook(activation, hook):
        return fn(activation, Point(point, layer, "bridge"))
    return hook


def _mark_continued(state: dict):
    def mark(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state["continued"] = cache is not None and cache.get_seq_length() > 0
    return mark


def _hf_point(model, site: str, layer: int, fn: Hook, point: Point):
    """The torch hook that shows `fn` the activation of `site` in the site's axes and writes its answer back."""
    arch = model.architecture
    if site == "resid_pre":
        return on_module(arch.layers()[layer], pre=_residual_input(fn, point), with_kwargs=True)
    if site == "resid_post":
        return on_module(arch.layers()[layer], post=_residual_output(fn, point))
    if site == "z":
        return on_module(arch.o(layer), pre=_heads_input(fn, point, model.d_head))
    projection = {"q": arch.q, "k": arch.k, "v": arch.v, "q_normed": arch.q_normed,
                  "k_normed": arch.k_normed}[site](layer)
    if projection is None:
        raise UnsupportedModelError(f"{model.name} has no {site} ({arch.family} has no q/k norm); use the site "
                         f"{site.split('_')[0]!r}")
    return on_module(projection.module, post=_heads_output(fn, point, model.d_head, projection))


def _residual_input(fn: Hook, point: Point):
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0], point)
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        new = fn(kwargs["hidden_states"], point)
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return hook


def _residual_output(fn: Hook, point: Point):
    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden, point)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook


def _heads_input(fn: Hook, point: Point, d_head: int):
    def hook(module, args):
        new = fn(rearrange(args[0], "b n (h d) -> b n h d", d=d_head), point)
        return None if new is None else (rearrange(new, "b n h d -> b n (h d)"),) + tuple(args[1:])
    return hook


def _heads_output(fn: Hook, point: Point, d_head: int, projection):
    def hook(module, args, output):
        if projection.layout == "heads_last":  # [b, n, h, d], shown heads first as the site's axes say
            new = fn(output.transpose(1, 2), point)
            return None if new is None else new.transpose(1, 2)
        if projection.layout != "split":  # [b, h, n, d] after a per-head norm, [b, n, h * d] after a whole one
            return fn(output, point)
        part = output if projection.columns is None else output[..., projection.columns]
        new = fn(rearrange(part, "b n (h d) -> b n h d", d=d_head), point)
        if new is None:
            return None
        new = rearrange(new, "b n h d -> b n (h d)")
        if projection.columns is None:
            return new
        output = output.clone()
        output[..., projection.columns] = new
        return output
    return hook
