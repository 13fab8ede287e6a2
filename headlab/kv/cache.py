"""Real eviction: a transformers Cache whose streaming heads hold only their kept positions, and the attention
function that reads it.

Mechanism, and why. Heads of one layer keep different numbers of keys, so no single [batch, kv_heads, keys, d]
tensor can hold a layer's cache without padding the streaming heads back to full length (which would keep the
bytes). `PolicyCache` is a `transformers.Cache` subclass whose layers are, per layer:
  - the model's own `DynamicLayer` (every head full) or `DynamicSlidingWindowLayer` (native local layers), so the
    `full` policy runs exactly the plain model's arithmetic;
  - a `PolicyLayer` otherwise: one tensor for the layer's full KV heads, and one small tensor per streaming KV head
    with the absolute positions of its entries. After every forward a streaming head keeps only its first `sink`
    positions, its last `window` and its pinned positions; a budget head keeps what the observation window chose.
`PolicyLayer.update` returns the full heads' keys to the model and leaves the streaming heads' entries for this
forward beside them; `applying` pushes the cache's handler on the attention seam (`headlab.attention`), which splits
such a layer's call into parts: the full heads over the layer's keys and mask (transformers' SDPA path), and each
streaming head over its kept keys only: in a prefill, query chunk by query chunk (sinks + window + chunk keys per
query: a Lambda-shaped mask, as DuoAttention's streaming heads compute it), in a decoding step over the few kept
keys. So the bytes held drop, and decoding reads fewer keys; a recorder pushed beside it (`headlab.capture`) sees the
keys each head really attends to.

Two prefill modes: "stream" (the streaming heads attend to and keep only sinks + window from the first prompt
token on; DuoAttention's deployment) and "full" (an exact prefill, then eviction of the cache; how SnapKV, HeadKV
and kvpress's presses act, and the only way a budget policy's observation window can see the whole prompt).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from headlab.attention import Call, Splitter, handlers, pushed
from headlab.errors import InputError
from headlab.kernels import visible_keys
from headlab.kv.policy import KVPolicy, full, long_layers

PREFILL_MODES = ("stream", "full")
QUERY_CHUNK = 1024  # queries per block when a streaming head attends in a prefill
POOL_KERNEL = 7  # SnapKV pools the observation window's attention over neighbouring keys


class _Stream:
    """One streaming KV head's entries: keys/values [b, 1, m, d], absolute positions [m], fixed [m] (never
    evicted: pinned sink tokens, or what a budget head's observation window chose)."""

    __slots__ = ("keys", "values", "pos", "fixed", "n_pinned", "view")

    def __init__(self):
        self.keys = self.values = self.pos = self.fixed = None
        self.n_pinned = 0
        self.view = None


