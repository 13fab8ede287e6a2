"""Vision-aware head divergence (VHD) and vision-aware head reinforcement (VHR).

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (ACL 2025). For a
head, VHD at a generation step is the Euclidean distance between its output z (before W_O) with and without the
image tokens in the context. T-VHD of a generated token sums, over layers, each layer's k largest VHD; the paper
finds it lower on hallucinated tokens. VHR scales the vision-aware heads by alpha, chosen layer by layer at the
first generated token.

"Image tokens" generalise to any context span: the same probe measures how much each head of a text model
depends on a document in its prompt. The run without the span drops those positions (and the image), as the
paper's text-only input does; later tokens move up, their positions renumbered.

    prompt = SpanPrompt(ids, span=image_span(model, ids), pixel_values=pixels)
    result = generation_vhd(model, prompt)          # result.vhd [token, layer, head]
    scores = scan(model, [prompt, ...])             # HeadScores: mean VHD per head
    with reinforce(model, "auto", prompt=prompt) as heads:
        model.hf.generate(...)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from headlab.errors import InputError, UnsupportedModelError
from headlab.hooks import attach, hf_activations
from headlab.hooks import name as hook_name
from headlab.interventions import scale_heads
from headlab.niah import build_prompt, niah_task, stop_token_ids
from headlab.probe import Probe, Unit, iter_partials
from headlab.scores import HeadScores
from headlab.uncertainty import intervals, method

PAPER_ALPHA = 2.0


@dataclass
class SpanPrompt:
    """A prompt and the context span whose influence VHD measures: ids[span[0]:span[1]] (the image tokens of a
    vision-language model, or a document). pixel_values go with the image tokens."""

    ids: Int[torch.Tensor, "pos"]
    span: tuple[int, int]
    pixel_values: Float[torch.Tensor, "1 channel height width"] | None = None


@dataclass
class GenerationVHD:
    """VHD of each generated token: the query that produced it compared with and without the span.

    vhd, text_norm: [token, layer, head]; text_norm is |z| of the run without the span."""

    prompt: SpanPrompt
    new_tokens: list[int]
    vhd: Float[torch.Tensor, "token layer head"]
    text_norm: Float[torch.Tensor, "token layer head"]

    def continued(self) -> SpanPrompt:
        """The prompt with the generated tokens appended (same span and pixel values)."""
        return with_tokens(self.prompt, self.new_tokens)

    def queries(self) -> range:
        """Positions of the queries that produced the generated tokens, in `continued().ids`."""
        n = len(self.prompt.ids)
        return range(n - 1, n - 1 + len(self.new_tokens))


def with_tokens(prompt: SpanPrompt, tokens: Sequence[int]) -> SpanPrompt:
    """The prompt with `tokens` appended after it."""
    extra = torch.tensor(list(tokens), dtype=torch.long, device=prompt.ids.device)
    return SpanPrompt(torch.cat([prompt.ids, extra]), prompt.span, prompt.pixel_values)


# ---- spans ------------------------------------------------------------------------------------------------

def image_span(model, ids: Int[torch.Tensor, "pos"]) -> tuple[int, int]:
    """(start, end) of the image placeholder tokens of a vision-language prompt; they must be contiguous."""
    if not model.is_multimodal:
        raise InputError(f"{model.name} has no image input; give the context span explicitly")
    where = torch.nonzero(torch.as_tensor(ids).flatten() == model.image_token_id).flatten()
    if not len(where):
        raise InputError("the prompt holds no image token; put the image placeholder tokens in it")
    start, end = int(where[0]), int(where[-1]) + 1
    if end - start != len(where):
        raise InputError("the image tokens of the prompt are not contiguous; give one image per prompt")
    return start, end


def check_prompt(model, prompt: SpanPrompt) -> SpanPrompt:
    """The prompt with ids as a 1-D tensor on the model's device; raises InputError for a span outside the
    prompt, an empty span, pixel values for a text-only model, or a span that cuts through the image tokens."""
    ids = torch.as_tensor(prompt.ids).flatten().to(model.device)
    start, end = prompt.span
    if not (0 <= start < end <= len(ids)):
        raise InputError(f"context span {prompt.span} is outside the {len(ids)}-token input or empty; "
                         "give (start, end) with 0 <= start < end <= length")
    model.check_pixel_values(prompt.pixel_values)
    if prompt.pixel_values is not None:
        image = image_span(model, ids)
        inside = start <= image[0] and image[1] <= end
        if not inside and (start < image[1] and image[0] < end):
            raise InputError(f"context span {prompt.span} cuts through the image tokens {image}; "
                             "cover all of them or none")
    return SpanPrompt(ids, (start, end), prompt.pixel_values)


def without_span(model, prompt: SpanPrompt) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids [pos - span length], pixel values) of the run without the span: the image goes when its tokens do."""
    start, end = prompt.span
    ids = torch.cat([prompt.ids[:start], prompt.ids[end:]])
    if prompt.pixel_values is None or start <= image_span(model, prompt.ids)[0] < end:
        return ids, None
    return ids, prompt.pixel_values


