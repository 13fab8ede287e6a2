"""Two scans side by side (`headlab diff`): per score column, rank agreement over shared heads and the heads that
moved most. Faces layer: reads finished scan folders."""

from __future__ import annotations

import numpy as np

from headlab.errors import InputError
from headlab.report import heads_table, score_columns
from headlab.stats import ranks, spearman


def compare_scans(first: tuple[dict, dict], second: tuple[dict, dict], top: int = 5) -> list[dict]:
    """[{column, spearman, n, top_shared, moved: [{name, rank_a, rank_b}]}] for every score column both scans have,
    over the heads (by name) finite in both; ranks are 1 = highest score."""
    a, b = heads_table(first[1]), heads_table(second[1])
    columns = [c for c in score_columns(a) if c in set(score_columns(b))]
    if not columns:
        raise InputError(f"the two scans share no score column ({', '.join(first[0]['probes'])} against "
                         f"{', '.join(second[0]['probes'])})")
    joined = a.merge(b, on="name", suffixes=("_a", "_b"))
    rows = []
    for column in columns:
        both = joined[["name", f"{column}_a", f"{column}_b"]].dropna()
        if len(both) < 2:
            continue
        x, y = both[f"{column}_a"].to_numpy(), both[f"{column}_b"].to_numpy()
        rank_a, rank_b = len(x) + 1 - ranks(x), len(y) + 1 - ranks(y)  # 1 = highest
        moved = np.argsort(-np.abs(rank_a - rank_b), kind="stable")[:top]
        names = both["name"].to_numpy()
        top_a = set(names[np.argsort(-x, kind="stable")[:top]])
        top_b = set(names[np.argsort(-y, kind="stable")[:top]])
        rows.append({"column": column, "spearman": spearman(x, y), "n": len(both),
                     "top_shared": len(top_a & top_b),
                     "moved": [{"name": str(names[i]), "rank_a": float(rank_a[i]), "rank_b": float(rank_b[i])}
                               for i in moved]})
    if not rows:
        raise InputError("the two scans share fewer than two heads with finite scores")
    return rows
