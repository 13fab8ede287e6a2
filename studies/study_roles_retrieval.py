"""Query-focused retrieval heads as a re-ranker, and how well weight-only scores predict data-driven ones.

    python studies/study_roles_retrieval.py smollm2-135m gemma3-270m --out roles_study.json

For each model: the query_retrieval probe (heads chosen on one half of the pydoc passages, the re-ranker evaluated on
the other half: top heads vs random heads vs all heads), the detectors (induction, previous-token, duplicate-token)
and weight_scores; then the Spearman correlation of each weight-only score with the data-driven scores.
"""

from __future__ import annotations

import argparse
import json

import headlab
from headlab.probes import detectors, query_retrieval, weight_scores
from headlab.stats import spearman

PAIRS = [("weight_scores", "score", "detectors", "induction"), ("weight_scores", "score", "detectors",
                                                                  "duplicate_token"),
         ("weight_scores", "score", "query_retrieval", "score"),
         ("weight_scores", "previous_token", "detectors", "previous_token"),
         ("weight_scores", "previous_token", "detectors", "induction")]


def study(name: str, groups: int) -> dict:
    model = headlab.load_model(name)
    tables = {"query_retrieval": query_retrieval.scan(model, groups=groups, progress=False),
              "detectors": detectors.scan(model, quick=True, progress=False),
              "weight_scores": weight_scores.scan(model, quick=True, progress=False)}
    correlations = {f"{a}.{ca} ~ {b}.{cb}": spearman(tables[a].frame[ca], tables[b].frame[cb]) for a, ca, b, cb in PAIRS}
    reranker = tables["query_retrieval"].meta["reranker"]
    return {"model": name, "reranker": {k: v for k, v in reranker.items() if k != "random"} | {
        "random_mean_accuracy": reranker["random"]["mean_accuracy"], "random_mean_mrr": reranker["random"]["mean_mrr"],
        "random_min_accuracy": min(reranker["random"]["accuracy"]),
        "random_max_accuracy": max(reranker["random"]["accuracy"])},
        "n_select": tables["query_retrieval"].meta["n_select"], "spearman": correlations,
        "roles": {t: sum(int((table.frame[line["column"]] > line["threshold"]).sum()) for line in
                         table.meta["roles"].values()) for t, table in tables.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--groups", type=int, default=3, help="prompts of 10 passages per half")
    parser.add_argument("--out", default="roles_study.json")
    args = parser.parse_args()
    results = [study(name, args.groups) for name in args.models]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