def shifted(prompt: SpanPrompt, queries: Sequence[int]) -> list[int]:
    """Query positions in the run without the span; queries must lie outside the span."""
    start, end = prompt.span
    inside = [q for q in queries if start <= q < end]
    if inside:
        raise InputError(f"query positions {inside[:5]} lie inside the context span {prompt.span}; VHD compares "
                         "queries that exist in both runs")
    return [q - (end - start) if q >= end else q for q in queries]


# ---- head outputs ---------------------------------------------------------------------------------------

@torch.no_grad()
def head_outputs(model, ids: Int[torch.Tensor, "pos"], queries: Sequence[int], pixel_values=None
                 ) -> Float[torch.Tensor, "query layer head d_head"]:
    """Every head's output z (the input of W_O) at the query positions, from one `.hf` forward."""
    rows = torch.as_tensor(list(queries), dtype=torch.long, device=model.device)
    points = [hook_name("z", layer) for layer in range(model.n_layers)]
    z = hf_activations(model, ids[None], points, **model.check_pixel_values(pixel_values))
    return torch.stack([z[point][0, rows] for point in points], dim=1)


def vhd(model, prompt: SpanPrompt, queries: Sequence[int] | None = None
        ) -> tuple[Float[torch.Tensor, "query layer head"], Float[torch.Tensor, "query layer head"]]:
    """(VHD, |z| without the span) of every head at the query positions (default: every position after the span).

    VHD = || z(with the span) - z(without it) ||_2 for the same query token; two forwards in all."""
    prompt = check_prompt(model, prompt)
    queries = list(range(prompt.span[1], len(prompt.ids))) if queries is None else [int(q) for q in queries]
    if not queries:
        raise InputError("no query position after the context span; add the tokens whose heads VHD compares")
    if not all(0 <= q < len(prompt.ids) for q in queries):
        raise InputError(f"query positions must lie inside the {len(prompt.ids)}-token input")
    with_span = head_outputs(model, prompt.ids, queries, prompt.pixel_values)
    ids, pixels = without_span(model, prompt)
    text_only = head_outputs(model, ids, shifted(prompt, queries), pixels)
    return (with_span - text_only).norm(dim=-1), text_only.norm(dim=-1)


