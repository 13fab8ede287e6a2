"""Benchmark: long-context attention statistics vs the plain forward and the hook path.

For each (model, context) and variant, one fresh process loads the model (cached weights), builds a prompt
from `pydoc_data.topics`, resets the kernel's peak-RSS counter and times the call (best of --repeats up to
8k tokens, one call beyond):
  a  plain HF forward of the base model with SDPA (no LM head, no cache) — the baseline;
  b64  attention_stats: LSE + span mass for every query, top-1 key for the last 64 queries;
  ball attention_stats: LSE + span mass + top-1 key for every query;
  c  the bridge's run_with_cache of every layer's hook_pattern (only where the patterns fit in memory).
Prints a table with ratios against (a) of the same run and writes bench_attention_stats.json.

    .venv/bin/python tests/bench/bench_attention_stats.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = {  # (model, tokens): variants
    ("smollm2-135m", 2048): ["a", "b64", "ball", "c"],
    ("smollm2-135m", 8192): ["a", "b64", "ball"],
    ("gemma3-270m", 8192): ["a", "b64", "ball"],
    ("gemma3-270m", 32768): ["a", "b64"],
}
QUICK = {("smollm2-135m", 1024): ["a", "b64", "ball", "c"]}
NOT_RUN = {
    ("smollm2-135m", 8192, "c"): "patterns of 30 layers x 9 heads at 8k tokens need 67 GiB",
    ("gemma3-270m", 8192, "c"): "patterns of 18 layers x 4 heads at 8k tokens need 18 GiB besides the model",
    ("gemma3-270m", 32768, "c"): "patterns at 32k tokens need 288 GiB",
    ("gemma3-270m", 32768, "ball"): "not run: the top-1 key of every query at 32k takes the full score pass "
                                    "(the 8k row shows its cost)",
}


def _rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size


def _rss_peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_one(model_name: str, n: int, variant: str, repeats: int) -> dict:
    """Time (best of `repeats`) and peak RSS of one variant, in this process."""
    import pydoc_data.topics

    import torch

    import headlab

    torch.manual_seed(0)
    model = headlab.load_model(model_name)
    text = " ".join(pydoc_data.topics.topics.values())
    while len(text) < 6 * n:
        text += " " + text
    tokens = model.to_tokens(text[: 8 * n])[:, :n]
    assert tokens.shape[1] == n, f"only {tokens.shape[1]} tokens"
    spans = {"needle": (n // 2, n // 2 + 32), "head": (1, 65)}
    calls = {
        "a": lambda: model.hf.base_model(input_ids=tokens, use_cache=False),
        "b64": lambda: model.attention_stats(tokens, spans=spans, want=("lse", "span_mass", "top1"),
                                             query_rows=range(-64, 0)),
        "ball": lambda: model.attention_stats(tokens, spans=spans, want=("lse", "span_mass", "top1")),
        "c": lambda: model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern")),
    }
    times = []
    with torch.no_grad():
        _rss_reset()
        for _ in range(repeats):
            start = time.perf_counter()
            result = calls[variant]()
            times.append(time.perf_counter() - start)
            del result
    return {"model": model_name, "tokens": n, "variant": variant, "seconds": min(times), "all_seconds": times,
            "peak_rss_gb": _rss_peak_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 at 1k tokens only")
    parser.add_argument("--out", default="bench_attention_stats.json")
    parser.add_argument("--only", action="append", metavar="MODEL:TOKENS", help="run only these (model, tokens)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per variant up to 8k tokens (best is kept)")
    parser.add_argument("--one", nargs=4, metavar=("MODEL", "TOKENS", "VARIANT", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.one[2], int(args.one[3]))))
        return
    runs = QUICK if args.quick else RUNS
    if args.only:
        runs = {key: variants for key, variants in runs.items() if f"{key[0]}:{key[1]}" in args.only}
    rows = []
    for (model, n), variants in runs.items():
        for variant in variants:
            print(f"{model} {n} tokens, {variant} ...", file=sys.stderr, flush=True)
            repeats = args.repeats if n <= 8192 else 1
            done = subprocess.run([sys.executable, __file__, "--one", model, str(n), variant, str(repeats)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"model": model, "tokens": n, "variant": variant, "error": done.stderr[-500:]})
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["tokens"] == row["tokens"]
                     and r["variant"] == "a" and "seconds" in r), None)
        if base and "seconds" in row:
            row["time_ratio"] = row["seconds"] / base["seconds"]
            row["rss_ratio"] = row["peak_rss_gb"] / base["peak_rss_gb"]
    for (model, n, variant), why in NOT_RUN.items():
        if not args.quick and (model, n) in runs:
            rows.append({"model": model, "tokens": n, "variant": variant, "not_run": why})
    print(f"{'model':14} {'tokens':>6} {'variant':7} {'seconds':>8} {'peak GB':>8} {'time/a':>7} {'rss/a':>6}")
    for r in rows:
        if "seconds" in r:
            print(f"{r['model']:14} {r['tokens']:>6} {r['variant']:7} {r['seconds']:8.2f} {r['peak_rss_gb']:8.2f} "
                  f"{r['time_ratio']:7.2f} {r['rss_ratio']:6.2f}")
        else:
            print(f"{r['model']:14} {r['tokens']:>6} {r['variant']:7} {r.get('not_run') or 'failed: ' + r['error'][-200:]}")
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