class PolicyLayer(CacheLayerMixin):
    """One layer's cache under a policy: `keys`/`values` hold the full KV heads [b, n_full, seen, d]; `streams` one
    `_Stream` per other KV head."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "PolicyCache", n_kv: int, full_heads: list[int], sink: int, window: int,
                 sink_tokens: frozenset = frozenset(), pinned: int = 0):
        super().__init__()
        self.owner = owner
        self.full_idx = sorted(full_heads)
        self.stream_idx = [h for h in range(n_kv) if h not in set(full_heads)]
        self.sink, self.window, self.sink_tokens, self.pinned = sink, window, sink_tokens, pinned
        self.streams = {h: _Stream() for h in self.stream_idx}
        self.seen = 0
        self.q_start = 0  # position of the first query of the forward in flight

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, _, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, len(self.full_idx), 0, d)
        self.values = value_states.new_zeros(b, len(self.full_idx), 0, value_states.shape[-1])
        for stream in self.streams.values():
            stream.keys = key_states.new_zeros(b, 1, 0, d)
            stream.values = value_states.new_zeros(b, 1, 0, value_states.shape[-1])
            stream.pos = torch.zeros(0, dtype=torch.long, device=self.device)
            stream.fixed = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def _keep(self, stream: _Stream, last: int) -> torch.Tensor:
        return stream.fixed | (stream.pos < self.sink) | (stream.pos > last - self.window)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        start, self.seen = self.seen, self.seen + n
        self.q_start = start
        last = self.seen - 1
        if self.full_idx:
            self.keys = torch.cat([self.keys, key_states[:, self.full_idx]], dim=-2)
            self.values = torch.cat([self.values, value_states[:, self.full_idx]], dim=-2)
        if self.stream_idx:
            new_pos = torch.arange(start, self.seen, device=key_states.device)
            new_fixed = self._pins(start, n)
            for head, stream in self.streams.items():
                keys = torch.cat([stream.keys, key_states[:, head:head + 1]], dim=-2)
                values = torch.cat([stream.values, value_states[:, head:head + 1]], dim=-2)
                pos = torch.cat([stream.pos, new_pos])
                fixed = torch.cat([stream.fixed, new_fixed[head]])
                stream.keys, stream.values, stream.pos, stream.fixed = keys, values, pos, fixed
                keep = self._keep(stream, last)
                if n == 1:  # a decoding step: evict first, the query sees every kept entry
                    self._evict(stream, keep)
                    stream.view = (stream.keys, stream.values, stream.pos, stream.fixed)
                else:  # a prefill: attend over old + new entries with the Lambda mask, keep the survivors
                    stream.view = (keys, values, pos, fixed)
                    self._evict(stream, keep)
        return self.keys, self.values

    def _pins(self, start: int, n: int) -> dict[int, torch.Tensor]:
        """Per streaming head: which new positions are pinned sink tokens (the first `pinned` occurrences)."""
        out = {}
        ids = self.owner.token_ids[start:start + n] if self.sink_tokens and self.pinned else None
        for head, stream in self.streams.items():
            fixed = torch.zeros(n, dtype=torch.bool, device=self.device)
            if ids is not None and len(ids) == n and stream.n_pinned < self.pinned:
                hits = torch.tensor([i in self.sink_tokens for i in ids], dtype=torch.bool)
                where = hits.nonzero().flatten()
                where = where[where + start >= self.sink][: self.pinned - stream.n_pinned]
                fixed[where.to(self.device)] = True
                stream.n_pinned += len(where)
            out[head] = fixed
        return out

    @staticmethod
    def _evict(stream: _Stream, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        index = keep.nonzero().flatten()
        stream.keys = stream.keys.index_select(2, index)
        stream.values = stream.values.index_select(2, index)
        stream.pos = stream.pos[index]
        stream.fixed = stream.fixed[index]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # the full heads' mask: as a DynamicLayer's

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise InputError("a policy cache cannot be cropped: evicted entries are gone")

    def kept(self) -> dict[int, int]:
        """Entries held per KV head."""
        out = {h: self.keys.shape[-2] for h in self.full_idx}
        out.update({h: s.keys.shape[-2] for h, s in self.streams.items()})
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values] + [t for s in self.streams.values() for t in (s.keys, s.values)]


class PolicyCache(Cache):
    """A KV cache that applies a `KVPolicy`; see the module docstring. `token_ids` are the ids fed so far (for
    pinned sink tokens); `observe` > 0 asks an exact prefill to record the last `observe` queries' attention."""

    def __init__(self, model, policy: KVPolicy | None = None, *, observe: int = 0):
        policy = policy or full()
        if policy.is_budget:
            raise InputError(f"policy {policy.name!r} chooses its kept tokens after an exact prefill: "
                             "build it with prefill='full' (PolicyCache.evict)")
        self.model_geometry = (model.n_layers, model.n_kv_heads)
        self.policy = policy
        self.token_ids: list[int] = []
        self.observe = int(observe)
        self.observed: dict[int, torch.Tensor] = {}
        self.measure: dict | None = None
        keep = policy.full_matrix(model)
        layers = []
        for layer in range(model.n_layers):
            native = model.sliding_window(layer)
            if native is not None:
                layers.append(DynamicSlidingWindowLayer(sliding_window=native))
            elif keep[layer].all():
                layers.append(DynamicLayer())
            else:
                layers.append(PolicyLayer(self, model.n_kv_heads, [int(h) for h in keep[layer].nonzero()[0]],
                                          policy.sink, policy.window, policy.sink_tokens, policy.pinned))
        super().__init__(layers=layers)
        self._long = set(long_layers(model))

    def feed(self, ids) -> None:
        """Record the token ids of the next forward (before it runs)."""
        self.token_ids.extend(int(i) for i in torch.as_tensor(ids).flatten().tolist())

    # ---- eviction after an exact prefill -----------------------------------------------------------------
    def evict(self, policy: KVPolicy) -> "PolicyCache":
        """Apply `policy` to a cache filled by an exact prefill (this cache must hold every head): streaming heads
        keep sinks + window (+ pinned sink tokens), budget heads what the observation window chose."""
        if self.policy.full_heads is not None:
            raise InputError("evict needs a cache filled under the full policy")
        n_layers, n_kv = self.model_geometry
        keep = _full_matrix_from(policy, self)
        budgets = policy.budget_of()
        if budgets and not self.observed:
            raise InputError(f"policy {policy.name!r} needs the observation window's attention: "
                             f"prefill with PolicyCache(model, observe={policy.observe})")
        for layer in sorted(self._long):
            if keep[layer].all():
                continue
            old = self.layers[layer]
            if not isinstance(old, DynamicLayer) or old.keys is None:
                raise InputError("evict needs a prefilled cache of plain layers")
            new = PolicyLayer(self, n_kv, [int(h) for h in keep[layer].nonzero()[0]], policy.sink, policy.window,
                              policy.sink_tokens, policy.pinned)
            new.lazy_initialization(old.keys, old.values)
            seen = old.keys.shape[-2]
            new.seen = seen
            if new.full_idx:
                new.keys = old.keys[:, new.full_idx].contiguous()
                new.values = old.values[:, new.full_idx].contiguous()
            pos = torch.arange(seen, device=old.keys.device)
            pins = new._pins(0, seen)
            for head, stream in new.streams.items():
                if (layer, head) in budgets:
                    chosen = _snap_select(self.observed[layer][head], budgets[(layer, head)], policy.observe, seen)
                    fixed = torch.zeros(seen, dtype=torch.bool, device=pos.device)
                    fixed[chosen] = True
                    stream.pos, stream.fixed = pos, fixed
                    keep_mask = fixed
                else:
                    stream.pos, stream.fixed = pos, pins[head]
                    keep_mask = new._keep(stream, seen - 1)
                index = keep_mask.nonzero().flatten()
                stream.keys = old.keys[:, head:head + 1].index_select(2, index)
                stream.values = old.values[:, head:head + 1].index_select(2, index)
                stream.pos, stream.fixed = pos[index], stream.fixed[index]
            self.layers[layer] = new
        self.policy = policy
        self.observed = {}
        return self

    # ---- memory ------------------------------------------------------------------------------------------------
    def kept_tokens(self) -> torch.Tensor:
        """[layers, kv_heads]: entries each head holds now (measured on the cache tensors)."""
        n_layers, n_kv = self.model_geometry
        out = torch.zeros(n_layers, n_kv, dtype=torch.long)
        for layer, entry in enumerate(self.layers):
            if isinstance(entry, PolicyLayer):
                for head, count in entry.kept().items():
                    out[layer, head] = count
            elif entry.is_initialized and entry.keys is not None:
                out[layer] = entry.keys.shape[-2]
        return out

    def _tensors(self) -> list[torch.Tensor]:
        out = []
        for entry in self.layers:
            if isinstance(entry, PolicyLayer):
                out += entry.tensors()
            elif entry.is_initialized and entry.keys is not None:
                out += [entry.keys, entry.values]
        return out

    def kv_bytes(self) -> int:
        """Bytes of the key and value entries the cache holds (elements x element size, every tensor)."""
        return int(sum(t.numel() * t.element_size() for t in self._tensors()))

    def kv_bytes_held(self) -> int:
        """Bytes of the distinct storages behind those tensors (a slice keeps its whole storage alive)."""
        storages = {}
        for t in self._tensors():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return int(sum(storages.values()))