@torch.no_grad()
def generate(model, prompt: SpanPrompt, *, max_new_tokens: int = 16, stop: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of the prompt (with its pixel values), ending after a token in `stop` or EOS."""
    if not model.is_causal:
        raise UnsupportedModelError(f"{model.name} is bidirectional and does not generate; call vhd() with explicit queries")
    prompt = check_prompt(model, prompt)
    stop_ids = [t for t in [model.tokenizer.eos_token_id, *stop] if t is not None]
    out = model.hf.generate(input_ids=prompt.ids[None], max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop_ids, pad_token_id=model.tokenizer.pad_token_id or stop_ids[0],
                            **model.check_pixel_values(prompt.pixel_values))
    return out[0, len(prompt.ids):].tolist()


def generation_vhd(model, prompt: SpanPrompt, new_tokens: Sequence[int] | None = None, *, max_new_tokens: int = 16,
                   stop: Sequence[int] = ()) -> GenerationVHD:
    """VHD at every generation step: greedy tokens (or the `new_tokens` given) appended to the prompt, each
    scored at the query that produced it. Causal attention makes one forward per run equal to step-by-step."""
    prompt = check_prompt(model, prompt)
    if new_tokens is None:
        new_tokens = generate(model, prompt, max_new_tokens=max_new_tokens, stop=stop)
    new_tokens = [int(t) for t in new_tokens]
    if not new_tokens:
        raise InputError("no generated token to score; the model stopped at once or new_tokens is empty")
    result = GenerationVHD(prompt, new_tokens, torch.empty(0), torch.empty(0))
    result.vhd, result.text_norm = vhd(model, result.continued(), queries=result.queries())
    return result


def t_vhd(divergence: Float[torch.Tensor, "token layer head"], k: int = 1) -> Float[torch.Tensor, "token"]:
    """T-VHD of each token: the sum over layers of the layer's k largest head VHDs."""
    if not 1 <= k <= divergence.shape[-1]:
        raise InputError(f"k must be between 1 and the {divergence.shape[-1]} heads of a layer, not {k}")
    return divergence.topk(k, dim=-1).values.sum(dim=(-1, -2))


@torch.no_grad()
def span_attention(model, prompt: SpanPrompt, queries: Sequence[int]) -> Float[torch.Tensor, "query layer head"]:
    """Attention mass each head puts on the span from the query positions (hook path, `hook_pattern`)."""
    prompt = check_prompt(model, prompt)
    rows = torch.as_tensor(list(queries), dtype=torch.long, device=model.device)
    start, end = prompt.span
    mass: dict[int, torch.Tensor] = {}

    def keep(pattern, point):
        mass[point.layer] = pattern[0, :, rows, start:end].sum(dim=-1).T  # [query, head]

    points = [(hook_name("pattern", layer), keep) for layer in range(model.n_layers)]
    with attach(model, points, tree="bridge"):
        model.bridge(prompt.ids[None], **model.check_pixel_values(prompt.pixel_values))
    return torch.stack([mass[layer] for layer in range(model.n_layers)], dim=1).cpu()


# ---- scan -------------------------------------------------------------------------------------------------

def generation_sums(model, prompt: SpanPrompt, *, max_new_tokens: int = 16, stop: Sequence[int] = (),
                    attention: bool = True) -> dict:
    """One prompt's contribution to a scan: VHD, text-only |z| and span attention summed over its generated tokens
    [layer, head] (fp64), and the number of tokens."""
    result = generation_vhd(model, prompt, max_new_tokens=max_new_tokens, stop=stop)
    sums = {"vhd": result.vhd.double().sum(dim=0).cpu(), "text_norm": result.text_norm.double().sum(dim=0).cpu(),
            "tokens": len(result.new_tokens)}
    if attention:
        sums["span_attention"] = span_attention(model, result.continued(), result.queries()).double().sum(dim=0)
    return sums


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """prompts: "auto" — on a vision-language model of the shapes world, `n` seeded scenes with the image as the
    span; on a text model, NIAH prompts (`needles` needles at `depths`, `document_length` tokens) with the document as
    the span — or your own prompts, each {"ids": [...], "span": [start, end], "pixel_values": [...] or null}.
    stop: token ids that end a generation (None: the testbed's "." or the model's end-of-turn tokens)."""

    prompts: str | tuple[dict, ...] = "auto"
    n: int = 16
    needles: int = 4
    depths: tuple[float, ...] = (0.25, 0.75)
    document_length: int = 1024
    seed: int = 0
    max_new_tokens: int = 16
    stop: tuple[int, ...] | None = None
    attention: bool = True


class Vision(Probe):
    name = "vision"
    description = "how much each head's output depends on an image, or on any context span (VHD)"
    paper = "He et al. 2025, Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence"
    Params = Params
    order = 70
    quick = {"n": 4, "needles": 2}
    needs_decoder = "generates text"
    min_context = 256
    columns = {
        "score": "vision-aware head divergence (He et al.): mean distance between the head's output with and without "
                 "the context span (the image, or the NIAH document for a text model) over the generated tokens",
        "text_norm": "mean norm of the head's output without the context span",
        "span_attention": "mean attention mass on the context span from the generating queries",
        "tokens": "generated tokens scored",
    }

    def validity(self, meta):
        return {"rests_on": f"{meta['n_prompts']} prompts, {meta['generated_tokens']} generated tokens",
                "baseline": "0: the head's output does not change without the span", "warning": None}

    def threshold(self, scores):
        """VHD is a distance in each model's own units: heads above the model's mean + one standard deviation (the
        outlier line VHR draws)."""
        return float(scores.frame["score"].mean() + scores.frame["score"].std())

    def check_params(self, params):
        if params.prompts == () or (params.prompts != "auto" and isinstance(params.prompts, str)):
            raise InputError("vision prompts must be 'auto' or a non-empty list of {ids, span, pixel_values}")
        return params

    def fit_context(self, params, model, max_context):
        length = min(max_context, model.n_ctx, params.document_length)
        if params.prompts == "auto" and not model.is_multimodal and length < self.min_context:
            raise InputError(f"the vision probe's document prompts need at least {self.min_context} tokens; "
                             f"--max-context is {max_context}")
        return replace(params, document_length=length)

    def prompts(self, model, params) -> tuple[list[SpanPrompt], list[int]]:
        """(prompts, stop ids)."""
        if params.prompts != "auto":
            prompts = [SpanPrompt(torch.tensor(p["ids"]), tuple(p["span"]),
                                  None if p.get("pixel_values") is None else torch.tensor(p["pixel_values"]))
                       for p in params.prompts]
            return prompts, list(params.stop or ())
        if model.is_multimodal:
            return shapes_prompts(model, params.n, seed=params.seed), list(params.stop or shapes_stop(model))
        task = niah_task(needles=params.needles, lengths=(params.document_length,), depths=params.depths,
                         seed=params.seed)
        prompts = [SpanPrompt(built.ids, built.document) for built in
                   (build_prompt(model, task, test) for test in task.tests())]
        return prompts, list(params.stop or sorted(stop_token_ids(model)))

    def plan(self, model, params):
        n = len(params.prompts) if params.prompts != "auto" else (
            params.n if model.is_multimodal else params.needles * len(params.depths))
        return [Unit(f"{i:06d}", {"index": i}) for i in range(n)]

    def run(self, model, params, unit):
        prompts, stop = self.prompts(model, params)
        return generation_sums(model, prompts[unit.data["index"]], max_new_tokens=params.max_new_tokens, stop=stop,
                               attention=params.attention)

    def merge(self, model, params, partials):
        total = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
        norm, mass = torch.zeros_like(total), torch.zeros_like(total)
        count = 0
        samples: dict[str, list] = {"score": [], "text_norm": [], "span_attention": [], "tokens": []}  # per prompt
        for _, partial in iter_partials(partials):
            total += torch.tensor(partial["vhd"], dtype=torch.float64)
            norm += torch.tensor(partial["text_norm"], dtype=torch.float64)
            if params.attention:
                mass += torch.tensor(partial["span_attention"], dtype=torch.float64)
            count += partial["tokens"]
            for column, key in (("score", "vhd"), ("text_norm", "text_norm"), ("span_attention", "span_attention")):
                if key in partial:
                    samples[column].append(torch.tensor(partial[key], dtype=torch.float64))
            samples["tokens"].append(partial["tokens"])
        columns = {"text_norm": norm / count, "tokens": torch.full_like(total, count)}
        if params.attention:
            columns["span_attention"] = mass / count
        tokens = samples.pop("tokens")  # the means are over generated tokens: sums over prompts / their tokens
        columns.update(intervals({c: torch.stack(v) for c, v in samples.items() if v}, weights=torch.tensor(tokens)))
        meta = self.meta(model, params, n_prompts=len(partials), generated_tokens=count,
                         uncertainty=method("prompts (ratio of sums over their generated tokens)", len(partials)))
        return HeadScores.from_matrix(total / count, meta=meta, **columns)


PROBE = Vision()


def scan(model, prompts: Sequence[SpanPrompt] | str = "auto", *, progress: bool = True, journal=None,
         quick: bool = False, **params) -> HeadScores:
    """Mean VHD of every head over the generated tokens of all prompts -> HeadScores.

    Columns: score (mean VHD), text_norm (mean |z| without the span), span_attention (mean attention mass on
    the span from the same queries; attention=False skips it), tokens (generated tokens scored). See Params."""
    if not isinstance(prompts, str):
        if not prompts:
            raise InputError("scan needs at least one prompt")
        params["prompts"] = [{"ids": torch.as_tensor(p.ids).flatten().tolist(), "span": list(p.span),
                              "pixel_values": None if p.pixel_values is None else torch.as_tensor(p.pixel_values)
                              .float().tolist()} for p in prompts]
    if "stop" in params and params["stop"] is not None:
        params["stop"] = [int(t) for t in params["stop"]]
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)


