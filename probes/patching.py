"""Circuit patching on the hook path: activation patching, path patching, attribution patching (nodes and edges,
EAP) and direct logit attribution, batched.

Activation patching runs a *base* input with one activation replaced by its value on a *source* input and measures a
scalar metric of the logits. Denoising patches clean into corrupted (base = corrupted), noising corrupted into clean.
Results are `values` (the raw metric, as `transformer_lens.patching` returns it) and `normalised`
(0 = corrupted, 1 = clean). Many patches run as one batch, and a patch at layer L starts from the base run's
residual entering L: blocks below L are never recomputed (`Resumable`).

    task = ioi_task(model, n=16)
    z = activation_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric)
    z.normalised                                  # [layer, head]
    attribution_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric)
    path_patch(model, task.clean, task.corrupted, senders=[(9, 6)], component="q", metric=task.metric)
    direct_logit_attribution(model, task.clean, task.answer, task.wrong)
    scan(model, task)                             # HeadScores: patching, attribution, DLA per head
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import product

import torch
from jaxtyping import Float, Int

from headlab.errors import InputError, NoSignalError, UnsupportedModelError
from headlab.heads import by_layer
from headlab.hooks import attach, on_module, run_with_cache
from headlab.hooks import name as hook_name
from headlab.probe import Probe, Unit, iter_partials
from headlab.progress import progress_bar
from headlab.scores import HeadScores, head_name, parse_head
from headlab.stats import agreement  # noqa: F401 - part of this module's API (notebooks, studies)
from headlab.tasks import MCQAItem, load_mcqa, mcqa_example, option_token_ids
from headlab.uncertainty import intervals, method

Metric = Callable[[torch.Tensor], torch.Tensor]

# what can be patched -> axes of its activation after batch ("d" is never iterated; k and v have the KV heads)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "resid_pre": ("pos", "d"),
    "resid_mid": ("pos", "d"),
    "attn_out": ("pos", "d"),
    "mlp_out": ("pos", "d"),
    "z": ("pos", "head", "d"),
    "q": ("pos", "head", "d"),
    "k": ("pos", "head", "d"),
    "v": ("pos", "head", "d"),
    "pattern": ("head", "dest", "src"),
}
DEFAULT_OVER = {"pattern": ("head", "dest")}  # others: every axis but d (by position)
IOI_NAMES = ("John", "Mary", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Anna", "Mark", "Kate")


# ---------------------------------------------------------------------------------------------------------------
# tasks: clean / corrupted pairs and their metric

def logit_diff(answer: Int[torch.Tensor, "batch"], wrong: Int[torch.Tensor, "batch"], pos: int = -1) -> Metric:
    """Metric: mean over the batch of logit[answer] - logit[wrong] at `pos`."""
    answer, wrong = torch.as_tensor(answer), torch.as_tensor(wrong)

    def per_prompt(logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch"]:
        rows = torch.arange(len(answer))
        last = logits[:, pos]
        return last[rows, answer] - last[rows, wrong]

    def metric(logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        return per_prompt(logits).mean()

    metric.last_position_only = pos == -1
    metric.per_prompt = per_prompt  # the batch mean's terms: per-prompt values for confidence intervals
    return metric


@dataclass
class PatchingTask:
    """Clean and corrupted prompts of equal length; `answer` is right on clean, `wrong` on corrupted."""

    name: str
    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    answer: Int[torch.Tensor, "batch"]
    wrong: Int[torch.Tensor, "batch"]
    info: dict = field(default_factory=dict)

    @property
    def metric(self) -> Metric:
        return logit_diff(self.answer, self.wrong)

    def accuracy(self, model) -> float:
        """Fraction of clean prompts whose last-position logit ranks `answer` above `wrong`."""
        with torch.no_grad():
            last = model.bridge(self.clean)[:, -1]
        rows = torch.arange(len(self.answer))
        return float((last[rows, self.answer] > last[rows, self.wrong]).double().mean())


def ioi_task(model, n: int = 16, seed: int = 0, template: int = 0, corruption: str = "swap",
             names: Sequence[str] = IOI_NAMES) -> PatchingTask:
    """Indirect object identification (TransformerLens' `IOIDataset`, one template, n prompts from n // 2 name
    pairs in both orders): the clean prompt ends "... gave the milk to"; the metric is logit(indirect object) -
    logit(subject). Corrupted twin: `swap` exchanges the two names (its answer is the clean subject; with both
    orders in the batch, denoising and noising effects then coincide exactly), `names` replaces both by two other
    names (the IOI paper's ABC-style corruption: no information about either name is left). `names`: the pool
    (names that are not one token with and without a leading space are left out)."""
    from transformer_lens.evals import IOIDataset

    templates = IOIDataset.get_default_templates()
    if not 0 <= template < len(templates):
        raise InputError(f"template must be 0..{len(templates) - 1}, got {template}")
    if corruption not in ("swap", "names"):
        raise InputError(f"corruption must be 'swap' or 'names', got {corruption!r}")
    names = [name for name in names if len(model.token_ids(name)) == len(model.token_ids(" " + name)) == 1]
    if len(names) < (2 if corruption == "swap" else 4):
        raise UnsupportedModelError(f"too few of the IOI names are single tokens for {model.name}: {names}")
    data = IOIDataset(model.tokenizer, templates=[templates[template]], names=names, num_samples=n,
                      symmetric=True, seed=seed)
    rng = random.Random(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for first, second in zip(data.samples[0::2], data.samples[1::2]):
        a, b = option_token_ids(model, (first["IO"], first["S"]))
        # the dataset's text ends with the answer; the prompt stops before it
        one, two = first["text"][:-len(first["IO"])], second["text"][:-len(second["IO"])]
        clean += [one, two]
        if corruption == "swap":
            corrupted += [two, one]
        else:
            pair = {first["IO"].strip(), first["S"].strip()}
            others = rng.sample([name for name in names if name not in pair], 2)
            corrupted += [_rename(text, dict(zip(sorted(pair), others))) for text in (one, two)]
        answer += [a, b]
        wrong += [b, a]
    return _pair_task(model, f"ioi (template {template}, {corruption})", clean, corrupted, answer, wrong,
                      {"template": templates[template], "corruption": corruption, "seed": seed})


def _rename(text: str, names: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", lambda m: names[m.group(0)], text)


def mcqa_task(model, items: Sequence[MCQAItem], seed: int = 0) -> PatchingTask:
    """Multiple choice: the corrupted prompt swaps the right option with another one (seeded), so the right letter
    changes; `answer` is the clean letter, `wrong` the corrupted one. Items whose swap changes the token length are
    left out (counted in `info["dropped"]`)."""
    rng = random.Random(seed)
    clean, corrupted, answer, wrong, dropped = [], [], [], [], 0
    for item in items:
        other = rng.choice([i for i in range(len(item.options)) if i != item.answer])
        options = list(item.options)
        options[item.answer], options[other] = options[other], options[item.answer]
        a, b = mcqa_example(item), mcqa_example(MCQAItem(item.question, tuple(options), other))
        if len(model.to_tokens(a.prompt)[0]) != len(model.to_tokens(b.prompt)[0]):
            dropped += 1
            continue
        letters = option_token_ids(model, a.options)
        clean.append(a.prompt), corrupted.append(b.prompt)
        answer.append(letters[item.answer]), wrong.append(letters[other])
    return _pair_task(model, "mcqa", clean, corrupted, answer, wrong, {"dropped": dropped, "seed": seed})


def _pair_task(model, name, clean, corrupted, answer, wrong, info) -> PatchingTask:
    if not clean:
        raise InputError(f"the {name} task has no prompt pair of equal token length")
    lengths = [(len(model.to_tokens(a)[0]), len(model.to_tokens(b)[0])) for a, b in zip(clean, corrupted)]
    equal = [a for a, b in lengths if a == b]
    if not equal:
        raise InputError(f"the {name} task has no prompt pair of equal token length")
    keep = [i for i, (a, b) in enumerate(lengths) if a == b == max(set(equal), key=equal.count)]
    info = {**info, "n_pairs": len(keep), "left_out_other_lengths": len(clean) - len(keep)}
    return PatchingTask(name, model.to_tokens([clean[i] for i in keep]), model.to_tokens([corrupted[i] for i in keep]),
                        torch.tensor([answer[i] for i in keep]), torch.tensor([wrong[i] for i in keep]), info)


# ---------------------------------------------------------------------------------------------------------------
# the engine: one base run, resumed from any layer with a batch of patched copies

class Resumable:
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
            kwargs = {**kwargs, "cache": self.prefix}
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
                    kwargs = _from_position({**kwargs, "cache": self.prefix}, start)
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


def _site(component: str, layer: int) -> str:
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
    return hook_name(component, layer)


def _axes(component: str, over: Sequence[str] | None) -> tuple[str, ...]:
    _site(component, 0)
    tensor_axes = COMPONENTS[component]
    over = tuple(over) if over is not None else DEFAULT_OVER.get(component, tuple(a for a in tensor_axes if a != "d"))
    bad = [a for a in over if a not in tensor_axes or a == "d"]
    if bad or not over:
        raise InputError(f"{component} can be patched over {[a for a in tensor_axes if a != 'd']}, got {list(over)}")
    return tuple(a for a in tensor_axes if a in over)


def _sizes(model, component: str, axes: tuple[str, ...], n_pos: int) -> list[int]:
    heads = model.n_kv_heads if component in ("k", "v") else model.n_heads
    return [{"pos": n_pos, "head": heads, "dest": n_pos, "src": n_pos}[a] for a in axes]


@dataclass
class PatchResult:
    """Metric values of a sweep: `values[layer, *axes]` raw; `clean` and `corrupted` the unpatched metrics."""

    component: str
    axes: tuple[str, ...]
    values: torch.Tensor
    clean: float
    corrupted: float
    direction: str
    meta: dict = field(default_factory=dict)

    @property
    def normalised(self) -> torch.Tensor:
        """(value - corrupted) / (clean - corrupted): 0 = the corrupted run's metric, 1 = the clean run's."""
        if abs(self.clean - self.corrupted) < 1e-9:
            raise NoSignalError("clean and corrupted give the same metric, so effects cannot be normalised; "
                             "choose a corruption that changes the answer")
        return (self.values - self.corrupted) / (self.clean - self.corrupted)

    @property
    def effect(self) -> torch.Tensor:
        """How far each patch moves the metric from its base run, as a fraction of clean - corrupted (positive =
        the patch matters in the expected direction, for both denoising and noising)."""
        base = self.corrupted if self.direction == "denoise" else self.clean
        return (self.values - base) / (self.clean - self.corrupted) * (1 if self.direction == "denoise" else -1)



def _default_metric(metric, answer, wrong) -> Metric:
    if metric is not None:
        return metric
    if answer is None or wrong is None:
        raise InputError("give a metric, or answer and wrong token ids for the default logit difference")
    return logit_diff(answer, wrong)


def _chunk_size(model, n_batch: int, n_pos: int, memory_budget: int) -> int:
    """Copies per forward so the activations of one forward stay under `memory_budget` bytes (fp32 estimate)."""
    cfg = model.config
    per_row = n_pos * (16 * cfg.hidden_size + 3 * model.n_heads * n_pos + cfg.vocab_size
                       + 4 * getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)) * 4
    return max(1, int(memory_budget // max(1, per_row * n_batch)))


@torch.no_grad()
def activation_patch(model, clean, corrupted, component: str = "z", *, over: Sequence[str] | None = None,
                     metric: Metric | None = None, answer=None, wrong=None, direction: str = "denoise",
                     layers: Sequence[int] | None = None, memory_budget: int = 2**30,
                     progress: bool = True) -> PatchResult:
    """Patch `component` at every index of `over` in every layer; one metric value per patch.

    component: resid_pre, resid_mid, attn_out, mlp_out ([batch, pos, d]); z, q, k, v ([batch, pos, head, d]; k and v
    have the model's KV heads); pattern ([batch, head, dest, src]). `over` picks the axes iterated (default: by
    position; ("head",) patches a head at all positions). Result `values[layer, *over]` equal
    `transformer_lens.patching`'s for the same model, prompts and metric (denoise: base = corrupted run, clean
    activations patched in; noise: the reverse). Layers not in `layers` hold NaN.
    """
    clean, corrupted = _check_pair(model, clean, corrupted)
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    metric = _default_metric(metric, answer, wrong)
    axes = _axes(component, over)
    layers = list(range(model.n_layers)) if layers is None else model.check_layers(layers)
    sites = [_site(component, l) for l in layers]
    base_tokens, source_tokens = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    base = Resumable(model, base_tokens)
    source = Resumable(model, source_tokens, sites)
    values_clean, values_corrupted = (_scalar(metric, r.logits) for r in
                                      ((source, base) if direction == "denoise" else (base, source)))
    sizes = _sizes(model, component, axes, clean.shape[1])
    values = torch.full((model.n_layers, *sizes), float("nan"))
    tensor_axes = COMPONENTS[component]
    n, n_pos = clean.shape
    per_prompt = getattr(metric, "per_prompt", None)  # a batch-mean metric's terms, kept for intervals
    prompt_values = torch.full((model.n_layers, *sizes, n), float("nan")) if per_prompt else None
    chunk = _chunk_size(model, n, n_pos, memory_budget)
    jobs = _jobs(layers, list(product(*(range(s) for s in sizes))), axes, n, n_pos, chunk, base.can_start_late)
    for layer, start, batch in progress_bar(jobs, f"patching {component}", disable=not progress):
        name = _site(component, layer)
        where = [dict(zip(axes, index)) for index in batch]
        source_index = [tuple(w.get(a, slice(None)) for a in tensor_axes) for w in where]
        target_index = [tuple((w[a] - start if a in POSITION_AXES else w[a]) if a in w else slice(None)
                              for a in tensor_axes) for w in where]
        hook = _patch_hook(target_index, source_index, source.cache[name], n)
        logits = base.resume(layer, len(batch), [(name, hook)], _last_only(metric), start=start)
        for c, index in enumerate(batch):
            values[(layer, *index)] = _scalar(metric, logits[c * n:(c + 1) * n])
            if per_prompt:
                prompt_values[(layer, *index)] = per_prompt(logits[c * n:(c + 1) * n])
    meta = {"layers": layers, "chunk": chunk, "n_prompts": n, "forwards": len(jobs)}
    if per_prompt:
        clean_run, corrupted_run = (source, base) if direction == "denoise" else (base, source)
        meta.update(per_prompt=prompt_values, clean_per_prompt=per_prompt(clean_run.logits),
                    corrupted_per_prompt=per_prompt(corrupted_run.logits))
    return PatchResult(component, axes, values, values_clean, values_corrupted, direction, meta)


POSITION_AXES = ("pos", "dest")  # a patch here leaves earlier positions unchanged (causal models)
MIN_ROW_TOKENS = 1024  # a forward of fewer rows x tokens than this costs mostly overhead on a CPU


def _jobs(layers, indices, axes, n, n_pos, chunk, late: bool) -> list[tuple[int, int, list]]:
    """(layer, start position, patches) per forward: patches sorted by their first affected position, grouped
    while a group is small (under MIN_ROW_TOKENS rows x tokens) and under the memory chunk."""
    def first(index):
        return min((v for a, v in zip(axes, index) if a in POSITION_AXES), default=0) if late else 0

    ordered = sorted(indices, key=first)
    jobs = []
    for layer in layers:
        group: list = []
        for index in ordered:
            if group and (len(group) >= chunk or len(group) * n * (n_pos - first(group[0])) >= MIN_ROW_TOKENS):
                jobs.append((layer, first(group[0]), group))
                group = []
            group.append(index)
        if group:
            jobs.append((layer, first(group[0]), group))
    return jobs


def _patch_hook(targets: list[tuple], sources: list[tuple], source: torch.Tensor, n: int) -> Callable:
    """Copy c (rows c*n ... (c+1)*n - 1) takes `source[sources[c]]` at `targets[c]` (they differ when the copies
    start at a later position)."""
    def hook(activation, hook):
        activation = activation.clone()
        for c, (target, index) in enumerate(zip(targets, sources)):
            activation[(slice(c * n, (c + 1) * n), *target)] = source[(slice(None), *index)]
        return activation
    return hook


# ---------------------------------------------------------------------------------------------------------------
# what each head writes into the residual stream

def norm_gain(model, prefix: str) -> torch.Tensor:
    """The elementwise gain of the bridge's RMS-type norm at `prefix` (e.g. "ln_final"): what it multiplies x / scale
    by, read by running the norm on ones with its hook_scale forced to 1: [d_model]."""
    norm = model.bridge.get_submodule(prefix)
    force = [(f"{prefix}.hook_scale", lambda scale, point: torch.ones_like(scale))]
    with attach(model, force, tree="bridge"), torch.no_grad(), warnings.catch_warnings():
        # forcing the scale is the point: TransformerLens warns that a hook edited the norm
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale", category=UserWarning)
        return norm(torch.ones(1, 1, model.config.hidden_size)).flatten()


def _is_rms(cache, prefix: str) -> bool:
    x, scale, normed = (cache[f"{prefix}.{h}"] for h in ("hook_in", "hook_scale", "hook_normalized"))
    return bool(torch.allclose(x / scale, normed, rtol=1e-4, atol=1e-5))


def write_names(model, layer: int) -> list[str]:
    """The cache entries `head_writes` reads for `layer`."""
    names = [hook_name("z", layer)]
    if model.architecture.post_attention_norm(layer) is not None:
        names += [f"blocks.{layer}.ln1_post.{h}" for h in ("hook_in", "hook_scale", "hook_normalized")]
    return names


def head_writes(model, cache, layer: int) -> Float[torch.Tensor, "batch pos head d_model"]:
    """Each head's share of the attention block's residual write: z_h @ W_O[h], then (Gemma3's post-attention
    norm) times the norm's gain over the scale it had in this run. Summed over heads it is hook_attn_out
    (without an output bias, which no head owns)."""
    block = model.bridge.blocks[layer]
    z = cache[hook_name("z", layer)]
    writes = torch.einsum("bphd,hdm->bphm", z, block.attn.W_O.detach())
    if model.architecture.post_attention_norm(layer) is not None:
        prefix = f"blocks.{layer}.ln1_post"
        if not _is_rms(cache, prefix):
            raise UnsupportedModelError(f"{model.name}: the post-attention norm of layer {layer} is not RMS-type; "
                             "per-head writes are not defined")
        writes = writes / cache[f"{prefix}.hook_scale"].unsqueeze(2) * norm_gain(model, prefix)
    return writes


# ---------------------------------------------------------------------------------------------------------------
# path patching: sender heads -> receiver heads through q, k or v only

@contextmanager
def split_qkv_input(model):
    """Give every head its own copy of the residual as q/k/v input (hook_q_input etc.), restored on exit."""
    bridge = model.bridge
    saved = bool(getattr(bridge.cfg, "use_split_qkv_input", False))
    bridge.set_use_split_qkv_input(True)
    try:
        yield
    finally:
        bridge.set_use_split_qkv_input(saved)


def _sender_deltas(model, clean_cache, corrupted_cache, senders) -> list[tuple[int, torch.Tensor]]:
    """(layer, clean - corrupted write [batch, pos, d_model]) of each sender."""
    writes = {layer: (head_writes(model, clean_cache, layer), head_writes(model, corrupted_cache, layer))
              for layer in {l for l, _ in senders}}
    return [(l, writes[l][0][:, :, h] - writes[l][1][:, :, h]) for l, h in senders]


@torch.no_grad()
def path_patch(model, clean, corrupted, senders, *, component: str = "q", metric: Metric | None = None,
               answer=None, wrong=None, receivers: Sequence | None = None, memory_budget: int = 2**30,
               progress: bool = True) -> PatchResult:
    """Direct path patching (Wang et al. 2022): on the corrupted run, add the senders' clean-minus-corrupted write
    to one receiver head's own q, k or v input (its copy of the residual before ln1) and nothing else. One value per
    receiver head in a later layer than a sender (`values[layer, head]`; k and v: KV heads; NaN elsewhere).
    With one sender, equal to `transformer_lens.patching.get_act_patch_direct_path`."""
    clean, corrupted = _check_pair(model, clean, corrupted)
    if component not in ("q", "k", "v"):
        raise InputError(f"path patching reaches a receiver through 'q', 'k' or 'v', got {component!r}")
    metric = _default_metric(metric, answer, wrong)
    senders = model.check_heads([parse_head(s) for s in senders])
    if not senders:
        raise InputError("give at least one sender head")
    n_heads = model.n_kv_heads if component in ("k", "v") else model.n_heads
    first = min(l for l, _ in senders) + 1
    if receivers is None:
        receivers = [(l, h) for l in range(first, model.n_layers) for h in range(n_heads)]
    receivers = [parse_head(r) for r in receivers]
    bad = [head_name(*r) for r in receivers if not (first <= r[0] < model.n_layers and 0 <= r[1] < n_heads)]
    if bad:
        raise InputError(f"receivers must be {component} heads after the first sender's layer: {bad}")
    names = [name for l, _ in senders for name in write_names(model, l)]
    clean_run = Resumable(model, clean, names)
    n = clean.shape[0]
    values = torch.full((model.n_layers, n_heads), float("nan"))
    with split_qkv_input(model):
        base = Resumable(model, corrupted, names)
        receivers_by_layer = dict(sorted(by_layer(receivers).items()))
        chunk = _chunk_size(model, n, clean.shape[1], memory_budget)
        jobs = [(l, hs[i:i + chunk]) for l, hs in receivers_by_layer.items()
                for i in range(0, len(hs), chunk)]
        deltas = _sender_deltas(model, clean_run.cache, base.cache, senders)
        for layer, heads in progress_bar(jobs, f"path patching ({component})", disable=not progress):
            upstream = [d for l, d in deltas if l < layer]
            if not upstream:
                continue
            hook = _add_hook(heads, sum(upstream), n)
            logits = base.resume(layer, len(heads), [(hook_name(f"{component}_input", layer), hook)],
                                 _last_only(metric))
            for c, h in enumerate(heads):
                values[layer, h] = _scalar(metric, logits[c * n:(c + 1) * n])
    return PatchResult(component, ("head",), values, _scalar(metric, clean_run.logits), _scalar(metric, base.logits),
                       "denoise", {"senders": [head_name(*s) for s in senders], "path": component})


def _add_hook(heads: list[int], delta: Float[torch.Tensor, "batch pos d_model"], n: int) -> Callable:
    """Copy c (rows c*n ... (c+1)*n - 1) gets `delta` added to head `heads[c]`'s input [batch, pos, head, d_model]."""
    def hook(activation, hook):
        activation = activation.clone()
        for c, head in enumerate(heads):
            activation[c * n:(c + 1) * n, :, head] += delta
        return activation
    return hook


