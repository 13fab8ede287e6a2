"""The long-context capture path: per-head attention statistics from one Hugging Face forward, no N x N tensor.

A `Recorder` pushed on the attention seam (`headlab.attention`) computes each recorded layer with the kernel
(`headlab.kernels.solve`) and keeps the statistics; other layers run SDPA. `AttentionEdit`s rewrite a layer's output
from the same kernel call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from jaxtyping import Int

from headlab.attention import KernelUse, pushed
from headlab.errors import InputError
from headlab.kernels import DEFAULT_WANT, AttentionStats


@dataclass(frozen=True)
class AttentionEdit:
    """Rewrites one layer's attention output from its inputs and the kernel's statistics (e.g. ACT calibration).

    apply(q [b,h,nq,d], k [b,kv,nk,d], v [b,kv,nk,d], out [b,h,nq,d], stats, problem) -> out, where problem is the
    kernel's checked Problem (causal, window, scale, softcap; `problem.logits(raw)` scales and caps q . k);
    `want` names the statistics apply needs.
    """

    apply: Callable
    want: tuple[str, ...] = ()


class _Edits(KernelUse):
    """The seam's handler for a set of AttentionEdits, one per layer."""

    def __init__(self, edits: dict[int, AttentionEdit]):
        self.edits = edits
        self.layers = frozenset(edits)
        self.want = tuple(sorted({name for edit in edits.values() for name in edit.want}))

    def done(self, call, out, stats, problem):
        if call.is_part:
            raise InputError("an attention edit rewrites whole layers; it cannot act under a KV policy that splits "
                             f"layer {call.layer}")
        return self.edits[call.layer].apply(call.query, call.key, call.value, out, stats, problem)


@dataclass(eq=False)
class Recorder(KernelUse):
    """What a capture asks for and what the last forward collected, per layer.

    `want`, `spans` and `query_rows` may be changed between forwards (e.g. nothing during a prefill, `top1`
    during decoding); `n_keys[layer]` is the number of keys the layer saw in the last forward (with a KV cache
    the queries are the last positions of those keys). Under a KV policy that splits a layer into parts (streaming
    heads over their kept keys), each head's statistics are over the keys it attends to: `top1` is an absolute
    position, a span's mass counts the kept keys inside it, and `colsum` is not available.
    """

    layers: frozenset
    spans: dict | list | None
    want: tuple[str, ...]
    query_rows: object
    backend: str
    stats: dict[int, AttentionStats] = field(default_factory=dict)
    n_keys: dict[int, int] = field(default_factory=dict)
    _roots: dict = field(default_factory=dict, repr=False)  # per layer: the call whose parts are being assembled
    shadows = True  # a recording nested in this one takes over the layers it records

    def done(self, call, out, stats, problem):
        if call.is_part:
            self._done_part(call, stats)
        else:
            self.stats[call.layer] = stats
            self.n_keys[call.layer] = call.key.shape[2]
        return out

    def _done_part(self, call, stats) -> None:
        """Place a part's statistics [b, h', ...] at its heads of the layer's [b, H, ...]."""
        root = call.root
        if self._roots.get(call.layer) is not root:  # the first part of this call
            self._roots[call.layer] = root
            self.stats[call.layer] = AttentionStats(query_rows=stats.query_rows, span_names=self._span_names(),
                                                    sinks=None if root.sinks is None else root.sinks.detach().float())
            self.n_keys[call.layer] = int(call.key_pos[-1]) + 1 if call.key_pos is not None else call.key.shape[2]
        if stats.colsum is not None:
            raise InputError("colsum is not recorded under a KV policy that splits a layer (heads see other keys)")
        held, heads = self.stats[call.layer], list(call.heads)
        n_heads = root.query.shape[1]
        for name in ("lse", "top1", "top1_prob", "entropy", "span_mass"):
            value = getattr(stats, name)
            if value is None and name != "span_mass":
                continue
            if name == "top1" and call.key_pos is not None:
                value = call.key_pos[value]
            if name == "span_mass":
                value = self._part_span_mass(call, stats)
                if value is None:
                    continue
            whole = getattr(held, name)
            if whole is None:
                whole = value.new_zeros((value.shape[0], n_heads, *value.shape[2:]))
                setattr(held, name, whole)
            whole[:, heads] = value

    def _span_names(self) -> list[str]:
        if self.spans is None:
            return []
        return [str(name) for name in (self.spans if isinstance(self.spans, dict) else range(len(self.spans)))]

    def _part_span_mass(self, call, stats):
        """[b, h', nq, spans] with zero mass on the spans none of the part's keys fall in."""
        names = self._span_names()
        if not names or "span_mass" not in self.want:
            return None
        b, g, n = call.query.shape[:3]
        mass = call.query.new_zeros((b, g, n, len(names)), dtype=torch.float32)
        for i, name in enumerate(stats.span_names):
            mass[..., names.index(name)] = stats.span_mass[..., i]
        return mass


@contextmanager
def recording(model, *, layers=None, spans=None, want=DEFAULT_WANT, query_rows=None, backend: str = "auto"
              ) -> Iterator[Recorder]:
    """Inside the block every `model.hf` forward computes `layers` (default all) with the kernel and leaves
    their statistics in the yielded Recorder; works with a KV cache (decoding: queries are the last keys) and under
    a KV policy (`headlab.kv.applying`)."""
    layers = range(model.n_layers) if layers is None else model.check_layers(layers)
    recorder = Recorder(layers=frozenset(layers), spans=spans, want=tuple([want] if isinstance(want, str) else want),
                        query_rows=query_rows, backend=backend)
    with pushed(model, recorder):
        yield recorder


@contextmanager
def editing(model, edits: dict[int, AttentionEdit]) -> Iterator[None]:
    """Inside the block, `model.hf` computes the layers in `edits` with the kernel and rewrites their output."""
    model.check_layers(edits)
    with pushed(model, _Edits(dict(edits))):
        yield


@torch.no_grad()
def attention_stats(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    *,
    spans=None,
    want=DEFAULT_WANT,
    layers=None,
    query_rows=None,
    backend: str = "auto",
) -> dict[int, AttentionStats]:
    """Run `model.hf` once on unpadded `tokens` and return {layer: AttentionStats} for `layers` (default all).

    The language-model head is skipped (no [pos, vocab] logits); every other layer runs torch SDPA.
    """
    tokens = model.as_tokens(tokens)
    if tokens.shape[1] > model.n_ctx:
        raise InputError(f"{tokens.shape[1]} tokens exceed {model.name}'s context of {model.n_ctx}")
    with recording(model, layers=layers, spans=spans, want=want, query_rows=query_rows, backend=backend) as recorder:
        model.hf.base_model(input_ids=tokens, use_cache=False)
    return dict(sorted(recorder.stats.items()))


def stack_stats(stats: dict[int, AttentionStats], name: str) -> torch.Tensor:
    """One statistic of every captured layer stacked: [layers, ...]."""
    values = [getattr(layer_stats, name) for layer_stats in stats.values()]
    if any(value is None for value in values):
        raise InputError(f"the statistic {name!r} was not captured; ask for it in `want`")
    return torch.stack(values)