# ---- reinforcement (VHR) --------------------------------------------------------------------------------------

def default_vhr_layers(n_layers: int) -> list[int]:
    """The paper's layers for LLaVA-1.5 (32 layers: the second and the last 14), scaled to n_layers."""
    last = max(1, math.ceil(n_layers * 14 / 32))
    return sorted({min(1, n_layers - 1), *range(n_layers - last, n_layers)})


def vhr_heads(divergence: Float[torch.Tensor, "head"], text_norm: Float[torch.Tensor, "head"]) -> list[int]:
    """One layer's heads to reinforce: heads above mean + std on both VHD and the text-only norm are outliers
    (their VHD set to 0), then the heads whose VHD is above the layer's median."""
    divergence = divergence.clone().double()
    text_norm = text_norm.double()
    outlier = (divergence > divergence.mean() + divergence.std()) & (text_norm > text_norm.mean() + text_norm.std())
    divergence[outlier] = 0.0
    return torch.nonzero(divergence > divergence.median()).flatten().tolist()


def select_vhr_heads(model, prompt: SpanPrompt, *, alpha: float = PAPER_ALPHA, layers: Sequence[int] | None = None
                     ) -> list[tuple[int, int]]:
    """VHR's heads for a prompt, layer by layer at the first generated token: the VHD of layer l is measured
    with the heads already chosen in earlier layers scaled by alpha (two forwards per layer)."""
    prompt = check_prompt(model, prompt)
    layers = default_vhr_layers(model.n_layers) if layers is None else sorted(set(model.check_layers(layers)))
    chosen: list[tuple[int, int]] = []
    first_query = [len(prompt.ids) - 1]
    for layer in layers:
        with scale_heads(model, {head: alpha for head in chosen}):
            divergence, text_norm = vhd(model, prompt, queries=first_query)
        chosen += [(layer, head) for head in vhr_heads(divergence[0, layer], text_norm[0, layer])]
    return chosen


