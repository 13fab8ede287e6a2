"""Function vectors, successor heads and copy suppression on a real model.

    python studies/study_roles_icl.py smollm2-135m --out notebooks/results/roles-smollm2-135m.json
    python studies/study_roles_icl.py gemma3-270m --out notebooks/results/roles-gemma3-270m.json
    python studies/study_roles_icl.py smollm2-135m --quick --out /tmp/roles.json     # the notebook's form

(a) ICL accuracy on held-out prompts (the "heldout" pairs of datasets/icl_tasks.json, never seen by the probe) with
    the top-k function-vector heads mean-ablated, the top-k induction heads (detectors probe) mean-ablated, or k
    random heads (neither set); the two sets exclude each other's members and have the same size.
(b) successor heads: the best succession score against the best score of the shuffled-order control.
(c) copy suppression: the strongest suppressing head, and the share of its suppression the OV rule reproduces when
    its values are recomputed from the effective embeddings of the attended tokens (attention kept from the run).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from headlab.probes import copy_suppression, detectors, function_vector, successor
from headlab.probes.patching import head_writes, norm_gain, write_names

import headlab
from headlab.files import atomic_write_text
from headlab.hooks import name as hook_name
from headlab.hooks import run_with_cache


def icl_accuracy(model, prompts, heads=()) -> float:
    """Share of prompts whose top next token is the answer's first token, with `heads` mean-ablated (the mean of
    their z over each prompt's own positions)."""
    hits = 0
    for prompt in prompts:
        tokens = model.to_tokens(prompt.text)
        if heads:
            with model.ablate_heads(list(heads), mode="mean"):
                top = int(model.logits(tokens)[0, -1].argmax())
        else:
            top = int(model.logits(tokens)[0, -1].argmax())
        hits += top == function_vector.answer_token(model, prompt.answer)
    return hits / len(prompts)


def ablation_study(model, fv, induction, k: int, prompts, seeds) -> dict:
    by_fv = [(int(r.layer), int(r.head)) for r in fv.frame.sort_values("score", ascending=False).itertuples()]
    by_ind = [(int(r.layer), int(r.head)) for r in induction.frame.sort_values("score", ascending=False).itertuples()]
    top_fv, top_ind = by_fv[:k], by_ind[:k]
    fv_only = [h for h in top_fv if h not in top_ind]
    ind_only = [h for h in top_ind if h not in top_fv]
    m = min(len(fv_only), len(ind_only))
    fv_set, ind_set = fv_only[:m], ind_only[:m]
    rest = [h for h in model.all_heads() if h not in set(top_fv) | set(top_ind)]
    out = {"k": k, "matched": m, "overlap": len(set(top_fv) & set(top_ind)),
           "fv_heads": [f"L{l}H{h}" for l, h in fv_set], "induction_heads": [f"L{l}H{h}" for l, h in ind_set],
           "clean": icl_accuracy(model, prompts), "fv_ablated": icl_accuracy(model, prompts, fv_set),
           "induction_ablated": icl_accuracy(model, prompts, ind_set)}
    out["random_ablated"] = [icl_accuracy(model, prompts, random.Random(s).sample(rest, m)) for s in seeds]
    return out


@torch.no_grad()
def ov_rule_share(model, tokens, layer: int, head: int) -> dict:
    """The head's suppression (copy_suppression's score on one text) with its z as run, and with z recomputed as the
    attention-weighted OV values of the attended tokens' effective embeddings."""
    names = write_names(model, layer) + [hook_name("pattern", layer)]
    _, cache = run_with_cache(model, tokens, names)
    x = successor.effective_embeddings(model, tokens[0])
    values = successor.ov_source(model, layer, x)  # [head, pos, d_head]
    pattern = cache[hook_name("pattern", layer)][0].float()  # [head, dest, src]
    rule = {n: cache[n] for n in names}
    z = cache[hook_name("z", layer)].clone()
    z[0, :, head] = (pattern[head] @ values[head]).to(z.dtype)
    rule[hook_name("z", layer)] = z
    _, final = run_with_cache(model, tokens, ["ln_final.hook_scale"])
    skip = len(model.bos_ids)
    W_U = model.bridge.unembed.W_U.detach().float()
    directions = copy_suppression.context_directions(W_U, tokens[0].cpu(), skip)
    readout = directions * norm_gain(model, "ln_final").float() / final["ln_final.hook_scale"][0].float()

    def suppression(source):
        return float(-(head_writes(model, source, layer)[0, :, head].float() * readout).sum(-1)[skip + 1:].mean())

    actual, predicted = suppression(cache), suppression(rule)
    return {"actual": actual, "ov_rule": predicted, "share": predicted / actual if actual else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--quick", action="store_true", help="the probes' quick profiles, fewer held-out prompts")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="heads ablated per set")
    parser.add_argument("--per-task", type=int, default=12, help="held-out prompts per ICL task")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = headlab.load_model(args.model)
    n_heads = model.n_layers * model.n_heads
    ks = args.k or ([max(2, n_heads // 27), max(4, n_heads // 9)])
    started = time.time()
    summary: dict = {"model": args.model, "n_heads": n_heads, "quick": args.quick}

    fv = function_vector.scan(model, quick=args.quick, progress=False)
    induction = detectors.scan(model, quick=args.quick, progress=False)
    per_task = 4 if args.quick else args.per_task
    prompts = [p for task in fv.meta["params"]["tasks"]
               for p in function_vector.icl_prompts(task, per_task, n_shots=5, seed=1, split="heldout")]
    summary["fv_top"] = fv.top(5)[["name", "score"]].values.tolist()
    summary["fv_tasks"] = fv.meta["tasks"]
    summary["ablation"] = [ablation_study(model, fv, induction, k, prompts, args.seeds) for k in ks]
    summary["heldout_prompts"] = len(prompts)

    succ = successor.scan(model, progress=False)
    frame = succ.frame
    summary["successor"] = {"top": frame.sort_values("score", ascending=False).head(5)[["name", "score", "shuffled"]]
                            .values.tolist(), "max_shuffled": float(frame["shuffled"].max()),
                            "above_half": int((frame["score"] > 0.5).sum()), "pairs": succ.meta["pairs"]}

    cs = copy_suppression.scan(model, quick=args.quick, progress=False)
    best = cs.frame.sort_values("score", ascending=False).iloc[0]
    rows = copy_suppression.PROBE.token_rows(model, cs_params := copy_suppression.PROBE.params(args.quick))
    shares = [ov_rule_share(model, row, int(best["layer"]), int(best["head"])) for row in rows[:cs_params.n_texts]]
    summary["copy_suppression"] = {
        "head": best["name"], "score": float(best["score"]), "ov_negative_copying": float(best["ov_negative_copying"]),
        "ov_rank": int((cs.frame["ov_negative_copying"] > best["ov_negative_copying"]).sum()) + 1,
        "actual": sum(s["actual"] for s in shares) / len(shares),
        "ov_rule": sum(s["ov_rule"] for s in shares) / len(shares),
        "top5": cs.frame.sort_values("score", ascending=False).head(5)[["name", "score", "ov_negative_copying"]]
        .values.tolist()}
    summary["copy_suppression"]["share"] = summary["copy_suppression"]["ov_rule"] / summary["copy_suppression"]["actual"]
    summary["seconds"] = round(time.time() - started, 1)
    atomic_write_text(args.out, json.dumps(summary, indent=1, default=float) + "\n")
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
