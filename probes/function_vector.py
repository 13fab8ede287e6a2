"""Function-vector heads (Todd et al., ICLR 2024): heads whose mean output on in-context-learning prompts carries the
task.

An ICL prompt shows `n_shots` input/output pairs of a task (antonyms, country -> capital, ...) and a query:
"Q: hot\\nA: cold\\n\\nQ: big\\nA: small\\n\\nQ: fast\\nA:". Its corrupted twin shuffles the demonstrations' outputs
among them, so the prompt no longer says what the task is. A head's causal indirect effect (CIE) is how much the
probability of the right answer's first token rises on a corrupted prompt when the head's output at the last position
is replaced by its mean over clean prompts of the task:

    CIE(head) = mean over corrupted prompts of  P(answer | head's z at the last position := mean clean z) - P(answer)

Only the last position changes, so every patched copy resumes from the corrupted prompt's KV cache and computes one
token; all heads of the model run as one batch of copies. The pairs come from `datasets/icl_tasks.json`, whose
"select" half picks heads here and whose "heldout" half is kept for evaluating them (see `icl_prompt`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float

from headlab.data import dataset_path
from headlab.errors import InputError
from headlab.hooks import attach
from headlab.hooks import name as hook_name
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.scores import HeadScores
from headlab.settings import constrained
from headlab.uncertainty import intervals, method

ICL_TASKS = ("antonym", "country_capital", "capitalise", "next_item", "present_past")
SPLITS = ("select", "heldout")


def icl_pairs(task: str, split: str = "select", data: str = "icl_tasks.json") -> list[tuple[str, str]]:
    """The (input, output) pairs of one task's `split` ("select" picks heads, "heldout" evaluates them)."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = Path(data) if Path(data).is_file() else dataset_path(data)
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"{data} is not an ICL task file with a 'tasks' object ({error})") from None
    if task not in tasks:
        raise InputError(f"unknown ICL task {task!r}; {data} holds {', '.join(tasks)}")
    return [tuple(pair) for pair in tasks[task][split]]


@dataclass(frozen=True)
class ICLPrompt:
    """One prompt: `text` ends with "A:"; `answer` is the query's output (the model should say " " + answer);
    `corrupted` is the same prompt with the demonstrations' outputs shuffled among them."""

    text: str
    corrupted: str
    answer: str


def icl_prompt(pairs: list[tuple[str, str]], n_shots: int, rng: random.Random) -> ICLPrompt:
    """`n_shots` demonstrations and a query drawn without replacement from `pairs`; the corrupted prompt gives the
    demonstrations a derangement of their outputs (no demonstration keeps its own)."""
    if len(pairs) < n_shots + 1:
        raise InputError(f"an ICL prompt of {n_shots} shots needs {n_shots + 1} pairs, the task has {len(pairs)}")
    chosen = rng.sample(pairs, n_shots + 1)
    demos, (query, answer) = chosen[:-1], chosen[-1]
    outputs = [y for _, y in demos]
    shuffled = outputs[:]
    while n_shots > 1 and any(a == b for a, b in zip(shuffled, outputs)):
        rng.shuffle(shuffled)

    def render(labels):
        return "".join(f"Q: {x}\nA: {y}\n\n" for (x, _), y in zip(demos, labels)) + f"Q: {query}\nA:"

    return ICLPrompt(render(outputs), render(shuffled), answer)


def icl_prompts(task: str, n: int, n_shots: int, seed: int, split: str = "select", data: str = "icl_tasks.json",
                stream: str = "") -> list[ICLPrompt]:
    """`n` seeded prompts of one task; `stream` names an independent draw (the mean and the corrupted prompts
    use different ones)."""
    rng = random.Random(f"{seed}:{task}:{split}:{stream}")
    pairs = icl_pairs(task, split, data)
    return [icl_prompt(pairs, n_shots, rng) for _ in range(n)]


