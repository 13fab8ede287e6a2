"""Decode speed and KV memory of head-aware KV-cache policies against the full cache, in one run.

    python tests/bench/bench_kv.py --model smollm2-135m --length 8192 --out bench_kv.json

Policies: the plain model (transformers' DynamicCache, SDPA), `full` through headlab.kv's cache (must cost the same),
and the top 50% and 25% of KV heads by the committed retrieval scores kept full with sink 4 + window 128 for the rest.
Each policy gets the same prompt (a window of the evaluation half of the haystack) and an exact prefill followed by
eviction (so the prefill is shared in cost, not measured), then `--steps` greedy decoding steps; the first `--warmup`
steps are not timed. Every cache decodes once per round (`--rounds`), each time from a fresh copy, so drift on a
shared machine falls on all of them; each reports the median over rounds of its median step. Reported: median and mean ms per decoding step, KV bytes held by the cache tensors (measured on
the cache object) and the analytic count, and each policy's ratios against `full`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import headlab
from headlab import kv
from headlab.files import atomic_write_text
from headlab.kv import evaluate as ev

ROOT = Path(__file__).resolve().parent.parent.parent


def prompt_ids(model, length: int) -> torch.Tensor:
    ids = model.tokenizer(ev.haystack_half(1), add_special_tokens=False, verbose=False).input_ids
    if length > len(ids):
        raise SystemExit(f"the evaluation haystack has {len(ids)} tokens, asked for {length}")
    bos = [model.bos_token_id] if model.bos_token_id is not None else []
    return torch.tensor(bos + ids[: length - len(bos)])


@torch.no_grad()
def decode_times(model, step_fn, first: int, steps: int) -> list[float]:
    token, times = first, []
    for _ in range(steps):
        start = time.perf_counter()
        logits = step_fn(token)
        times.append(time.perf_counter() - start)
        token = int(logits.argmax())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="every cache decodes once per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = headlab.load_model(args.model)
    scores = headlab.HeadScores.load(ROOT / "notebooks" / "results" / f"retrieval-{args.model}-scores")
    ids = prompt_ids(model, args.length)
    policies = [kv.full(), kv.from_scores(model, scores, 0.5), kv.from_scores(model, scores, 0.25)]
    entry = 2 * model.d_head * torch.finfo(model.dtype).bits // 8
    start = time.perf_counter()
    shared = ev._exact_prefill(model, ids[:-1], 0)
    prefill_s = time.perf_counter() - start
    plain = DynamicCache(config=model.hf.config)
    with torch.no_grad():
        model.hf.base_model(input_ids=ids[None, :-1], cache=plain, use_cache=True)

    def plain_step(cache):
        return lambda token: model.hf(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1]

    # Rounds of every cache one after the other (the order reversed every other round), each from a fresh copy of its
    # prefilled cache, so that the machine's drift (10-20% on a shared CPU) and the position in a round fall on every
    # cache alike; a policy decodes as the KV evaluation does (its policy applied once around the loop).
    times: dict[str, list[float]] = {}
    kept: dict[str, object] = {}

    def run_plain():
        cache = copy.deepcopy(plain)
        times.setdefault("plain", []).append(statistics.median(
            decode_times(model, plain_step(cache), int(ids[-1]), args.steps)[args.warmup:]))
        kept["plain"] = cache

    def run_policy(policy):
        cache = copy.deepcopy(shared)
        if not policy.is_full:
            cache.evict(policy)
        with kv.applying(model, cache):
            step_times = decode_times(model, lambda t: kv.step(model, cache, t), int(ids[-1]), args.steps)
        times.setdefault(policy.name, []).append(statistics.median(step_times[args.warmup:]))
        kept[policy.name] = cache

    for round_ in range(args.rounds):  # the plain model first in even rounds, last in odd ones
        order = [run_plain] + [lambda p=p: run_policy(p) for p in policies]
        for run in order if round_ % 2 == 0 else reversed(order):
            run()
    rows = [{"policy": "plain (transformers DynamicCache)", "ms_median": 1000 * statistics.median(times["plain"]),
             "ms_rounds": [1000 * t for t in times["plain"]],
             "kv_bytes": sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in kept["plain"].layers),
             "kv_bytes_analytic": None}]
    for policy in policies:
        cache = kept[policy.name]
        analytic = int(policy.kept_tokens(model, len(ids) - 1, args.steps).sum()) * entry
        rows.append({"policy": policy.name, "n_full_kv_heads": policy.n_full(model),
                     "ms_median": 1000 * statistics.median(times[policy.name]),
                     "ms_rounds": [1000 * t for t in times[policy.name]],
                     "kv_bytes": cache.kv_bytes(), "kv_bytes_held": cache.kv_bytes_held(),
                     "kv_bytes_analytic": analytic})
    full_row = next(r for r in rows if r["policy"] == "full")
    for row in rows:
        row["kv_ratio_vs_full"] = row["kv_bytes"] / full_row["kv_bytes"]
        row["speedup_vs_full"] = full_row["ms_median"] / row["ms_median"]
    plain_row = rows[0]
    result = {"model": args.model, "length": args.length, "steps_timed": args.steps - args.warmup, "rounds": args.rounds,
              "full_over_plain": full_row["ms_median"] / plain_row["ms_median"],
              "threads": torch.get_num_threads(), "prefill_s": prefill_s, "rows": rows,
              "note": "exact prefill then eviction; decode timed after warmup; CPU timings are noisy on a shared machine",
              "versions": headlab.scores.versions()}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"full / plain model: {result['full_over_plain']:.3f}x")
    for row in rows:
        print(f"{row['policy']:>36}: {row['ms_median']:7.1f} ms/token (x{row['speedup_vs_full']:.2f}), "
              f"KV {row['kv_bytes'] / 2**20:7.1f} MiB (x{row['kv_ratio_vs_full']:.3f})")


if __name__ == "__main__":
    main()