# ---------------------------------------------------------------------------------------------------------------
# attribution patching: first-order estimates from one forward and one backward pass

def _activations_and_grads(model, tokens, names: Sequence[str], metric: Metric):
    """Activations at `names` on `tokens` and the metric's gradient with respect to each (one forward, one backward;
    parameters are not touched)."""
    saved: dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(activation, hook):
            saved[name] = activation
            return activation
        return keep

    with torch.enable_grad(), attach(model, [(name, keeper(name)) for name in names], tree="bridge"):
        value = torch.as_tensor(metric(model.bridge(tokens)))
        if value.numel() != 1:
            raise InputError(f"the metric must return a scalar, got shape {tuple(value.shape)}")
        grads = torch.autograd.grad(value, [saved[name] for name in names], allow_unused=True)
    return ({k: v.detach() for k, v in saved.items()},
            {name: (torch.zeros_like(saved[name]) if g is None else g) for name, g in zip(names, grads)},
            float(value.detach()))


def attribution_patch(model, clean, corrupted, component: str = "z", *, over: Sequence[str] | None = None,
                      metric: Metric | None = None, answer=None, wrong=None, direction: str = "denoise") -> PatchResult:
    """Attribution patching (Nanda 2023; Syed et al. 2023): the metric after a patch estimated to first order,
    base + (source - base activation) . d metric / d activation on the base run, summed over the axes not in `over`.
    Same shapes and `normalised` as `activation_patch`; two forwards and one backward in all."""
    clean, corrupted = _check_pair(model, clean, corrupted)
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    metric = _default_metric(metric, answer, wrong)
    axes = _axes(component, over)
    names = [_site(component, l) for l in range(model.n_layers)]
    base_tokens, source_tokens = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    acts, grads, base_value = _activations_and_grads(model, base_tokens, names, metric)
    with torch.no_grad():
        logits, source = run_with_cache(model, source_tokens, names)
    source_value = _scalar(metric, logits)
    tensor_axes = ("batch", *COMPONENTS[component])
    summed = tuple(i for i, a in enumerate(tensor_axes) if a not in axes)
    values = torch.stack([((source[name] - acts[name]) * grads[name]).sum(dim=summed) for name in names]) + base_value
    clean_value, corrupted_value = (source_value, base_value) if direction == "denoise" else (base_value, source_value)
    meta = {"method": "attribution"}
    if getattr(metric, "per_prompt", None):  # a batch mean: prompt b's own estimated change is n x its term
        by_prompt = tuple(i for i in summed if i != 0)
        meta["per_prompt_delta"] = torch.stack([((source[name] - acts[name]) * grads[name]).sum(dim=by_prompt)
                                                for name in names]).movedim(1, -1) * base_tokens.shape[0]
    return PatchResult(component, axes, values, clean_value, corrupted_value, direction, meta)


