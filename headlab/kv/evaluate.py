"""NIAH accuracy of KV-cache policies against their memory, with held-out needles and haystack windows.

    task = heldout_task(model, lengths=(4096, 8192))                 # held-out needles, evaluation half of the text
    table = evaluate(model, [full(), streaming(), policy], task, journal="kv.jsonl")
    pareto_figure(table)

A test is answered by the NIAH answer rule the retrieval probe uses (`headlab.niah.greedy_answer`: prompt minus its
last token as the prefill, then greedy decoding from the last prompt token, at most MAX_NEW_TOKENS, stop at a newline
or EOS) and counts as retrieved when the ROUGE-1 recall of the answer exceeds RETRIEVED_RECALL. The "multi" variant hides `distractors`
other held-out needles at other depths of the same haystack and asks about one.

No leakage: head scores are computed on headlab's own needles (datasets/needles.jsonl) over the first half of the
haystack text (`haystack_half(0)`); evaluation uses datasets/needles_heldout.jsonl over the second half.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from headlab import niah
from headlab.data import dataset_path
from headlab.engines.scheduler import Schedule
from headlab.errors import InputError
from headlab.kv.cache import applying, prefill, step
from headlab.kv.policy import KVPolicy, full
from headlab.niah import MAX_NEW_TOKENS, NiahTask, NiahTest, answer_text, greedy_answer
from headlab.probe import Unit

VARIANTS = ("single", "multi")
HELDOUT_NEEDLES = "needles_heldout.jsonl"


# ---- data ---------------------------------------------------------------------------------------------------

def haystack_half(part: int) -> str:
    """Half of the default haystack (Python's pydoc topics, sorted by name): 0 = the scoring half, 1 = the evaluation
    half. Disjoint texts, so scoring and evaluation windows never share a token of haystack."""
    if part not in (0, 1):
        raise InputError(f"part must be 0 (scoring) or 1 (evaluation), got {part}")
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = keys[: len(keys) // 2] if part == 0 else keys[len(keys) // 2:]
    return "\n\n".join(topics[key].strip() for key in half)


def heldout_needles() -> list[niah.Needle]:
    """The evaluation needles (never used to score heads)."""
    return niah.load_needles(dataset_path(HELDOUT_NEEDLES))


def _task(needles, lengths, depths, part: int, seed: int) -> NiahTask:
    base = niah.niah_task(needles=needles, lengths=lengths, depths=depths, seed=seed)
    base.haystack = haystack_half(part)
    base.haystack_name = f"pydoc_data.topics, half {part}"
    return base


def heldout_task(lengths=(4096, 8192), depths=(0.2, 0.5, 0.8), *, needles: int | None = None, seed: int = 1
                 ) -> NiahTask:
    """Evaluation grid: held-out needles (the first `needles` of them, default all) over the evaluation half."""
    chosen = heldout_needles()
    return _task(chosen[:needles] if needles else chosen, lengths, depths, 1, seed)


def scoring_task(lengths=(4096,), depths=(0.2, 0.5, 0.8), *, needles: int | None = None, seed: int = 0
                 ) -> NiahTask:
    """Scoring grid: headlab's own needles over the scoring half (for choosing heads and settings)."""
    chosen = niah.load_needles()
    return _task(chosen[:needles] if needles else chosen, lengths, depths, 0, seed)


def subsample(task: NiahTask, n: int, seed: int = 0) -> list[NiahTest]:
    """n tests of the task per length, spread over needles and depths (seeded)."""
    tests = task.tests()
    out = []
    for length in task.lengths:
        of_length = [t for t in tests if t.length == length]
        order = np.random.default_rng(seed + length).permutation(len(of_length))[:n]
        out += [of_length[i] for i in sorted(order)]
    return out


# ---- prompts ------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    key: str
    ids: torch.Tensor
    answer: str
    needle: str
    length: int
    depth: float
    distractors: tuple[str, ...] = ()


def _sentence_ends(model, ids: list[int]) -> list[bool]:
    pieces = model.tokenizer.convert_ids_to_tokens(ids)
    return [bool(re.search(r"[.!?]\W*$", model.tokenizer.convert_tokens_to_string([p]))) for p in pieces]


def build(model, task: NiahTask, test: NiahTest, variant: str = "single",
          pool: list | None = None, distractors: int = 3) -> Prompt:
    """The test's prompt. "multi": `distractors` other needles of `pool` (seeded by the test) are placed at other
    depths of the document, each right after a sentence end; the prompt keeps `test.length` tokens."""
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; use 'single' or 'multi'")
    if variant == "single":
        prompt = niah.build_prompt(model, task, test)
        return Prompt(test.key, prompt.ids, test.needle.answer, test.needle.id, test.length, test.depth)
    others = [n for n in (pool or task.needles) if n.id != test.needle.id]
    if len(others) < distractors:
        raise InputError(f"the multi-needle variant needs {distractors} other needles, the pool has {len(others)}")
    rng = np.random.default_rng(_seed(test.key))
    chosen = [others[i] for i in rng.permutation(len(others))[:distractors]]
    pieces = [model.token_ids(" " + n.fact.format(answer=n.answer) + " ") for n in chosen]
    shorter = NiahTest(test.needle, test.length - sum(map(len, pieces)), test.depth, test.offset)
    prompt = niah.build_prompt(model, task, shorter)
    ids = prompt.ids.tolist()
    doc_start, doc_end = prompt.document
    needle_start, needle_end = prompt.needle
    ends = _sentence_ends(model, ids)
    # depths for the distractors: evenly spread, away from the asked needle's depth
    slots = [d for d in np.linspace(0.05, 0.95, distractors + 1) if abs(d - test.depth) > 0.1][:distractors]
    while len(slots) < distractors:
        slots.append(float(rng.random()))
    inserts = []
    for depth, piece in zip(slots, pieces):
        target = doc_start + int(depth * (doc_end - doc_start))
        candidates = [i + 1 for i in range(doc_start, doc_end - 1) if ends[i]
                      and not (needle_start - 1 <= i < needle_end)]
        where = min(candidates, key=lambda i: abs(i - target)) if candidates else target
        inserts.append((where, piece))
    for where, piece in sorted(inserts, key=lambda x: -x[0]):
        ids[where:where] = piece
    return Prompt(test.key + ":multi", torch.tensor(ids, dtype=torch.long), test.needle.answer, test.needle.id,
                  test.length, test.depth, tuple(n.id for n in chosen))


def _seed(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode("utf-8"))


# ---- answering ----------------------------------------------------------------------------------------------

@torch.no_grad()
def _decode(model, cache, last_token: int, max_new_tokens: int, threads: int | None = None
            ) -> tuple[list[int], list[float]]:
    """The NIAH answer under the cache's policy, and each step's seconds; `threads`: torch threads while decoding
    (None: unchanged; 1 helps on a busy small CPU)."""
    times = []

    def timed_step(token: int) -> torch.Tensor:
        start = time.perf_counter()
        logits = step(model, cache, token)
        times.append(time.perf_counter() - start)
        return logits

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with applying(model, cache):  # once around the loop, not at every step
            generated = greedy_answer(model, timed_step, last_token, max_new_tokens=max_new_tokens)
    finally:
        torch.set_num_threads(before)
    return generated, times


def _row(model, policy: KVPolicy, prompt: Prompt, cache, generated, times, prefill_s: float, mode: str) -> dict:
    response = answer_text(model, generated)
    recall = niah.rouge1_recall(prompt.answer, response)
    n_prompt = len(prompt.ids)
    fed = n_prompt + len(generated) - 1  # the last generated token is never fed
    entry_bytes = 2 * model.d_head * torch.finfo(model.dtype).bits // 8
    # the prefill holds the prompt minus its last token; decoding fed that token and all but the last generated one
    reference = int(full().kept_tokens(model, n_prompt - 1, len(generated)).sum()) * entry_bytes
    analytic = policy.kept_tokens(model, n_prompt - 1, len(generated))
    measured = cache.kv_bytes()
    return {
        "policy": policy.name, "family": policy.family, "fraction": policy.fraction, "sink": policy.sink,
        "window": policy.window, "pinned": policy.pinned, "mode": mode, "length": prompt.length, "key": prompt.key,
        "needle": prompt.needle, "depth": prompt.depth, "n_tokens": n_prompt, "response": response, "recall": recall,
        "retrieved": recall > niah.RETRIEVED_RECALL, "kv_bytes": measured, "kv_bytes_held": cache.kv_bytes_held(),
        "kv_bytes_analytic": int(analytic.sum()) * entry_bytes, "kv_bytes_full": reference,
        "kv_fraction": float(analytic.sum() * entry_bytes / reference), "kv_fraction_measured": measured / reference,
        "n_full": policy.n_full(model), "fed_tokens": fed, "prefill_s": prefill_s,
        "decode_ms_per_token": 1000 * float(np.median(times[1:] if len(times) > 1 else times)),
        "n_generated": len(generated),
    }


def answer(model, policy: KVPolicy, prompt: Prompt, *, mode: str = "stream", max_new_tokens: int = MAX_NEW_TOKENS,
           chunk: int | None = None, threads: int | None = None) -> dict:
    """One test under one policy: a result row (response, recall, measured and analytic KV bytes, timings)."""
    start = time.perf_counter()
    cache = prefill(model, prompt.ids[:-1], policy, mode=mode, chunk=chunk)
    prefill_s = time.perf_counter() - start
    generated, times = _decode(model, cache, int(prompt.ids[-1]), max_new_tokens, threads)
    return _row(model, policy, prompt, cache, generated, times, prefill_s, mode)


# ---- evaluation ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _NoParams:
    """The evaluation's units need no parameters beyond the evaluation itself (engines pass an empty dict)."""


@dataclass(frozen=True)
class Evaluation:
    """The KV evaluation as a plan of units, one per test (every policy on it), for any engine of
    headlab.engines: plan, run, fingerprint (the unit's partial is {"rows": [...]}, one row per policy)."""

    policies: tuple[KVPolicy, ...]
    task: NiahTask
    tests: tuple[NiahTest, ...]
    variant: str = "single"
    distractors: int = 3
    mode: str = "stream"
    max_new_tokens: int = MAX_NEW_TOKENS
    chunk: int | None = None
    decode_threads: int | None = None
    name: ClassVar[str] = "kv"
    Params: ClassVar[type] = _NoParams

    def plan(self, model, params=None) -> list[Unit]:
        suffix = ":multi" if self.variant == "multi" else ""
        return [Unit(test.key + suffix, {"index": i}) for i, test in enumerate(self.tests)]

    def fingerprint(self, model, params=None) -> dict:
        return {"model": model.name, "geometry": model.geometry, "variant": self.variant, "mode": self.mode,
                "distractors": self.distractors if self.variant == "multi" else 0, **self.task.describe(),
                "haystack_chars": len(self.task.haystack), "policies": [p.name for p in self.policies],
                "max_new_tokens": self.max_new_tokens}

    def run(self, model, params, unit: Unit) -> dict:
        test = self.tests[unit.data["index"]]
        prompt = build(model, self.task, test, self.variant, distractors=self.distractors)
        if self.mode == "full":
            observe = max([p.observe for p in self.policies if p.is_budget], default=0)
            start = time.perf_counter()
            shared = _exact_prefill(model, prompt.ids[:-1], observe)
            prefill_s = time.perf_counter() - start
        rows = []
        for policy in self.policies:
            if self.mode == "full":
                cache = copy.deepcopy(shared)
                if not policy.is_full:
                    cache.evict(policy)
                cache.observed = {}
                generated, times = _decode(model, cache, int(prompt.ids[-1]), self.max_new_tokens,
                                           self.decode_threads)
                row = _row(model, policy, prompt, cache, generated, times, prefill_s, self.mode)
                del cache
            else:
                row = answer(model, policy, prompt, mode=self.mode, max_new_tokens=self.max_new_tokens,
                             chunk=self.chunk, threads=self.decode_threads)
            row["variant"] = self.variant
            row["distractors"] = ",".join(prompt.distractors)
            rows.append(row)
        return {"rows": rows}


def evaluate_tests(model, policies: list[KVPolicy], task: NiahTask, tests=None, *, variant: str = "single",
                   distractors: int = 3, mode: str = "stream", journal: str | Path | None = None,
                   max_new_tokens: int = MAX_NEW_TOKENS, chunk: int | None = None, decode_threads: int | None = None,
                   engine=None, progress: bool = True) -> pd.DataFrame:
    """One row per (test, policy), through headlab's scheduler: with `journal`, each finished test (all its policies)
    is journaled and an interrupted run resumes; `engine` a RayEngine runs the tests on its workers. mode "full"
    shares one exact prefill per test among all policies."""
    if not policies:
        raise InputError("evaluate needs at least one policy")
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise InputError(f"policy names must be unique, got {names}")
    if mode not in ("stream", "full"):
        raise InputError(f"unknown prefill mode {mode!r}; use 'stream' or 'full'")
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; use 'single' or 'multi'")
    tests = list(tests) if tests is not None else task.tests()
    too_long = [t.length for t in tests if t.length > model.n_ctx]
    if too_long:
        raise InputError(f"tests of {max(too_long)} tokens exceed {model.name}'s context of {model.n_ctx}")
    evaluation = Evaluation(tuple(policies), task, tuple(tests), variant, distractors, mode, max_new_tokens, chunk,
                            decode_threads)
    units = evaluation.plan(model)
    schedule = Schedule(f"kv {variant}", units, evaluation.fingerprint(model), journal=journal, progress=progress)
    try:
        if engine is not None:
            engine.run_schedule(evaluation, _NoParams(), schedule)
        for unit in schedule.todo:
            if unit.key not in schedule.partials:
                schedule.finish(unit.key, evaluation.run(model, None, unit))
    finally:
        schedule.close()
    return pd.DataFrame([row for unit in units for row in schedule.partials[unit.key]["rows"]])


def _exact_prefill(model, ids, observe: int):
    from headlab.kv.cache import PolicyCache, applying

    cache = PolicyCache(model, full(), observe=observe)
    ids = torch.as_tensor(ids).reshape(1, -1).to(model.device)
    cache.feed(ids)
    with torch.no_grad(), applying(model, cache):
        model.hf.base_model(input_ids=ids, cache=cache, use_cache=True)
    return cache


GROUP = ["policy", "family", "fraction", "sink", "window", "pinned", "mode", "variant", "length"]


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (policy, length): accuracy (fraction retrieved), mean recall, KV bytes (measured and analytic)
    and fractions, decode ms/token (median over tests)."""
    if rows.empty:
        raise InputError("no results to summarize")
    rows = rows.copy()
    rows["fraction"] = rows["fraction"].astype(float)
    grouped = rows.groupby(GROUP, dropna=False, sort=False)
    out = grouped.agg(accuracy=("retrieved", "mean"), n_tests=("retrieved", "size"), recall=("recall", "mean"),
                      kv_bytes=("kv_bytes", "mean"), kv_bytes_analytic=("kv_bytes_analytic", "mean"),
                      kv_bytes_full=("kv_bytes_full", "mean"), kv_fraction=("kv_fraction", "mean"),
                      kv_fraction_measured=("kv_fraction_measured", "mean"), n_full=("n_full", "first"),
                      decode_ms_per_token=("decode_ms_per_token", "median"), prefill_s=("prefill_s", "median"))
    return out.reset_index()


def evaluate(model, policies: list[KVPolicy], task: NiahTask, tests=None, **kwargs) -> pd.DataFrame:
    """Summary table (policy, family, fraction, sink, window, length, accuracy, kv_bytes, kv_fraction,
    decode_ms_per_token, ...) of `evaluate_tests`; the per-test rows are in `.attrs['tests']`."""
    rows = evaluate_tests(model, policies, task, tests, **kwargs)
    table = summarize(rows)
    table.attrs["tests"] = rows
    return table


def pareto_figure(table: pd.DataFrame, title: str | None = None):
    """Accuracy against KV fraction: one trace per policy family, one panel per (variant, length)."""
    import plotly.express as px

    data = table.sort_values(["family", "kv_fraction"]).copy()
    data["panel"] = [f"{v} {n}" for v, n in zip(data["variant"], data["length"])]
    fig = px.line(data, x="kv_fraction", y="accuracy", color="family", facet_col="panel", markers=True,
                  hover_data=["policy", "sink", "window", "n_tests", "kv_fraction_measured", "decode_ms_per_token"],
                  title=title or "NIAH accuracy against KV memory (fraction of the model's own cache)")
    fig.update_xaxes(range=[0, 1.05], title="KV fraction")
    fig.update_yaxes(range=[-0.05, 1.05])
    return fig


def results_frame(path: str | Path) -> pd.DataFrame:
    """Per-test rows of a journal written by evaluate_tests (one line per test; journals of earlier versions held one
    row per line)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    rows = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        rows += record["partial"]["rows"] if "partial" in record else [record]
    return pd.DataFrame(rows)
