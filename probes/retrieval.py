"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality").

A needle-in-a-haystack (NIAH) test hides a made-up fact in long text and asks about it. While the model answers
(greedy, at most 50 new tokens, stop at a newline or EOS), a head *copies* at a step when the key it attends to most
from the current query lies in the needle's answer span S and holds the token just generated; each copy adds
1/|S| to the head's score for that test. A test counts only if the answer was retrieved (ROUGE-1 recall of the
answer > 0.5); a head's retrieval score is its mean over the counted tests.

    task = niah_task(lengths=(1024, 2048), depths=(0.1, 0.5, 0.9), needles=4)
    scores = scan(model, task, results="retrieval.jsonl")     # HeadScores; resumable
    causal_test(model, task, scores)                          # NIAH accuracy, top-K vs random-K heads masked

The prefill runs through the capture path (headlab.kernels, no N x N tensor); each decode step gets the top-1 key
of every head of a layer from one kernel call on that step's single query row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from headlab.capture import recording
from headlab.data import haystack_text
from headlab.errors import InputError, NoSignalError
from headlab.niah import (  # noqa: F401 - the task and its answer rule
    ANSWER_CUE,
    INTRO,
    MAX_NEW_TOKENS,
    QUESTION,
    RETRIEVED_RECALL,
    Needle,
    NiahPrompt,
    NiahTask,
    NiahTest,
    answer_text,
    build_prompt,
    greedy_answer,
    load_needles,
    niah_task,
    rouge1_recall,
    stop_token_ids,
)
from headlab.probe import Probe, Unit, iter_partials
from headlab.progress import progress_bar
from headlab.scores import HeadScores, head_name
from headlab.uncertainty import intervals, method

RETRIEVAL_THRESHOLD = 0.1  # the paper's cut: heads above it are "retrieval heads"


class NoRetrievalError(NoSignalError):
    """No NIAH test counted: the model never retrieved the answer, so no head can be scored."""


# ---- scoring ----------------------------------------------------------------------------------------------

def copy_hits(
    top_keys: Int[torch.Tensor, "layer head"],
    generated: int,
    context: Int[torch.Tensor, "pos"],
    answer: tuple[int, int],
) -> Bool[torch.Tensor, "layer head"]:
    """The paper's per-step rule for all heads at once: the head's most-attended key lies in the answer span
    and holds the token just generated."""
    in_span = (top_keys >= answer[0]) & (top_keys < answer[1])
    return in_span & (context[top_keys] == generated)


def step_top_keys(top1: list[Int[torch.Tensor, "1 head 1"]], shifts: list[int]) -> Int[torch.Tensor, "layer head"]:
    """The most-attended key of every head at a decode step, from each layer's kernel top-1 (found while it
    computed attention); a layer that saw only its window of keys is shifted back to prompt positions."""
    return torch.stack([keys[0, :, 0] + shift for keys, shift in zip(top1, shifts)])


@dataclass
class NiahResult:
    """One test's outcome: the response, the recall of the answer, and every head's copy score [layer, head]."""

    key: str
    needle: str
    length: int
    depth: float
    n_tokens: int
    response: str
    recall: float
    head_scores: list[list[float]] = field(repr=False)

    @property
    def retrieved(self) -> bool:
        return self.recall > RETRIEVED_RECALL