def edge_attribution(model, clean, corrupted, *, metric: Metric | None = None, answer=None, wrong=None,
                     components: Sequence[str] = ("q", "k", "v")) -> dict[str, torch.Tensor]:
    """Edge attribution patching (EAP, Syed et al. 2023) between heads: for sender u and receiver v's q/k/v input,
    (clean - corrupted write of u) . d metric / d (v's own input) on the corrupted run, summed over batch and
    positions, divided by clean - corrupted metric (comparable to `path_patch(...).normalised - 0`).
    Returns {component: [sender layer, sender head, receiver layer, receiver head]} (k, v: KV receivers; zero where
    the receiver is not after the sender) and "logits": [layer, head], the direct edge to the output."""
    clean, corrupted = _check_pair(model, clean, corrupted)
    metric = _default_metric(metric, answer, wrong)
    if not components or any(c not in ("q", "k", "v") for c in components):
        raise InputError(f"components must be among 'q', 'k', 'v', got {list(components)}")
    L = model.n_layers
    writes = [name for l in range(L) for name in write_names(model, l)]
    inputs = [hook_name(f"{c}_input", l) for c in components for l in range(L)]
    with split_qkv_input(model):
        acts, grads, corrupted_value = _activations_and_grads(model, corrupted, writes + inputs + ["ln_final.hook_in"],
                                                              metric)
        with torch.no_grad():
            logits, clean_cache = run_with_cache(model, clean, writes)
    scale = _scalar(metric, logits) - corrupted_value
    if abs(scale) < 1e-9:
        raise NoSignalError("clean and corrupted give the same metric, so edge effects cannot be normalised")
    with torch.no_grad():
        delta = torch.stack([head_writes(model, clean_cache, l) - head_writes(model, acts, l) for l in range(L)])
        out = {}
        for c in components:
            g = torch.stack([grads[hook_name(f"{c}_input", l)] for l in range(L)])  # [L, b, p, h, m]
            edges = torch.einsum("sbpim,rbpjm->sirj", delta, g) / scale
            later = torch.arange(L)[:, None] < torch.arange(L)[None, :]
            out[c] = edges * later[:, None, :, None]
        out["logits"] = torch.einsum("sbpim,bpm->si", delta, grads["ln_final.hook_in"]) / scale
    return out


