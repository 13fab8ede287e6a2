"""The one attention seam: headlab's attention function, registered once with transformers, and a stack of handlers.

Inside `pushed(model, handler)` every `model.hf` forward sends each attention layer's call to `dispatch`, which runs
the handlers in force for that layer (a context variable, so nested blocks compose and threads do not share them):

  - a *splitter* (`split`, e.g. a KV-cache policy) owns where the keys are: it may hand the call on whole, or in
    parts (a group of query heads over its own keys, with their absolute positions) and assemble the output;
  - *kernel uses* (`Recorder`s that keep statistics, `AttentionEdit`s that rewrite the output) ask for the
    kernel: each part (or the whole call) is then computed once by `headlab.kernels.solve` with the union of what
    they want, and each use sees the statistics and the checked `Problem`;
  - with no kernel use, a call runs transformers' SDPA (a whole layer) or SDPA over the part's keys and mask.

So recording statistics under a KV policy composes: the recorder sees each part's keys (the keys the heads really
attend to) and maps what it records back to the layer's heads and absolute positions.
"""

from __future__ import annotations

import contextvars
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from headlab.architectures import Architecture
from headlab.errors import InputError
from headlab.kernels import Problem, check_problem, solve, visible_keys

ATTENTION_NAME = "headlab"
_stack: contextvars.ContextVar[tuple] = contextvars.ContextVar("headlab_attention_handlers", default=())


@dataclass(frozen=True)
class Call:
    """One attention call of one layer, or a part of it.

    query [b, h, n, d], key/value [b, kv, m, d]. A part has `heads` (the layer's query heads it holds, in order);
    with `key_pos` (the absolute positions of its keys, [m]) it has keys of its own and `mask` is a bool [n, m] (None:
    every key visible), without it the part reads the layer's keys and transformers' `mask`, as a whole call does.
    `sinks` [h]: the heads' learned sink logits (gpt-oss's `s_aux`; a part holds its heads'), None without.
    `root` is the whole call a part came from.
    """

    module: Any
    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: Any
    scaling: float | None
    softcap: float | None
    window: int | None
    causal: bool
    options: dict
    heads: tuple[int, ...] | None = None
    key_pos: torch.Tensor | None = None
    root: "Call | None" = None
    sinks: torch.Tensor | None = None

    @property
    def is_part(self) -> bool:
        return self.heads is not None

    def part(self, heads, query, key, value, mask, key_pos=None) -> "Call":
        """A group of query heads (`heads` of the layer) over keys of their own."""
        root = self.root or self
        heads = tuple(int(h) for h in heads)
        sinks = None if root.sinks is None else root.sinks[list(heads)]
        return dataclasses.replace(self, heads=heads, query=query, key=key, value=value, mask=mask, key_pos=key_pos,
                                   root=root, sinks=sinks)

    def problem(self, **options) -> Problem:
        """The kernel's checked Problem of this call (its logits: scaled and capped q . k)."""
        return check_problem(self.query, self.key, self.value, causal=self.causal,
                             window=None if self.key_pos is not None else self.window, scale=self.scaling, softcap=self.softcap,
                             spans=options.get("spans"), want=options.get("want", ()),
                             query_rows=options.get("query_rows"), sinks=self.sinks)