@torch.no_grad()
def answer_needle(model, prompt: NiahPrompt, *, max_new_tokens: int = MAX_NEW_TOKENS, backend: str = "auto"
                  ) -> tuple[list[int], Float[torch.Tensor, "layer head"]]:
    """Greedy answer to a NIAH prompt and every head's copy score (sum of 1/|S| over copying steps).

    As the reference does, the prompt minus its last token is the prefill, and decoding starts by feeding the last
    prompt token, so every generated token is scored from the step that produced it.
    """
    ids = prompt.ids.to(model.device)
    n_prompt = len(ids)
    context = torch.cat([ids, torch.zeros(max_new_tokens, dtype=torch.long, device=ids.device)])
    copies = torch.zeros(model.n_layers, model.n_heads)
    with recording(model, want=(), backend=backend) as recorder:
        cache = model.hf.base_model(input_ids=ids[None, :-1], use_cache=True).cache
        recorder.want = ("top1",)

        def step(token: int) -> torch.Tensor:
            return model.hf(input_ids=torch.tensor([[token]], device=ids.device), cache=cache,
                            use_cache=True).logits[0, -1]

        def score(index: int, token: int) -> None:
            n_keys = n_prompt + index  # keys of this step: the prompt and the tokens fed so far
            top_keys = step_top_keys([recorder.stats[layer].top1 for layer in range(model.n_layers)],
                                     [n_keys - recorder.n_keys[layer] for layer in range(model.n_layers)])
            copies.add_(copy_hits(top_keys, token, context, prompt.answer).float().cpu())
            context[n_prompt + index] = token

        generated = greedy_answer(model, step, int(ids[-1]), max_new_tokens=max_new_tokens, on_token=score)
    return generated, copies / (prompt.answer[1] - prompt.answer[0])


def run_test(model, task: NiahTask, test: NiahTest, *, max_new_tokens: int = MAX_NEW_TOKENS, backend: str = "auto"
             ) -> NiahResult:
    """Build, answer and score one test."""
    prompt = build_prompt(model, task, test)
    generated, copies = answer_needle(model, prompt, max_new_tokens=max_new_tokens, backend=backend)
    response = answer_text(model, generated)
    return NiahResult(test.key, test.needle.id, test.length, test.depth, len(prompt.ids), response,
                      rouge1_recall(test.needle.answer, response), copies.tolist())


def run_tests(model, task: NiahTask, *, backend: str = "auto", progress: bool = True,
              description: str = "NIAH") -> list[NiahResult]:
    """Every test of the task, in order (for a resumable, splittable run use `scan`, whose units are the tests)."""
    return [run_test(model, task, test, backend=backend)
            for test in progress_bar(task.tests(), description, disable=not progress)]


def retrieval_scores(results: list[NiahResult]) -> Float[torch.Tensor, "layer head"]:
    """Mean copy score over the counted (retrieved) tests; raises NoRetrievalError when none counted."""
    counted = [r for r in results if r.retrieved]
    if not counted:
        raise NoRetrievalError(f"no NIAH test counted: the model retrieved the answer in 0 of {len(results)} tests "
                               "(ROUGE-1 recall > 0.5), so retrieval scores are undefined; try shorter lengths")
    return torch.tensor([r.head_scores for r in counted], dtype=torch.float64).mean(dim=0)


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """needles: how many of headlab's needles (seeded choice; None: all), a JSONL path of your own
    ({"id", "fact" with "{answer}", "question", "answer"}) or such records; haystack: a text file (default: Python's
    pydoc topics). Every needle is tested at every length (tokens) and depth (0 = start, 1 = end)."""

    needles: int | str | tuple[dict, ...] | None = None
    lengths: tuple[int, ...] = (1024, 2048, 3072)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    haystack: str | None = None
    haystack_text: str | None = None  # the haystack itself, for a task built from text rather than a file
    seed: int = 0
    chat_template: bool = True
    intro: str = INTRO
    question_template: str = QUESTION
    answer_cue: str = ANSWER_CUE
    max_new_tokens: int = MAX_NEW_TOKENS
    backend: str = "auto"