# ---------------------------------------------------------------------------------------------------------------
# direct logit attribution

@torch.no_grad()
def direct_logit_attribution(model, tokens, answer, wrong=None, pos: int = -1) -> dict[str, torch.Tensor]:
    """Each component's direct contribution to logit[answer] (- logit[wrong]) at `pos`, with the final norm's
    scale taken from the run (so the parts add up to the logit, or logit difference, exactly).
    Returns "heads": [layer, head], "mlp": [layer], "embed", "bias" (unembedding bias), "total" (their sum) and
    "logit" (the model's), each averaged over the batch."""
    tokens = model.as_tokens(tokens)
    L = model.n_layers
    names = [n for l in range(L) for n in write_names(model, l)] + [hook_name("mlp_out", l) for l in range(L)] + [
        hook_name("attn_out", l) for l in range(L)] + [
        "blocks.0.hook_resid_pre", "ln_final.hook_in", "ln_final.hook_scale", "ln_final.hook_normalized"]
    logits, cache = run_with_cache(model, tokens, names)
    if not _is_rms(cache, "ln_final"):
        raise UnsupportedModelError(f"{model.name}: the final norm is not RMS-type (x / scale); direct logit attribution "
                         "here assumes it")
    answer = torch.as_tensor(answer).reshape(-1).expand(tokens.shape[0])
    W_U = model.bridge.unembed.W_U.detach()
    direction = W_U[:, answer].T  # [batch, d_model]
    b_U = model.bridge.unembed.b_U.detach() if getattr(model.bridge.unembed, "b_U", None) is not None else None
    bias = b_U[answer] if b_U is not None else torch.zeros(len(answer))
    label = logits[torch.arange(len(answer)), pos, answer]
    if wrong is not None:
        wrong = torch.as_tensor(wrong).reshape(-1).expand(tokens.shape[0])
        direction = direction - W_U[:, wrong].T
        bias = bias - (b_U[wrong] if b_U is not None else 0)
        label = label - logits[torch.arange(len(wrong)), pos, wrong]
    gain = norm_gain(model, "ln_final")
    readout = direction * gain / cache["ln_final.hook_scale"][:, pos]  # [batch, d_model]

    def read(x):  # x: [batch, pos, ..., d_model] -> [...], averaged over the batch
        return torch.einsum("b...m,bm->b...", x[:, pos], readout).mean(0)

    heads = torch.stack([read(head_writes(model, cache, l)) for l in range(L)])
    mlp = torch.stack([read(cache[hook_name("mlp_out", l)]) for l in range(L)])
    attn_rest = torch.stack([read(cache[hook_name("attn_out", l)]) for l in range(L)]) - heads.sum(1)
    embed = read(cache["blocks.0.hook_resid_pre"])
    total = heads.sum() + mlp.sum() + attn_rest.sum() + embed + bias.mean()
    return {"heads": heads, "mlp": mlp, "attn_bias": attn_rest, "embed": embed, "bias": bias.mean(),
            "total": total, "logit": label.mean()}