def answer_token(model, answer: str) -> int:
    """The first token of " " + answer: what the model must predict after "A:"."""
    return model.token_ids(" " + answer)[0]


@torch.no_grad()
def last_z(model, texts: list[str], answers: list[int]
           ) -> tuple[Float[torch.Tensor, "prompt layer head d_head"], Float[torch.Tensor, "prompt"]]:
    """Every head's z at each prompt's last position and P(answer) there (one `.hf` forward per prompt)."""
    rows, probs = [], []
    for text, answer in zip(texts, answers):
        kept: dict[int, torch.Tensor] = {}

        def keep(z, point):
            kept[point.layer] = z[0, -1].float()

        points = [(hook_name("z", layer), keep) for layer in range(model.n_layers)]
        with attach(model, points, tree="hf"):
            logits = model.hf(input_ids=model.to_tokens(text)).logits[0, -1].float()
        rows.append(torch.stack([kept[layer] for layer in range(model.n_layers)]))
        probs.append(torch.softmax(logits, -1)[answer])
    return torch.stack(rows), torch.stack(probs)


@torch.no_grad()
def patched_answer_probs(model, text: str, answer: int, means: Float[torch.Tensor, "layer head d_head"],
                         heads: list[tuple[int, int]]) -> tuple[float, Float[torch.Tensor, "copy"]]:
    """P(answer) at the last position of `text`, and the same with one head's z at the last position replaced by
    its mean, for each of `heads` (copy c patches heads[c]). The prompt but its last token runs once; the copies
    extend its KV cache by the last token."""
    tokens = model.to_tokens(text)
    prefix = model.hf(input_ids=tokens[:, :-1], use_cache=True)
    cache = prefix.cache
    base = torch.softmax(model.hf(input_ids=tokens[:, -1:], cache=_copy_cache(cache, 1)).logits[0, -1]
                         .float(), -1)[answer]
    rows_of = {}
    for row, (layer, head) in enumerate(heads):
        rows_of.setdefault(layer, []).append((row, head))

    def patch(z, point):
        z = z.clone()
        for row, head in rows_of[point.layer]:
            z[row, -1, head] = means[point.layer, head].to(z.dtype)
        return z

    points = [(hook_name("z", layer), patch) for layer in rows_of]
    with attach(model, points, tree="hf"):
        logits = model.hf(input_ids=tokens[:, -1:].expand(len(heads), 1),
                          cache=_copy_cache(cache, len(heads))).logits[:, -1].float()
    return float(base), torch.softmax(logits, -1)[:, answer]


def _copy_cache(cache, copies: int):
    """A deep copy of a one-row KV cache with its row repeated `copies` times (the original stays as it was)."""
    import copy

    repeated = copy.deepcopy(cache)
    if copies > 1:
        repeated.batch_repeat_interleave(copies)
    return repeated