class Retrieval(Probe):
    name = "retrieval"
    description = "retrieval heads: which heads copy a needle out of a long context while the model answers"
    paper = "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality"
    Params = Params
    order = 20
    quick = {"needles": 2, "lengths": (1024,), "depths": (0.25, 0.75)}
    needs_decoder = "generates answers"
    min_context = 256
    columns = {
        "score": "retrieval score (Wu et al.): how often the head's top-1 key is the needle token being copied while "
                 "the model answers a needle-in-a-haystack question",
        "n_counted": "NIAH tests that counted (answer retrieved, ROUGE-1 recall > 0.5)",
        "score_<length>": "the retrieval score over the tests of one prompt length (NaN where none counted)",
    }

    def threshold(self, scores):
        """The paper's cut: heads above 0.1 are retrieval heads."""
        return RETRIEVAL_THRESHOLD

    def validity(self, meta):
        counted, tests = meta["n_counted"], meta["n_tests"]
        warning = (f"the model retrieved the answer in only {counted} of {tests} tests: the scores rest on few tests"
                   if counted < max(2, tests / 2) else None)
        return {"rests_on": f"{counted} of {tests} NIAH tests counted (answer retrieved, ROUGE-1 recall > 0.5)",
                "baseline": f"NIAH accuracy {meta['accuracy']:.2f}; heads above 0.1 are retrieval heads",
                "warning": warning}

    def check_params(self, params):
        self.task(params)  # every check of the task, before any compute
        return params

    def fit_context(self, params, model, max_context):
        limit = min(max_context, model.n_ctx)
        if limit < self.min_context:
            raise InputError(f"the retrieval probe needs prompts of at least {self.min_context} tokens; "
                             f"--max-context is {max_context}")
        return replace(params, lengths=tuple(n for n in params.lengths if n <= limit) or (limit,))

    def task(self, params) -> NiahTask:
        needles = params.needles
        if isinstance(needles, tuple):
            needles = [Needle(str(n["id"]), n["fact"], n["question"], str(n["answer"])) for n in needles]
        task = niah_task(needles=needles, lengths=params.lengths, depths=params.depths, haystack=params.haystack,
                         seed=params.seed, chat_template=params.chat_template, intro=params.intro,
                         question_template=params.question_template, answer_cue=params.answer_cue)
        return task if params.haystack_text is None else replace(task, haystack=params.haystack_text)

    def plan(self, model, params):
        return [Unit(f"{i:06d}", {"index": i, "test": test.key}) for i, test in enumerate(self.task(params).tests())]

    def run(self, model, params, unit):
        task = self.task(params)
        test = task.tests()[unit.data["index"]]
        return asdict(run_test(model, task, test, max_new_tokens=params.max_new_tokens, backend=params.backend))

    def merge(self, model, params, partials):
        outcomes = [NiahResult(**partial) for _, partial in iter_partials(partials)]
        score = retrieval_scores(outcomes)
        n_counted = sum(r.retrieved for r in outcomes)
        columns = {"n_counted": torch.full_like(score, n_counted)}
        samples = {"score": [r.head_scores for r in outcomes if r.retrieved]}  # the counted tests, in test order
        for length in params.lengths:
            of_length = [r for r in outcomes if r.length == length]
            columns[f"score_{length}"] = (retrieval_scores(of_length) if any(r.retrieved for r in of_length)
                                          else torch.full_like(score, float("nan")))
            samples[f"score_{length}"] = torch.tensor([r.head_scores for r in of_length if r.retrieved],
                                                      dtype=torch.float64).reshape(-1, *score.shape)
        columns.update(intervals(samples))
        meta = self.meta(model, params, task=self.task(params).describe(), n_tests=len(outcomes),
                         uncertainty=method("counted NIAH tests", n_counted),
                         n_counted=n_counted, accuracy=n_counted / len(outcomes),
                         **{"fraction_above_0.1": float((score > RETRIEVAL_THRESHOLD).double().mean())},
                         tests=[{k: v for k, v in asdict(r).items() if k != "head_scores"} for r in outcomes])
        return HeadScores.from_matrix(score, meta, **columns)


PROBE = Retrieval()


