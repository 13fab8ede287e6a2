"""The patching methods: activation patching (batched, on the replay engine), path patching, attribution patching
(nodes and edges, EAP), direct logit attribution, and each head's write into the residual stream."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import product

import torch
from jaxtyping import Float

from headlab.errors import InputError, NoSignalError, UnsupportedModelError
from headlab.heads import by_layer
from headlab.hooks import SITES, attach, run_with_cache
from headlab.hooks import name as hook_name
from headlab.probes.patching.replay import BlockReplay, _check_pair, _last_only, _scalar
from headlab.probes.patching.tasks import Metric, logit_diff
from headlab.progress import progress_bar
from headlab.scores import head_name, parse_head


PATCHABLE = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")
_AXIS = {"d_model": "d", "kv_head": "head"}  # patching's axis names: "d" is never iterated; k and v have KV heads
# what can be patched -> axes of its activation after batch (headlab.hooks.SITES, in patching's names)
COMPONENTS: dict[str, tuple[str, ...]] = {site: tuple(_AXIS.get(a, a) for a in SITES[site][1]) for site in PATCHABLE}
DEFAULT_OVER = {"pattern": ("head", "dest")}  # others: every axis but d (by position)


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
    base = BlockReplay(model, base_tokens)
    source = BlockReplay(model, source_tokens, sites)
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
    """The elementwise gain of the bridge's norm at `prefix` (e.g. "ln_final"): what it multiplies x / scale by:
    [d_model]. A norm without a weight (OLMo's) has gain one."""
    return norm_affine(model, prefix)[0]


def norm_affine(model, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain, bias) of the bridge's norm at `prefix`, each [d_model]: norm(x) = gain * normalised(x) + bias. Read by
    running the norm with its hook_scale forced to 1 on x = +-1 alternating (mean 0, so a LayerNorm's centring leaves
    it as it is) and on -x: half their difference is the gain times x, half their sum the bias."""
    norm = model.bridge.get_submodule(prefix)
    x = torch.ones(model.config.hidden_size)
    if getattr(norm.original_component, "weight", None) is None and getattr(norm.original_component, "bias",
                                                                            None) is None:
        return x, torch.zeros_like(x)
    x[1::2] = -1
    force = [(f"{prefix}.hook_scale", lambda scale, point: torch.ones_like(scale))]
    with attach(model, force, tree="bridge"), torch.no_grad(), warnings.catch_warnings():
        # forcing the scale is the point: TransformerLens warns that a hook edited the norm
        warnings.filterwarnings("ignore", message="A forward hook edited hook_scale", category=UserWarning)
        plus, minus = (norm(sign * x[None, None]).flatten() for sign in (1, -1))
    return (plus - minus) / 2 * x.to(plus.device), (plus + minus) / 2


def norm_kind(cache, prefix: str) -> str | None:
    """How the norm at `prefix` normalised x in this run, read from its hooks: "rms" (x / scale), "layernorm"
    ((x - mean x) / scale), or None (neither)."""
    x, scale, normed = (cache[f"{prefix}.{h}"] for h in ("hook_in", "hook_scale", "hook_normalized"))
    if torch.allclose(x / scale, normed, rtol=1e-4, atol=1e-5):
        return "rms"
    if torch.allclose((x - x.mean(-1, keepdim=True)) / scale, normed, rtol=1e-4, atol=1e-5):
        return "layernorm"
    return None


def write_names(model, layer: int) -> list[str]:
    """The cache entries `head_writes` reads for `layer`."""
    names = [hook_name("z", layer)]
    prefix = model.architecture.bridge_post_attention_norm_name(layer)
    if prefix is not None:
        names += [f"{prefix}.{h}" for h in ("hook_in", "hook_scale", "hook_normalized")]
    return names


def head_writes(model, cache, layer: int) -> Float[torch.Tensor, "batch pos head d_model"]:
    """Each head's share of the attention block's residual write: z_h @ W_O[h], then (Gemma3's post-attention
    norm) times the norm's gain over the scale it had in this run. Summed over heads it is hook_attn_out
    (without an output bias, which no head owns)."""
    block = model.bridge.blocks[layer]
    z = cache[hook_name("z", layer)]
    writes = torch.einsum("bphd,hdm->bphm", z, block.attn.W_O.detach())
    prefix = model.architecture.bridge_post_attention_norm_name(layer)
    if prefix is not None:
        if norm_kind(cache, prefix) != "rms":
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
    clean_run = BlockReplay(model, clean, names)
    n = clean.shape[0]
    values = torch.full((model.n_layers, n_heads), float("nan"))
    with split_qkv_input(model):
        base = BlockReplay(model, corrupted, names)
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
    scale taken from the run (so the parts add up to the logit, or logit difference, exactly); under a LayerNorm each
    part is centred first, as the norm centres their sum; a constant multiplier on the logits (Granite, Cohere) is
    applied to every part; under a final softcap (Gemma 2) the parts add up to the logit before the cap, which is
    what "logit" is then.
    Returns "heads": [layer, head], "mlp": [layer], "attn_bias" (what the attention blocks write beside their heads):
    [layer], "embed", "bias" (the unembedding's and the final norm's biases, read out), "total" (their sum) and
    "logit" (the model's), each averaged over the batch."""
    tokens = model.as_tokens(tokens)
    L = model.n_layers
    names = [n for l in range(L) for n in write_names(model, l)] + [hook_name("mlp_out", l) for l in range(L)] + [
        hook_name("attn_out", l) for l in range(L)] + [
        "blocks.0.hook_resid_pre", "ln_final.hook_in", "ln_final.hook_scale", "ln_final.hook_normalized"]
    logits, cache = run_with_cache(model, tokens, names)
    cap = model.architecture.final_softcap
    if cap:
        logits = cap * torch.atanh(logits / cap)
    centre = {"rms": False, "layernorm": True}.get(norm_kind(cache, "ln_final"))
    if centre is None:
        raise UnsupportedModelError(f"{model.name}: the final norm is neither an RMS norm nor a LayerNorm; direct logit "
                                    "attribution needs one of them")
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
    multiplier = model.architecture.logit_multiplier
    direction, bias = direction * multiplier, bias * multiplier
    gain, norm_bias = norm_affine(model, "ln_final")
    readout = direction * gain / cache["ln_final.hook_scale"][:, pos]  # [batch, d_model]
    bias = bias + direction @ norm_bias

    def read(x):  # x: [batch, pos, ..., d_model] -> [...], averaged over the batch
        x = x[:, pos]
        return torch.einsum("b...m,bm->b...", x - x.mean(-1, keepdim=True) if centre else x, readout).mean(0)

    heads = torch.stack([read(head_writes(model, cache, l)) for l in range(L)])
    mlp = torch.stack([read(cache[hook_name("mlp_out", l)]) for l in range(L)])
    attn_rest = torch.stack([read(cache[hook_name("attn_out", l)]) for l in range(L)]) - heads.sum(1)
    embed = read(cache["blocks.0.hook_resid_pre"])
    total = heads.sum() + mlp.sum() + attn_rest.sum() + embed + bias.mean()
    return {"heads": heads, "mlp": mlp, "attn_bias": attn_rest, "embed": embed, "bias": bias.mean(),
            "total": total, "logit": label.mean()}