@contextmanager
def reinforce(model, heads="auto", alpha: float = PAPER_ALPHA, layers: Sequence[int] | None = None, *,
              prompt: SpanPrompt | None = None) -> Iterator[list[tuple[int, int]]]:
    """VHR inside the block: multiply the chosen heads' outputs z by alpha; yields the heads.

    heads: a list of heads ('L3H1' or (3, 1)), or "auto" to choose them from `prompt` (select_vhr_heads).
    The heads stay fixed for the whole generation, as in the paper; leaving the block restores the model."""
    if not alpha > 0:
        raise InputError(f"alpha must be positive (the paper uses {PAPER_ALPHA}), not {alpha}")
    if isinstance(heads, str):
        if heads != "auto":
            raise InputError(f"heads must be a list of heads or 'auto', not {heads!r}")
        if prompt is None:
            raise InputError("reinforce(heads='auto') chooses heads from a prompt; pass prompt=SpanPrompt(...)")
        chosen = select_vhr_heads(model, prompt, alpha=alpha, layers=layers)
    else:
        chosen = model.check_heads(heads)
    with scale_heads(model, {head: alpha for head in chosen}):
        yield chosen


# ---- the shapes world (headlab.probes.testbeds.shapes) -------------------------------------------------------------------------

def shapes_prompt(model, image) -> SpanPrompt:
    """The captioning prompt of one shapes-world image [3, 32, 32] in [0, 1]; the span is the image tokens."""
    from headlab.probes.testbeds import shapes

    if not model.is_multimodal or model.tokenizer.convert_tokens_to_ids("circle") == model.tokenizer.unk_token_id:
        raise UnsupportedModelError(f"{model.name} is not a shapes-world model; pass your own prompts and images to scan")
    ids = model.to_tokens(shapes.prompt_text())[0]
    return SpanPrompt(ids, image_span(model, ids), shapes.pixel_values(np.asarray(image)[None]))


def shapes_prompts(model, n: int, *, seed: int = 0, counter_bias: bool = False) -> list[SpanPrompt]:
    """Prompts of n random shapes-world scenes (or scenes that break the co-occurrence bias), seeded."""
    from headlab.probes.testbeds import shapes

    rng = np.random.default_rng(seed)
    draw = shapes.counter_bias_scene if counter_bias else shapes.sample_scene
    return [shapes_prompt(model, shapes.render(draw(rng), rng)) for _ in range(n)]


def shapes_stop(model) -> list[int]:
    """The shapes-world captions end with ``.``."""
    return [model.tokenizer.convert_tokens_to_ids(".")]
