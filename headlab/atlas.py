"""The cross-model head atlas of a sweep: for each probe, where its top heads sit by relative depth (layer / n_layers),
how many heads each model has above the probe's threshold, how the probes' scores agree within each model, the
top heads per role per model and how the roles overlap (how many retrieval heads are also induction heads).
`atlas.csv` (one row per model, probe and head), `roles.csv` (the overlaps) and a self-contained `atlas.html`.

    write_atlas("sweep", {"smollm2-135m": (summary, results), "gemma3-270m": (summary, results)})
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from headlab.errors import InputError
from headlab.files import atomic_write_text
from headlab.probes import probes as registry
from headlab.scores import HeadScores, head_roles
from headlab.stats import spearman

TOP_FRACTION = 0.05  # the top heads of a probe: this share of a model's heads (at least 3)


def atlas_frame(scans: dict[str, tuple[dict, dict[str, HeadScores]]]) -> pd.DataFrame:
    """One row per (model, probe, head): layer, head, name, relative_depth (layer / n_layers), score, rank (1: the
    head with the highest score), top (within the model's top heads of the probe), above (over the probe's
    threshold)."""
    known = registry()
    rows = []
    for model, (summary, results) in scans.items():
        n_layers = summary["geometry"]["n_layers"]
        for probe, scores in results.items():
            frame = scores.frame
            threshold = known[probe].threshold(scores) if probe in known else None
            ranks = frame["score"].rank(ascending=False, method="first").astype(int)
            k = max(3, round(TOP_FRACTION * len(frame)))
            for (_, row), rank in zip(frame.iterrows(), ranks):
                rows.append({"model": model, "probe": probe, "layer": int(row["layer"]), "head": int(row["head"]),
                             "name": row["name"], "relative_depth": row["layer"] / n_layers, "score": row["score"],
                             "rank": int(rank), "top": bool(rank <= k),
                             "above": bool(threshold is not None and row["score"] > threshold),
                             "threshold": threshold})
    if not rows:
        raise InputError("the sweep has no finished scan to draw an atlas from")
    return pd.DataFrame(rows)


def depth_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per probe and model: the mean and range of the relative depth of its top heads."""
    top = frame[frame["top"]]
    return (top.groupby(["probe", "model"])["relative_depth"].agg(["mean", "min", "max", "count"])
            .rename(columns={"mean": "mean_depth", "min": "shallowest", "max": "deepest", "count": "top_heads"})
            .reset_index())


def count_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per probe and model: heads above the probe's threshold, of how many, and the threshold."""
    grouped = frame.groupby(["probe", "model"])
    return pd.DataFrame({"above_threshold": grouped["above"].sum(), "heads": grouped["above"].size(),
                         "threshold": grouped["threshold"].first()}).reset_index()