def _full_matrix_from(policy: KVPolicy, cache: PolicyCache):
    import numpy as np

    n_layers, n_kv = cache.model_geometry
    keep = np.ones((n_layers, n_kv), dtype=bool)
    if policy.full_heads is None:
        return keep
    for layer in cache._long:
        keep[layer] = False
    for layer, head in policy.full_heads:
        keep[layer, head] = True
    return keep


def _snap_select(scores: torch.Tensor, budget: int, observe: int, seen: int) -> torch.Tensor:
    """SnapKV's rule: the `budget` positions before the observation window with the most pooled attention from
    it, and the observation window itself."""
    window_start = max(0, seen - observe)
    candidates = scores[:window_start]
    count = min(budget, window_start)
    top = torch.topk(candidates, count).indices if count > 0 else torch.zeros(0, dtype=torch.long)
    return torch.cat([top.to(torch.long), torch.arange(window_start, seen)]).to(scores.device)


# ---- the seam's handler -----------------------------------------------------------------------------------------

class _PolicyHandler(Splitter):
    """The cache's policy on the attention seam: a layer of full heads goes on whole; a `PolicyLayer` goes on as a
    part for its full heads (the layer's keys and mask) and one part per streaming KV head (its kept keys)."""

    def __init__(self, cache: "PolicyCache"):
        self.cache = cache

    def covers(self, layer: int) -> bool:
        """A layer of full heads needs the policy only to observe or measure its prefill."""
        cache = self.cache
        entry = cache.layers[layer] if layer is not None and layer < len(cache.layers) else None
        return isinstance(entry, PolicyLayer) or (layer in cache._long and (bool(cache.observe)
                                                                            or cache.measure is not None))

    def split(self, call: Call, attend) -> torch.Tensor:
        cache = self.cache
        entry = cache.layers[call.layer] if call.layer is not None and call.layer < len(cache.layers) else None
        if not isinstance(entry, PolicyLayer):
            out = attend(call)
            if call.layer in cache._long and call.query.shape[2] > 1:
                if cache.observe:
                    _observe(cache, call.layer, _last_rows_probs(call, cache.observe), call.key.shape[1])
                if cache.measure is not None:
                    _measure_far(cache, call.layer, _last_rows_probs(call, cache.measure["rows"]))
            return out
        b, n_heads, n, _ = call.query.shape
        group = n_heads // (len(entry.full_idx) + len(entry.stream_idx))
        out = call.query.new_empty(b, n, n_heads, call.value.shape[-1])
        if entry.full_idx:
            heads = [kv * group + g for kv in entry.full_idx for g in range(group)]
            out[:, :, heads] = attend(call.part(heads, call.query[:, heads], call.key, call.value, call.mask))
        for kv, stream in entry.streams.items():
            heads = range(kv * group, (kv + 1) * group)
            out[:, :, kv * group:(kv + 1) * group] = _stream_attention(call, attend, heads, stream.view, entry.q_start,
                                                                       entry.sink, entry.window)
            stream.view = None
        return out