class Handler:
    """Something pushed on the seam for `layers` (None: every layer)."""

    layers: frozenset | None = None

    def covers(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


class Splitter(Handler):
    """Owns a layer's keys: `split(call, attend)` returns the output [b, n, h, d], calling `attend(part)` for the
    whole call or for parts (each answered [b, n, h', d])."""

    def split(self, call: Call, attend: Callable[[Call], torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class KernelUse(Handler):
    """Asks for the kernel: `want` statistics; `done(call, out [b, h, n, d], stats, problem)` returns the output."""

    want: tuple[str, ...] = ()
    spans: Any = None
    query_rows: Any = None
    backend: str | None = None  # None: no preference ("auto" unless another use names one)
    shadows: bool = False  # True: the innermost such use of a layer hides the outer ones (nested recordings)

    def done(self, call: Call, out, stats, problem: Problem):
        return out


def dispatch(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None,
             **kwargs):
    """transformers attention function: [b, h, n, d] q, [b, kv, n, d] k/v -> ([b, n, h, d], None). `s_aux` (gpt-oss):
    the heads' learned sink logits [h]."""
    layer = Architecture.layer_index(module)
    handlers = [h for h in _stack.get() if h.covers(layer)]
    sinks = kwargs.pop("s_aux", None)
    if not handlers and sinks is None and softcap is None:  # nothing to do here: transformers' SDPA, as without headlab
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **_optional(sliding_window=sliding_window), **kwargs)
    call = Call(module, layer, query, key, value, attention_mask, scaling, softcap, sliding_window,
                getattr(module, "is_causal", True), {"dropout": dropout, **kwargs}, sinks=sinks)
    return _run(call, handlers), None


def _run(call: Call, handlers: list[Handler]) -> torch.Tensor:
    splitters = [h for h in handlers if isinstance(h, Splitter)]
    if len(splitters) > 1:
        raise InputError("two KV-cache policies act on one layer; apply one at a time")
    uses = [h for h in handlers if isinstance(h, KernelUse)]
    shadowing = [use for use in uses if use.shadows]
    uses = [use for use in uses if not use.shadows or use is shadowing[-1]]
    if splitters and not call.is_part:
        return splitters[0].split(call, lambda part: _run(part, uses))
    if uses:
        return _kernel(call, uses)
    return sdpa(call)


def _optional(**values) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def sdpa(call: Call) -> torch.Tensor:
    """The call without headlab: transformers' SDPA path for a whole layer, SDPA over the part's keys for a part ->
    [b, n, h, d]. SDPA has neither softcap nor learned sinks: with either, the eager maths (the kernel's logits and
    softmax, masked)."""
    if call.key_pos is None and call.sinks is None and call.softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(call.module, call.query, call.key, call.value, call.mask, scaling=call.scaling,
                                      **_optional(sliding_window=call.window), **call.options)[0]
    group = call.query.shape[1] // call.key.shape[1]
    keys, values = call.key.repeat_interleave(group, 1), call.value.repeat_interleave(group, 1)
    if call.softcap is None and call.sinks is None:
        out = F.scaled_dot_product_attention(call.query, keys, values, attn_mask=call.mask, scale=call.scaling)
    else:
        problem = call.problem()
        scores = problem.logits(torch.matmul(call.query, keys.transpose(-1, -2)))
        mask = call.mask
        if mask is None and call.key_pos is None:  # a whole layer whose mask transformers left to is_causal
            n, m = call.query.shape[2], call.key.shape[2]
            mask = visible_keys(torch.arange(m - n, m), torch.arange(m), call.causal, call.window).to(scores.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(problem.probs(scores).to(values.dtype), values)
    return out.transpose(1, 2)


def _kernel(call: Call, uses: list[KernelUse]) -> torch.Tensor:
    if call.key_pos is not None and call.mask is not None:
        raise InputError("statistics and edits need each query to see all its keys or a causal prefix; a streaming "
                         "head's prefill sees sinks + window: record after an exact prefill (mode='full') or while "
                         "decoding")
    want = tuple(sorted({name for use in uses for name in use.want}))
    spans = next((use.spans for use in uses if use.spans is not None), None)
    query_rows = next((use.query_rows for use in uses if use.query_rows is not None), None)
    backend = next((use.backend for use in uses if use.backend is not None), "auto")
    problem = call.problem(spans=_part_spans(call, spans), want=want, query_rows=query_rows)
    out, stats = solve(call.query, call.key, call.value, problem, backend=backend)
    for use in uses:
        out = use.done(call, out, stats, problem)
    return out.transpose(1, 2).contiguous()


def _part_spans(call: Call, spans):
    """Spans of absolute key positions as index ranges into a part's keys (spans no key of the part falls in are
    left out; a recorder gives them zero mass)."""
    if spans is None or call.key_pos is None:
        return spans
    items = spans.items() if isinstance(spans, dict) else enumerate(spans)
    out = {}
    for name, (start, end) in items:
        lo, hi = (int(torch.searchsorted(call.key_pos, torch.tensor(x, device=call.key_pos.device)))
                  for x in (start, end))
        if hi > lo:
            out[name] = (lo, hi)
    return out


def use_fast_path(hf) -> None:
    """Give `hf` transformers' SDPA attention where it has it (TransformerLens' bridge boots its tree in eager)."""
    if getattr(hf, "_supports_sdpa", False):
        hf.set_attn_implementation("sdpa")


def handlers() -> tuple[Handler, ...]:
    """The handlers in force here, outermost first."""
    return _stack.get()


@contextmanager
def pushed(model, handler: Handler) -> Iterator[Handler]:
    """Inside the block `model.hf` runs headlab's attention function with `handler` on top of the stack."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, dispatch)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    token = _stack.set(_stack.get() + (handler,))
    previous = model.hf.config._attn_implementation
    switch = previous != ATTENTION_NAME
    try:
        if switch:
            model.hf.set_attn_implementation(ATTENTION_NAME)
        yield handler
    finally:
        if switch:
            model.hf.set_attn_implementation(previous)
        _stack.reset(token)