# ---------------------------------------------------------------------------------------------------------------
# the probe

@dataclass(frozen=True)
class Params:
    """task: "ioi" (TransformerLens' IOI dataset: n prompts of one template; corruption "swap" or "names"),
    "mcqa" (items' right option swapped with another), or your own pair {"name", "clean", "corrupted", "answer",
    "wrong"} of equal-length token-id rows. memory_budget: bytes one patched forward may use."""

    task: str | dict = "ioi"
    n: int = 16
    seed: int = 0
    template: int = 0
    corruption: str = "swap"
    names: tuple[str, ...] = IOI_NAMES
    items: str = "mcqa_stated.jsonl"
    memory_budget: int = 2**30
    layers_per_unit: int = 6  # layers patched by one unit (each unit runs the clean and corrupted passes once)


class Patching(Probe):
    name = "patching"
    description = "which heads carry a behaviour: activation and attribution patching of each head's output, DLA"
    paper = "Wang et al. 2022 (IOI, path patching); Nanda 2023, Syed et al. 2023 (attribution patching)"
    Params = Params
    order = 60
    quick = {"n": 4}
    needs_decoder = "compares next-token logits"
    min_context = 32
    columns = {
        "score": "activation patching: the share of the clean - corrupted metric gap restored by patching the head's "
                 "clean output (z, all positions) into the corrupted run",
        "noising": "the share lost when the head's corrupted output is patched into the clean run",
        "attribution": "attribution patching's first-order estimate of the patching score",
        "dla": "direct logit attribution: the head's direct contribution to the logit difference (final norm scale "
               "from the run)",
    }

    signed = ("score", "noising", "attribution", "dla")

    def threshold(self, scores):
        """Patching the head restores a tenth of the clean - corrupted gap."""
        return 0.1

    def validity(self, meta):
        pairs = meta["task_info"].get("n_pairs", meta.get("uncertainty", {}).get("n"))
        clean, corrupted, accuracy = meta["clean_metric"], meta["corrupted_metric"], meta["accuracy"]
        warning = (f"the model fails the task on the clean prompts (clean logit difference {clean:.2f}, accuracy "
                   f"{accuracy:.2f} on {pairs} pairs): the scores say which heads carry the answer it gives, not a "
                   "circuit that solves the task" if clean <= 0 or accuracy < 0.5 else None)
        return {"rests_on": f"{pairs} prompt pairs ({meta['task']})",
                "baseline": f"clean logit difference {clean:.2f}, corrupted {corrupted:.2f}, clean accuracy "
                            f"{accuracy:.2f}", "warning": warning}

    def check_params(self, params):
        if not (isinstance(params.task, dict) or params.task in ("ioi", "mcqa")):
            raise InputError(f"task must be 'ioi', 'mcqa' or a clean/corrupted pair, got {params.task!r}")
        if params.corruption not in ("swap", "names"):
            raise InputError(f"corruption must be 'swap' or 'names', got {params.corruption!r}")
        return params

    def task(self, model, params) -> PatchingTask:
        if isinstance(params.task, dict):
            pair = params.task
            return PatchingTask(str(pair.get("name", "custom")), torch.tensor(pair["clean"]),
                                torch.tensor(pair["corrupted"]), torch.tensor(pair["answer"]),
                                torch.tensor(pair["wrong"]), dict(pair.get("info", {})))
        if params.task == "mcqa":
            return mcqa_task(model, load_mcqa(params.items)[:params.n], seed=params.seed)
        return ioi_task(model, n=params.n, seed=params.seed, template=params.template, corruption=params.corruption,
                        names=params.names)

    def plan(self, model, params):
        step = max(1, params.layers_per_unit)
        return ([Unit(f"layers-{first:04d}", {"layers": list(range(first, min(first + step, model.n_layers)))})
                 for first in range(0, model.n_layers, step)] + [Unit("whole-attribution"), Unit("whole-dla")])

    def run(self, model, params, unit):
        task = self.task(model, params)
        if unit.key == "whole-attribution":
            attribution = attribution_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric)
            return {"effect": attribution.effect, "accuracy": task.accuracy(model),
                    "delta_pairs": attribution.meta["per_prompt_delta"]}
        if unit.key == "whole-dla":
            pairs = [direct_logit_attribution(model, task.clean[i:i + 1], task.answer[i:i + 1], task.wrong[i:i + 1])
                     ["heads"] for i in range(len(task.answer))]  # per prompt, for the interval
            return {"heads": direct_logit_attribution(model, task.clean, task.answer, task.wrong)["heads"],
                    "pairs": torch.stack(pairs)}
        layers = unit.data["layers"]
        common = dict(metric=task.metric, over=("head",), layers=layers, progress=False,
                      memory_budget=params.memory_budget)
        denoise = activation_patch(model, task.clean, task.corrupted, "z", **common)
        noise = activation_patch(model, task.clean, task.corrupted, "z", direction="noise", **common)
        return {"layers": layers, "denoise": denoise.values[layers], "noise": noise.values[layers],
                "clean": denoise.clean, "corrupted": denoise.corrupted,
                "denoise_pairs": denoise.meta["per_prompt"][layers], "noise_pairs": noise.meta["per_prompt"][layers],
                "clean_pairs": denoise.meta["clean_per_prompt"], "corrupted_pairs": denoise.meta["corrupted_per_prompt"]}

    def merge(self, model, params, partials):
        rows: dict[str, dict[int, list]] = {"denoise": {}, "noise": {}, "denoise_pairs": {}, "noise_pairs": {}}
        metrics = None
        for key, partial in iter_partials(partials):
            if key.startswith("layers-"):
                metrics = metrics or (partial["clean"], partial["corrupted"], partial["clean_pairs"],
                                      partial["corrupted_pairs"])
                for name in rows:
                    rows[name].update(zip(partial["layers"], partial[name]))
        clean, corrupted, clean_pairs, corrupted_pairs = metrics

        def effect(direction):
            values = torch.tensor([rows[direction][layer] for layer in range(model.n_layers)], dtype=torch.float32)
            return PatchResult("z", ("head",), values, clean, corrupted, direction).effect

        denoise, noise = effect("denoise"), effect("noise")
        attribution = torch.tensor(partials["whole-attribution"]["effect"], dtype=torch.float32)
        dla = torch.tensor(partials["whole-dla"]["heads"], dtype=torch.float32)
        task = self.task(model, params)
        meta = self.meta(model, params, task=task.name, task_info=task.info, clean_metric=clean,
                         corrupted_metric=corrupted, accuracy=partials["whole-attribution"]["accuracy"],
                         attribution_vs_activation=agreement(attribution, denoise),
                         uncertainty=method("prompt pairs (effects: ratio of sums over the pairs' clean - corrupted "
                                            "gaps)", len(clean_pairs)))
        return HeadScores.from_matrix(denoise.numpy(), meta, noising=noise.numpy(), attribution=attribution.numpy(),
                                      dla=dla.numpy(), **self.pair_intervals(model, partials, rows, clean_pairs,
                                                                        corrupted_pairs))

    def pair_intervals(self, model, partials, rows, clean_pairs, corrupted_pairs) -> dict:
        """Each column's interval over the prompt pairs: an effect is sum(change) / sum(clean - corrupted gap)."""
        def pairs(direction):  # [pairs, layer, head]
            return torch.tensor([rows[direction][layer] for layer in range(model.n_layers)],
                                dtype=torch.float64).permute(2, 0, 1)

        clean_pairs = torch.tensor(clean_pairs, dtype=torch.float64)[:, None, None]
        corrupted_pairs = torch.tensor(corrupted_pairs, dtype=torch.float64)[:, None, None]
        gap = (clean_pairs - corrupted_pairs).flatten()
        samples = {"score": pairs("denoise_pairs") - corrupted_pairs, "noising": clean_pairs - pairs("noise_pairs"),
                   "attribution": torch.tensor(partials["whole-attribution"]["delta_pairs"],
                                               dtype=torch.float64).permute(2, 0, 1),
                   "dla": torch.tensor(partials["whole-dla"]["pairs"], dtype=torch.float64)}
        return intervals(samples, weights={"score": gap, "noising": gap, "attribution": gap})


PROBE = Patching()


def scan(model, task: PatchingTask | None = None, *, progress: bool = True, journal=None, quick: bool = False,
         **params) -> HeadScores:
    """Per head: `score` = denoising effect of patching its output (z) at all positions (fraction of the clean -
    corrupted metric gap it restores), `noising` (fraction lost when the corrupted z is patched into the clean run),
    `attribution` (attribution patching's estimate of `score`) and `dla` (direct logit attribution to the logit
    difference on the clean prompts). Task: IOI by default, or a PatchingTask of yours. See Params."""
    if task is not None:
        params["task"] = {"name": task.name, "clean": task.clean.tolist(), "corrupted": task.corrupted.tolist(),
                          "answer": task.answer.tolist(), "wrong": task.wrong.tolist(), "info": task.info}
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