def _stream_attention(call: Call, attend, heads, view, q_start: int, sink: int, window: int,
                      chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """One streaming KV head's query heads over its entries (keys, values, pos, fixed) -> [b, n, g, d]: a query at i
    sees key j <= i when j < sink, i - j < window, or j is fixed. A prefill goes chunk by chunk of queries, each over
    only the keys some query of the chunk can see."""
    keys, values, pos, fixed = view
    query = call.query[:, heads.start:heads.stop]
    n = query.shape[2]
    if n == 1:  # decoding: the query sees every kept entry
        return attend(call.part(heads, query, keys, values, None, key_pos=pos))
    outs = []
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        q_pos = torch.arange(q_start + lo, q_start + hi, device=query.device)
        wanted = fixed | (pos < sink) | ((pos > q_start + lo - window) & (pos < q_start + hi))
        index = wanted.nonzero().flatten()
        k_pos, k_fixed = pos[index], fixed[index]
        visible = visible_keys(q_pos, k_pos, True, window) | (visible_keys(q_pos, k_pos, True, None)
                                                              & ((k_pos < sink) | k_fixed)[None])
        outs.append(attend(call.part(heads, query[:, :, lo:hi], keys.index_select(2, index),
                                     values.index_select(2, index), visible, key_pos=k_pos)))
    return torch.cat(outs, dim=1)


def _last_rows_probs(call: Call, rows: int) -> torch.Tensor:
    """[H, r, T] fp32 attention weights (from the kernel's logits: scaled, capped; with the heads' learned sinks in
    the normaliser) of a prefill's last `rows` queries on every key, causal-masked."""
    problem = call.problem()
    q = call.query[0, :, -rows:].float()
    k = call.key[0].float().repeat_interleave(q.shape[0] // call.key.shape[1], dim=0)
    total = k.shape[1]
    q_pos = torch.arange(total - q.shape[1], total, device=q.device)
    scores = problem.logits(torch.matmul(q, k.transpose(-1, -2)))
    visible = visible_keys(q_pos, torch.arange(total, device=q.device), True, None)
    return problem.probs(scores.masked_fill(~visible, float("-inf")))


def _observe(cache: PolicyCache, layer: int, probs: torch.Tensor, n_kv: int) -> None:
    """Record the pooled attention of the last `cache.observe` queries on every key, per KV head [kv, keys]."""
    weights = probs.sum(1)  # [H, T]
    total = weights.shape[-1]
    weights = weights.reshape(n_kv, weights.shape[0] // n_kv, total).sum(1)
    pooled = F.avg_pool1d(weights[:, None], POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)[:, 0]
    cache.observed[layer] = pooled


def _measure_far(cache: PolicyCache, layer: int, probs: torch.Tensor) -> None:
    """Per query head, the attention mass the last `rows` queries put on keys a streaming head would not keep
    (past the first `sink` and outside the last `window`), averaged over those rows: [H]."""
    sink, window = cache.measure["sink"], cache.measure["window"]
    n_rows, total = probs.shape[1:]
    q_pos = torch.arange(total - n_rows, total, device=probs.device)
    k_pos = torch.arange(total, device=probs.device)
    far = (k_pos[None] >= sink) & ~visible_keys(q_pos, k_pos, False, window)
    cache.measure["out"][layer] = (probs * far).sum(-1).mean(-1).cpu()


@contextmanager
def applying(model, cache: PolicyCache) -> Iterator[PolicyCache]:
    """Inside the block `model.hf` forwards given `cache=cache` run under its policy (on the attention seam). A cache
    of full heads only that neither observes nor measures needs nothing from the seam: the model then runs exactly as
    without headlab (the `full` policy costs what the plain model costs). Inside a block that already applies `cache`
    (a decoding loop around `step`), nothing more is pushed."""
    handler = _PolicyHandler(cache)
    if (not any(handler.covers(layer) for layer in range(len(cache.layers)))
            or any(isinstance(h, _PolicyHandler) and h.cache is cache for h in handlers())):
        yield cache
        return
    with pushed(model, handler):
        yield cache


# ---- driving a model ------------------------------------------------------------------------------------------

@torch.no_grad()
def prefill(model, ids, policy: KVPolicy | None = None, *, mode: str = "stream", chunk: int | None = None
            ) -> PolicyCache:
    """Run `ids` ([pos] or [1, pos]) through the model into a cache under `policy`. mode "stream": the policy acts
    from the first token (in `chunk`-token forwards if given, so even the prefill never holds more); "full": an exact
    prefill, then eviction (required by budget policies)."""
    policy = policy or full()
    if mode not in PREFILL_MODES:
        raise InputError(f"unknown prefill mode {mode!r}; use 'stream' or 'full'")
    ids = torch.as_tensor(ids).reshape(1, -1).to(model.device)
    if ids.shape[1] < 1:
        raise InputError("prefill needs at least one token")
    if policy.is_budget and mode != "full":
        raise InputError(f"policy {policy.name!r} is a budget policy: its kept tokens are chosen after an exact "
                         "prefill, use mode='full'")
    cache = PolicyCache(model, policy if mode == "stream" else full(),
                        observe=policy.observe if (mode == "full" and policy.is_budget) else 0)
    step = chunk or ids.shape[1]
    with applying(model, cache):
        for lo in range(0, ids.shape[1], step):
            piece = ids[:, lo:lo + step]
            cache.feed(piece)
            model.hf.base_model(input_ids=piece, cache=cache, use_cache=True)
    if mode == "full" and not policy.is_full:
        cache.evict(policy)
    return cache


@torch.no_grad()
def step(model, cache: PolicyCache, token) -> torch.Tensor:
    """One decoding step: logits [vocab] of the next token after `token` (an id)."""
    ids = torch.as_tensor(token).reshape(1, 1).to(model.device)
    cache.feed(ids)
    with applying(model, cache):
        return model.hf(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
