"""Head-aware KV-cache policies on a real model: NIAH accuracy against KV memory, held-out needles and windows.

    python studies/kv_study.py smollm2-135m --lengths 4096 8192 --tests 8 --out notebooks/results/kv-smollm2-135m
    python studies/kv_study.py gemma3-270m --lengths 4096 8192 --tests 8 --out notebooks/results/kv-gemma3-270m
    python studies/kv_study.py smollm2-135m --lengths 4096 8192 --tests 8 --families retrieval,random \
        --fractions 0.25 0.35 0.5 0.75 --other-windows 4:512 16:256 --other-fractions 0.25 0.5 0.75 \
        --out notebooks/results/kv-smollm2-135m   # further (sink, window) pairs; journaled rows are kept

Which data chose the heads, which evaluated them:
  - retrieval scores: the committed retrieval scan (notebooks/results/retrieval-<model>-scores.csv), run on
    headlab's own needles (datasets/needles.jsonl) over the default haystack;
  - far-attention scores (headlab.kv.far) and the detectors / sinks probes: headlab's own needles over the
    scoring half of the haystack (headlab.kv.evaluate.haystack_half(0)), random tokens, and the committed sinks scan;
  - evaluation: datasets/needles_heldout.jsonl (needles never used for scoring) over the evaluation half
    (haystack_half(1)), in haystack windows drawn with seed 1.
Every test's results (all its policies) are appended to <out>.<variant>-<mode>-<length>.tests.jsonl as the test
finishes, so an interrupted study resumes; policies added later go to <...>-<length>.<n>.tests.jsonl (the rows
already journaled are kept); the summary goes to <out>.csv and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from headlab.probes import retrieval

import headlab
from headlab import kv
from headlab.files import atomic_write_text
from headlab.kv import evaluate as ev
from headlab.kv import far

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "notebooks" / "results"


def far_scores(model, out: Path, n_prompts: int, length: int, sink: int, window: int) -> headlab.HeadScores:
    """Far-attention mass on the scoring set: headlab's needles, scoring half, the gold answer sentence appended."""
    path = out.with_name(out.name + "-far-scores")
    if path.with_suffix(".csv").exists():
        return headlab.HeadScores.load(path)
    task = ev.scoring_task(lengths=(length,), depths=(0.5,))
    prompts = []
    for test in task.tests()[:n_prompts]:
        built = retrieval.build_prompt(model, task, test)
        answer = model.token_ids(test.needle.fact.format(answer=test.needle.answer))
        prompts.append(torch.cat([built.ids, torch.tensor(answer, dtype=torch.long)]))
    scores = far.scan(model, prompts, sink=sink, window=window, rows=64,
                        meta={"data": "needles.jsonl over haystack half 0, gold answer appended"})
    scores.save(path)
    return scores