def agreement_tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per model: Spearman correlation of every pair of probes' scores over its heads (which methods agree on
    which heads)."""
    out = {}
    for model, part in frame.groupby("model", sort=False):
        wide = part.pivot_table(index="name", columns="probe", values="score")
        probes = list(wide.columns)
        matrix = pd.DataFrame(np.eye(len(probes)), index=probes, columns=probes)
        for i, a in enumerate(probes):
            for b in probes[i + 1:]:
                both = wide[[a, b]].dropna()
                value = spearman(both[a], both[b]) if len(both) > 2 else np.nan
                matrix.loc[a, b] = matrix.loc[b, a] = value
        out[model] = matrix
    return out


def top_table(frame: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """Per model and probe: its k best heads with their scores."""
    rows = []
    for (model, probe), part in frame.groupby(["model", "probe"], sort=False):
        best = part.nsmallest(k, "rank")
        rows.append({"model": model, "probe": probe,
                     "top heads": ", ".join(f"{r['name']} ({r['score']:.3g})" for _, r in best.iterrows())})
    return pd.DataFrame(rows)


def role_overlap_table(scans: dict[str, tuple[dict, dict[str, HeadScores]]]) -> pd.DataFrame:
    """Per model and ordered pair of roles present in it (headlab.scores.head_roles): heads with `role`, heads with
    `also`, heads with both, and `share` = both / heads with `role` (how many retrieval heads are also induction
    heads); the pair of a role with itself gives its count."""
    rows = []
    for model, (_, results) in scans.items():
        sets = {}
        for roles, layer, head in zip(*(head_roles(results)[c] for c in ("roles", "layer", "head"))):
            for role in roles.split():
                sets.setdefault(role, set()).add((layer, head))
        for role, heads in sets.items():
            for also, others in sets.items():
                both = len(heads & others)
                rows.append({"model": model, "role": role, "also": also, "heads": len(heads),
                             "also_heads": len(others), "both": both, "share": both / len(heads)})
    return pd.DataFrame(rows, columns=["model", "role", "also", "heads", "also_heads", "both", "share"])


def render_atlas_html(frame: pd.DataFrame, failed: dict[str, str] | None = None,
                      overlaps: pd.DataFrame | None = None) -> str:
    """A self-contained page (plotly embedded): a depth strip per probe, the tables, an agreement heatmap per model."""
    import plotly.graph_objects as go

    figures = []
    strip = go.Figure()
    for model, part in frame[frame["top"]].groupby("model", sort=False):
        strip.add_trace(go.Scatter(x=part["relative_depth"], y=part["probe"], mode="markers", name=model,
                                   text=part["name"], marker={"size": 9, "opacity": 0.7},
                                   hovertemplate="%{text}: depth %{x:.2f}<extra>" + html.escape(model) + "</extra>"))
    strip.update_layout(title="Where each probe's top heads sit (layer / n_layers)", xaxis_title="relative depth",
                        xaxis_range=[-0.02, 1.02], height=120 + 45 * frame["probe"].nunique())
    figures.append(strip.to_html(include_plotlyjs=True, full_html=False, div_id="atlas-depth"))
    for i, (model, matrix) in enumerate(agreement_tables(frame).items()):
        heat = go.Figure(go.Heatmap(z=matrix.to_numpy(), x=list(matrix.columns), y=list(matrix.index), zmin=-1, zmax=1,
                                    colorscale="RdBu", hovertemplate="%{y} vs %{x}: %{z:.2f}<extra></extra>"))
        heat.update_layout(title=f"Spearman agreement of the probes' scores — {model}", height=420, width=560)
        figures.append(heat.to_html(include_plotlyjs=False, full_html=False, div_id=f"atlas-agreement-{i}"))
    tables = [("Top heads' depth", depth_table(frame)), ("Heads above each probe's threshold", count_table(frame)),
              ("Top heads per role", top_table(frame))]
    if overlaps is not None and len(overlaps):
        tables.append(("How the roles overlap (share: of the heads with the role, those that also have the other)",
                       overlaps[overlaps["role"] != overlaps["also"]]))
    body = "".join(f"<h2>{html.escape(title)}</h2>" + table.to_html(index=False, float_format="{:.3f}".format,
                                                                    classes="atlas-table")
                   for title, table in tables)
    failures = "".join(f"<li><b>{html.escape(m)}</b>: {html.escape(e)}</li>" for m, e in (failed or {}).items())
    failures = f"<h2>Models that failed</h2><ul class='failed'>{failures}</ul>" if failures else ""
    models = ", ".join(html.escape(m) for m in frame["model"].unique())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>headlab atlas — {models}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
</style></head><body>
<h1>headlab atlas: {models}</h1>
<p>Top heads: the best {TOP_FRACTION:.0%} of a model's heads (at least 3) by each probe's score. Thresholds come from
the probes' descriptors.</p>
{failures}
{''.join(figures)}
{body}
</body></html>
"""


def write_atlas(out: str | Path, scans: dict[str, tuple[dict, dict[str, HeadScores]]],
                failed: dict[str, str] | None = None) -> Path:
    """atlas.csv, roles.csv and atlas.html in `out` (written next to the scan folders, each file atomically)."""
    out = Path(out)
    frame = atlas_frame(scans)
    overlaps = role_overlap_table(scans)
    atomic_write_text(out / "atlas.csv", frame.to_csv(index=False))
    atomic_write_text(out / "roles.csv", overlaps.to_csv(index=False))
    atomic_write_text(out / "atlas.html", render_atlas_html(frame, failed, overlaps))
    atomic_write_text(out / "sweep.json", json.dumps({"models": list(scans), "failed": failed or {}}, indent=2))
    return out