# ---- the probe ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """tasks: ICL tasks of `data` (a headlab file or your own JSON of {"tasks": {name: {"select": [[x, y], ...]}}});
    n_shots: demonstrations per prompt; n_mean: clean prompts whose last-position z is averaged per task;
    n_corrupted: corrupted prompts the CIE is measured on per task. Only the "select" pairs are used."""

    tasks: tuple[str, ...] = ICL_TASKS
    n_shots: int = constrained(5, at_least=1)
    n_mean: int = constrained(16, at_least=1)
    n_corrupted: int = constrained(8, at_least=1)
    seed: int = 0
    data: str = "icl_tasks.json"


class FunctionVector(Probe):
    name = "function_vector"
    description = "function-vector heads: causal indirect effect of each head's mean ICL output on shuffled-label prompts"
    paper = "Todd et al. 2024, Function Vectors in Large Language Models (ICLR)"
    Params = Params
    order = 70
    quick = {"tasks": ("antonym", "country_capital", "capitalise"), "n_mean": 4, "n_corrupted": 2}
    needs_decoder = "compares next-token probabilities"
    min_context = 64
    columns = {
        "score": "causal indirect effect: the rise of P(right answer) on shuffled-label ICL prompts when the head's "
                 "last-position output is set to its mean over clean prompts of the task, averaged over tasks",
        "cie_max": "the head's largest causal indirect effect on any one task",
    }
    signed = ("score", "cie_max")
    roles = {"function-vector": Role()}

    def threshold(self, scores):
        """One head's mean output alone restores one percentage point of the right answer's probability."""
        return 0.01

    def validity(self, meta):
        tasks = meta["tasks"]
        clean = sum(t["clean_prob"] for t in tasks.values()) / len(tasks)
        corrupted = sum(t["corrupted_prob"] for t in tasks.values()) / len(tasks)
        weak = clean - corrupted < 0.05
        return {"rests_on": f"{len(tasks)} ICL tasks x {meta['params']['n_corrupted']} shuffled-label prompts "
                            f"({meta['params']['n_shots']} shots; mean outputs over {meta['params']['n_mean']} clean "
                            f"prompts per task)",
                "baseline": f"P(right answer) on the shuffled-label prompts unpatched: {corrupted:.3f} (clean "
                            f"prompts: {clean:.3f})",
                "warning": (f"the model barely does the tasks in context (P(right answer) {clean:.3f} on clean "
                            f"prompts, {corrupted:.3f} with shuffled labels): no head has much to restore")
                if weak else None}

    def check_params(self, params):
        if not params.tasks:
            raise InputError("function_vector needs at least one task")
        for task in params.tasks:
            icl_pairs(task, "select", params.data)
        return params

    def plan(self, model, params):
        return [Unit(f"{i:03d}-{task}", {"task": task}) for i, task in enumerate(params.tasks)]

    def run(self, model, params, unit):
        task = unit.data["task"]
        common = dict(n_shots=params.n_shots, seed=params.seed, data=params.data)
        clean = icl_prompts(task, params.n_mean, stream="mean", **common)
        z, clean_probs = last_z(model, [p.text for p in clean], [answer_token(model, p.answer) for p in clean])
        means = z.mean(0)
        heads = model.all_heads()
        effects = torch.zeros(len(heads), dtype=torch.float64)
        base_probs, per_prompt = [], []
        for prompt in icl_prompts(task, params.n_corrupted, stream="corrupted", **common):
            base, patched = patched_answer_probs(model, prompt.corrupted, answer_token(model, prompt.answer), means,
                                                 heads)
            effects += (patched.double() - base)
            per_prompt.append((patched.double() - base).view(model.n_layers, model.n_heads))
            base_probs.append(base)
        return {"cie": (effects / params.n_corrupted).view(model.n_layers, model.n_heads),
                "per_prompt": torch.stack(per_prompt),
                "corrupted_prob": sum(base_probs) / len(base_probs), "clean_prob": float(clean_probs.mean())}

    def merge(self, model, params, partials):
        per_task, per_prompt, info = [], [], {}
        for key, partial in iter_partials(partials):
            per_task.append(torch.tensor(partial["cie"], dtype=torch.float64))
            per_prompt.append(torch.tensor(partial["per_prompt"], dtype=torch.float64))
            info[key.split("-", 1)[1]] = {"clean_prob": partial["clean_prob"],
                                          "corrupted_prob": partial["corrupted_prob"]}
        cie = torch.stack(per_task)
        samples = torch.cat(per_prompt)  # [task x prompt, layer, head]: every task has n_corrupted prompts, so the
        #                                  score (the mean over tasks of each task's mean) is their plain mean
        meta = self.meta(model, params, tasks=info, uncertainty=method("shuffled-label prompts (over all tasks)",
                                                                        len(samples)))
        return HeadScores.from_matrix(cie.mean(0), meta, cie_max=cie.amax(0), **intervals({"score": samples}))


PROBE = FunctionVector()


def scan(model, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Function-vector heads: `score` = causal indirect effect on shuffled-label ICL prompts (see Params)."""
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