def policies_for(model, length: int, scores: dict, fractions, sink: int, window: int, sink_ids: list[int],
                 pinned: int, families: set) -> list:
    out = [kv.full(), kv.streaming(sink, window)]
    for fraction in fractions:
        if "retrieval" in families:
            out.append(kv.from_scores(model, scores["retrieval"], fraction, sink=sink, window=window,
                                      family="retrieval-max"))
        if "far" in families:
            out.append(kv.from_scores(model, scores["far"], fraction, sink=sink, window=window, family="far-max"))
        if "random" in families:
            out.append(kv.random(model, fraction, seed=0, sink=sink, window=window))
    if "retrieval+far" in families:  # retrieval ranks the heads it scores; far attention orders the rest
        for fraction in fractions:
            out.append(kv.from_scores(model, scores["retrieval+far"], fraction, sink=sink, window=window,
                                      family="retrieval+far"))
    goal = fractions[len(fractions) // 2]
    if "retrieval-mean" in families:
        out.append(kv.from_scores(model, scores["retrieval"], goal, aggregate="mean", sink=sink, window=window,
                                  family="retrieval-mean"))
    if "razor" in families and "detectors" in scores:
        out.append(kv.razor(model, scores["detectors"], goal, sink=sink, window=window))
    if "sink-aware" in families and sink_ids:
        out.append(kv.from_scores(model, scores["far"], goal, sink=sink, window=window, sink_tokens=sink_ids,
                                  pinned=pinned, family="far-max sink-aware"))
    if "budget" in families:
        for total in (256, int(0.3 * length)):
            out.append(kv.budget(model, scores["far"], total, window=window, name=f"budget {total}"))
    return out


def other_windows(model, scores: dict, fractions, pairs, families: set) -> list:
    """For each further (sink, window): streaming, the retrieval ranking at every fraction and the random control at
    the middle fraction, each its own family (one Pareto trace per (sink, window))."""
    out = []
    for sink, window in pairs:
        tag = f"S{sink} W{window}"
        out.append(kv.streaming(sink, window))
        if "retrieval" in families:
            out += [kv.from_scores(model, scores["retrieval"], fraction, sink=sink, window=window,
                                   family=f"retrieval-max {tag}") for fraction in fractions]
        if "random" in families:
            control = kv.random(model, fractions[len(fractions) // 2], seed=0, sink=sink, window=window)
            out.append(replace(control, name=f"{control.name} {tag}", family=f"random {tag}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--tests", type=int, default=8, help="held-out tests per length")
    parser.add_argument("--tests-at", nargs="*", default=[], help="per-length overrides, e.g. 2048:16")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.35, 0.5])
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--pinned", type=int, default=64)
    parser.add_argument("--other-windows", nargs="*", default=[], metavar="SINK:WINDOW",
                        help="further (sink, window) pairs, e.g. 4:512 16:256")
    parser.add_argument("--other-fractions", type=float, nargs="+", default=None,
                        help="the fractions for those pairs [--fractions]")
    parser.add_argument("--mode", default="full", choices=["full", "stream"])
    parser.add_argument("--variant", default="single", choices=["single", "multi"])
    parser.add_argument("--families", default="retrieval,far,random,retrieval-mean,razor,sink-aware,budget")
    parser.add_argument("--far-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--decode-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    overrides = {int(k): int(v) for k, v in (item.split(":") for item in args.tests_at)}
    pairs = [tuple(int(x) for x in item.split(":")) for item in args.other_windows]
    other_fractions = args.other_fractions or args.fractions
    model = headlab.load_model(args.model)
    start = time.perf_counter()
    scores = {"retrieval": headlab.HeadScores.load(RESULTS / f"retrieval-{args.model}-scores"),
              "far": far_scores(model, args.out, args.far_prompts, 4096, args.sink, args.window)}
    families = set(args.families.split(","))
    retrieval_matrix = np.nan_to_num(scores["retrieval"].matrix())
    positive = retrieval_matrix[retrieval_matrix > 0]
    epsilon = (positive.min() / 2) if len(positive) else 1.0
    scores["retrieval+far"] = headlab.HeadScores.from_matrix(
        retrieval_matrix + epsilon * np.nan_to_num(scores["far"].matrix()),
        {"probe": "retrieval+far", "epsilon": float(epsilon)})
    if "razor" in families:
        from headlab.probes import detectors

        path = args.out.with_name(args.out.name + "-detectors-scores")
        if path.with_suffix(".csv").exists():
            scores["detectors"] = headlab.HeadScores.load(path)
        else:
            scores["detectors"] = detectors.scan(model, seq_len=50, n_prompts=8, progress=False)
            scores["detectors"].save(path)
    sink_scores = headlab.HeadScores.load(RESULTS / f"sinks-{args.model}-scores")
    sink_ids = kv.sink_token_ids(model, sink_scores, top=3)
    scoring_seconds = time.perf_counter() - start
    frames = []
    for length in args.lengths:
        policies = policies_for(model, length, scores, args.fractions, args.sink, args.window, sink_ids,
                                args.pinned, families) + other_windows(model, scores, other_fractions, pairs, families)
        tests = ev.subsample(ev.heldout_task(lengths=(length,)), overrides.get(length, args.tests))
        stem = f"{args.out.name}.{args.variant}-{args.mode}-{length}"
        earlier = sorted(args.out.parent.glob(f"{stem}.tests.jsonl")) + sorted(args.out.parent.glob(f"{stem}.*.tests.jsonl"))
        done = set(pd.concat([ev.results_frame(j) for j in earlier])["policy"]) if earlier else set()
        new = [p for p in policies if p.name not in done]  # journaled rows are kept; new policies get a journal
        if not new:
            continue
        journal = args.out.with_name(f"{stem}.tests.jsonl" if not earlier else f"{stem}.{len(earlier) + 1}.tests.jsonl")
        if earlier and journal in earlier:  # an interrupted run of these policies: resume it
            journal = earlier[-1]
        rows = ev.evaluate_tests(model, new, ev.heldout_task(lengths=(length,)), tests, variant=args.variant,
                                 mode=args.mode, journal=journal, max_new_tokens=args.max_new_tokens,
                                 decode_threads=args.decode_threads)
        frames.append(rows)
    journals = sorted(args.out.parent.glob(f"{args.out.name}.{args.variant}-{args.mode}-*.tests.jsonl"))
    rows = pd.concat([ev.results_frame(j) for j in journals], ignore_index=True)  # every length run so far
    table = ev.summarize(rows).sort_values(["length", "family", "kv_fraction"], kind="stable")
    stem = args.out.with_name(f"{args.out.name}" + ("" if (args.variant, args.mode) == ("single", "full")
                                                    else f"-{args.variant}-{args.mode}"))
    earlier = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    policy_info = earlier.get("policies", {})
    policy_info |= {p.name: p.describe(model) for length in args.lengths
                   for p in policies_for(model, length, scores, args.fractions, args.sink, args.window, sink_ids,
                                         args.pinned, families) + other_windows(model, scores, other_fractions, pairs,
                                                                                families)}
    meta = {
        "model": args.model, "geometry": model.geometry, "variant": args.variant, "mode": args.mode,
        "lengths": sorted(set(rows["length"])),
        "tests_per_length": {str(k): int(v) for k, v in rows.groupby("length")["key"].nunique().items()}, "max_new_tokens": args.max_new_tokens,
        "evaluation": {"needles": "datasets/needles_heldout.jsonl", "haystack": "pydoc_data.topics, half 1",
                       "seed": 1, "tests": sorted(set(rows["key"]))},
        "runs": earlier.get("runs", []) + [{"lengths": args.lengths, "families": sorted(families),
                                            "fractions": args.fractions, "other_windows": args.other_windows,
                                            "other_fractions": other_fractions,
                                            "seconds": time.perf_counter() - start}],
        "scoring": {"retrieval": f"notebooks/results/retrieval-{args.model}-scores (needles.jsonl, default haystack)",
                    "far": scores["far"].meta.get("data"), "sinks": f"notebooks/results/sinks-{args.model}-scores",
                    "sink_token_ids": sink_ids,
                    "sink_tokens": [model.tokenizer.decode([i]) for i in sink_ids],
                    "detectors": ("random repeated tokens, seed 0" if "detectors" in scores
                                  else earlier.get("scoring", {}).get("detectors"))},
        "scoring_seconds": scoring_seconds, "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(), "decode_threads": args.decode_threads,
        "policies": policy_info, "summary": json.loads(table.to_json(orient="records")),
        "versions": headlab.scores.versions(),
    }
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1, default=str))
    print(table[["policy", "length", "accuracy", "n_tests", "kv_fraction", "kv_fraction_measured",
                 "decode_ms_per_token"]].to_string())


if __name__ == "__main__":
    main()
