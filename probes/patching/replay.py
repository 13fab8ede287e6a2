"""The replay engine: one base run on the bridge, resumed from any block (and, in a causal model, any position)
with a batch of patched copies, so blocks below a patch are never recomputed. Tied to TransformerLens 4.x's bridge:
it records each block's call and replays the blocks above it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch
from jaxtyping import Float, Int

from headlab.errors import InputError, UnsupportedModelError
from headlab.hooks import attach, on_module, run_with_cache
from headlab.hooks import name as hook_name
from headlab.probes.patching.tasks import Metric


class BlockReplay:
    """A base run on the bridge that remembers what every block received, so a batch of patched copies can start at
    block L from the base's residual: blocks below L see the same input as the base run and are not recomputed.
    In a causal model a patch at position p leaves positions before p unchanged, so copies can also start at p,
    reading the base run's keys and values for the positions before it (`resume(..., start=p)`)."""

    SLICED = {"attention_mask", "position_embeddings", "position_ids", "cache_position"}

    def __init__(self, model, tokens: Int[torch.Tensor, "batch pos"], names: Sequence[str] = ()):
        bridge = model.bridge
        self.model, self.bridge, self.tokens = model, bridge, tokens
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.prefix = _PrefixCache()
        wanted = set(names) | {hook_name("resid_pre", i) for i in range(model.n_layers)}
        with ExitStack() as stack:
            for i, block in enumerate(bridge.blocks):
                stack.enter_context(on_module(block, pre=self._recorder(i), with_kwargs=True))
            self.logits, self.cache = run_with_cache(model, tokens, wanted)
        soft_cap = getattr(bridge.cfg, "output_logits_soft_cap", -1) or -1
        self.soft_cap = soft_cap if soft_cap > 0 else None
        self.can_start_late = self._can_start_late()

    def _can_start_late(self) -> bool:
        if not self.model.is_causal or len(self.prefix.keys) != self.model.n_layers:
            return False
        for layer, (_, kwargs) in self.calls.items():
            if not isinstance(kwargs.get("attention_mask"), torch.Tensor):
                return False
            if self.prefix.keys[layer].shape[2] != self.tokens.shape[1]:
                return False
            if any(isinstance(v, torch.Tensor) and k not in self.SLICED for k, v in kwargs.items()):
                return False
        return True

    def _recorder(self, layer: int):
        def record(module, args, kwargs):
            from transformers.cache_utils import Cache

            # the family's KV cache, under whatever name or position its block takes it, becomes the prefix cache
            args = tuple(self.prefix if isinstance(a, Cache) else a for a in args)
            kwargs = {k: self.prefix if isinstance(v, Cache) else v for k, v in kwargs.items()}
            if not any(value is self.prefix for value in (*args, *kwargs.values())):
                kwargs["cache"] = self.prefix
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self.calls[layer] = (args[1:], kwargs)
            return args, kwargs
        return record

    def resume(self, layer: int, copies: int, hooks: Sequence[tuple[str, Callable]] = (), last_only: bool = False,
               start: int = 0) -> Float[torch.Tensor, "copies*batch pos vocab"]:
        """Logits of `copies` stacked copies of the base run (copy c holds rows c*batch ... (c+1)*batch - 1) from
        block `layer` and position `start` on (hooks see positions start...), with `hooks` active; `last_only`:
        logits of the last position only ([rows, 1, vocab])."""
        if start and not self.can_start_late:
            raise UnsupportedModelError(f"{self.model.name}'s blocks cannot be resumed from a later position")
        n = self.tokens.shape[0]
        x = self.cache[hook_name("resid_pre", layer)][:, start:].repeat(copies, 1, 1)
        self.prefix.start = start
        try:
            with attach(self.model, hooks, tree="bridge"):
                for i in range(layer, self.model.n_layers):
                    args, kwargs = self.calls[i]
                    kwargs = _from_position(kwargs, start)
                    out = self.bridge.blocks[i](x, *_repeat(args, n, copies), **_repeat(kwargs, n, copies))
                    x = out[0] if isinstance(out, tuple) else out
                logits = self.bridge.unembed(self.bridge.ln_final(x[:, -1:] if last_only else x))
        finally:
            self.prefix.start = None
        if self.soft_cap is not None:
            logits = self.soft_cap * torch.tanh(logits / self.soft_cap)
        if start and not last_only:  # positions before `start` are the base run's
            logits = torch.cat([self.logits[:, :start].repeat(copies, 1, 1), logits], dim=1)
        return logits


class _PrefixCache:
    """Stands in for the KV cache the bridge's attention updates: while the base run is recorded it keeps every
    layer's keys and values ([batch, kv, pos, d]); while copies resume at position p it puts the base run's first p
    keys and values in front of theirs."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.start: int | None = None  # None: recording the base run

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.start is None:
            self.keys[layer_idx], self.values[layer_idx] = k.detach(), v.detach()
            return k, v
        if not self.start:
            return k, v
        rows = k.shape[0] // self.keys[layer_idx].shape[0]
        prefix_k = self.keys[layer_idx][:, :, :self.start].repeat(rows, 1, 1, 1)
        prefix_v = self.values[layer_idx][:, :, :self.start].repeat(rows, 1, 1, 1)
        return torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)


def _from_position(kwargs: dict, start: int) -> dict:
    """A block's recorded arguments for queries at positions start... (keys stay at every position)."""
    if not start:
        return kwargs
    out = dict(kwargs)
    out["attention_mask"] = kwargs["attention_mask"][..., start:, :]
    if isinstance(kwargs.get("position_embeddings"), tuple):
        out["position_embeddings"] = tuple(t[:, start:] for t in kwargs["position_embeddings"])
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        out["position_ids"] = kwargs["position_ids"][:, start:]
    if isinstance(kwargs.get("cache_position"), torch.Tensor):
        out["cache_position"] = kwargs["cache_position"][start:]
    return out


def _repeat(value, n: int, copies: int):
    """Tensors of the base batch (leading dim n > 1), repeated for `copies` stacked copies; broadcastable ones kept."""
    if isinstance(value, torch.Tensor):
        return value.repeat(copies, *([1] * (value.ndim - 1))) if n > 1 and value.ndim and value.shape[0] == n \
            else value
    if isinstance(value, tuple):
        return tuple(_repeat(v, n, copies) for v in value)
    if isinstance(value, dict):
        return {k: _repeat(v, n, copies) for k, v in value.items()}
    return value


def _check_pair(model, clean, corrupted) -> tuple[torch.Tensor, torch.Tensor]:
    clean, corrupted = model.as_tokens(clean), model.as_tokens(corrupted)
    if clean.shape != corrupted.shape:
        raise InputError(f"clean and corrupted inputs must have the same shape [batch, pos], got "
                         f"{tuple(clean.shape)} and {tuple(corrupted.shape)}; pad or pick prompts of equal length")
    return clean, corrupted


def _last_only(metric: Metric) -> bool:
    """Metrics marked `last_position_only` (e.g. `logit_diff` at -1) read only the last position's logits, so
    patched runs unembed that position alone (they get logits [batch, 1, vocab])."""
    return bool(getattr(metric, "last_position_only", False))


def _scalar(metric: Metric, logits: torch.Tensor) -> float:
    value = torch.as_tensor(metric(logits))
    if value.numel() != 1:
        raise InputError(f"the metric must return a scalar, got shape {tuple(value.shape)}; average over the batch")
    return float(value)