def scan(model, task: NiahTask | None = None, *, results: str | Path | None = None, progress: bool = True,
         quick: bool = False, **params) -> HeadScores:
    """Retrieval score of every head: columns score, n_counted and score_<length> (NaN where no test of that
    length counted). meta holds the accuracy, the fraction of heads above 0.1 and every test's outcome. `task`: a
    NiahTask (its needles, lengths, depths, haystack, seed and templates become the parameters); `results`: a journal
    file, so an interrupted scan resumes at the test. See Params."""
    if task is not None:
        params = {**task_params(task), **params}
    return PROBE.scan(model, journal=results, progress=progress, quick=quick, **params)


def task_params(task: NiahTask) -> dict:
    """The Params fields that rebuild `task` (its haystack by file path, or by its text when it has none)."""
    from_file = task.haystack_name != "pydoc_data.topics" and Path(task.haystack_name).is_file()
    default = not from_file and task.haystack == haystack_text()
    return {"needles": [asdict(n) for n in task.needles], "lengths": task.lengths, "depths": task.depths,
            "haystack": task.haystack_name if from_file else None,
            "haystack_text": None if from_file or default else task.haystack, "seed": task.seed,
            "chat_template": task.chat_template, "intro": task.intro, "question_template": task.question_template,
            "answer_cue": task.answer_cue}


# ---- the causal test ----------------------------------------------------------------------------------------

def niah_accuracy(model, task: NiahTask, *, ablate=None, mode: str = "uniform", reference=None,
                  backend: str = "auto", progress: bool = True) -> dict:
    """NIAH accuracy (fraction of tests with ROUGE-1 recall > 0.5) and mean recall, with `ablate` heads
    ablated (headlab.interventions.ablate_heads: "uniform", "zero" or "mean") during prefill and decoding."""
    from contextlib import nullcontext

    heads = model.check_heads(ablate or [])
    context = model.ablate_heads(heads, mode=mode, reference=reference) if heads else nullcontext()
    with context:
        outcomes = run_tests(model, task, backend=backend, progress=progress,
                             description=f"NIAH, {len(heads)} heads ablated")
    return {"accuracy": float(np.mean([r.retrieved for r in outcomes])),
            "mean_recall": float(np.mean([r.recall for r in outcomes])), "n_tests": len(outcomes),
            "heads": [head_name(*h) for h in heads], "mode": mode,
            "responses": {r.key: r.response for r in outcomes}}


def causal_test(model, task: NiahTask, scores: HeadScores, *, fractions=(0.05, 0.10), seeds=(0, 1, 2),
                mode: str = "uniform", backend: str = "auto", progress: bool = True) -> pd.DataFrame:
    """NIAH accuracy intact, with the top-K retrieval heads ablated, and with K random non-retrieval heads
    ablated (one row per seed), for K = each fraction of all heads. Random heads are drawn from the heads that are
    neither in the top-K nor above the 0.1 threshold."""
    n_heads = model.n_layers * model.n_heads
    ranked = scores.heads(n_heads)
    above = {h for h, s in zip(ranked, scores.top(n_heads)["score"]) if s > RETRIEVAL_THRESHOLD}
    rows = [{"condition": "intact", "k": 0, "seed": None,
             **_accuracy_row(niah_accuracy(model, task, backend=backend, progress=progress))}]
    for fraction in fractions:
        k = max(1, round(fraction * n_heads))
        top = ranked[:k]
        rows.append({"condition": "top", "k": k, "seed": None, **_accuracy_row(
            niah_accuracy(model, task, ablate=top, mode=mode, backend=backend, progress=progress))})
        pool = [h for h in ranked if h not in set(top) and h not in above]
        if len(pool) < k:
            raise InputError(f"only {len(pool)} non-retrieval heads are left to draw {k} random heads from")
        for seed in seeds:
            chosen = [pool[i] for i in np.random.default_rng(seed).choice(len(pool), size=k, replace=False)]
            rows.append({"condition": "random", "k": k, "seed": seed, **_accuracy_row(
                niah_accuracy(model, task, ablate=chosen, mode=mode, backend=backend, progress=progress))})
    return pd.DataFrame(rows)


def _accuracy_row(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "mean_recall": result["mean_recall"], "heads": " ".join(result["heads"])}
