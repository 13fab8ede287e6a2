"""The head report: heads.csv (one row per head, one column per probe score), scan.json and a
self-contained report.html (plotly embedded, works offline). Faces layer: reads HeadScores, runs nothing.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import pandas as pd

from headlab.errors import InputError
from headlab.files import atomic_write_text
from headlab.scores import HeadScores

MEANINGS = {
    "detectors": "induction score: attention from the second copy of a token to the token after its first copy",
    "detectors_previous_token": "attention on the previous position",
    "detectors_duplicate_token": "attention on earlier copies of the same token",
    "retrieval": "retrieval score (Wu et al.): how often the head's top-1 key is the needle token being copied "
                 "while the model answers a needle-in-a-haystack question",
    "sinks": "attention on non-initial sinks (Yu et al.): mean attention per query on keys, other than the first, "
             "that receive more than alpha on average",
    "sinks_first_mass": "mean attention per query on the first token",
    "qk": "QK-score accuracy (Tulchinskii et al.): how often the head's query-key product from the last token picks "
          "the right option's line end in multiple-choice questions (validation split)",
    "flow": "agreement (Pearson) of the head's attention from the last position with the attention flow "
            "(Abnar & Zuidema) of the whole model",
    "patching": "activation patching (IOI): the share of the clean - corrupted logit difference restored by "
                "patching the head's clean output (z, all positions) into the corrupted run",
    "patching_noising": "the share lost when the head's corrupted output is patched into the clean run",
    "patching_attribution": "attribution patching's first-order estimate of the patching score",
    "patching_dla": "direct logit attribution: the head's direct contribution to the logit difference "
                    "(final norm scale from the run)",
    "vision": "vision-aware head divergence (He et al.): mean distance between the head's output with and without "
              "the context span (the image, or the NIAH document for a text model) over the generated tokens",
    "vision_text_norm": "mean norm of the head's output without the context span",
    "vision_span_attention": "mean attention mass on the context span from the generating queries",
}


def heads_table(results: dict[str, HeadScores]) -> pd.DataFrame:
    """One row per (layer, head): `layer, head, name`, then `<probe>` (its score) and `<probe>_<column>`."""
    table = None
    for probe, scores in results.items():
        frame = scores.frame
        columns = {"score": probe}
        for column in frame.columns:
            if column not in ("layer", "head", "name", "score") and pd.api.types.is_numeric_dtype(frame[column]):
                if not frame[column].equals(frame["score"]):
                    columns[column] = f"{probe}_{column}"
        part = frame[["layer", "head", "name", *columns]].rename(columns=columns)
        table = part if table is None else table.merge(part, on=["layer", "head", "name"], how="outer")
    if table is None:
        raise InputError("no probe results to report")
    return table.sort_values(["layer", "head"]).reset_index(drop=True)


def render_html(summary: dict, results: dict[str, HeadScores], top_k: int = 10) -> str:
    """A self-contained HTML report: model card, a heatmap per score, the sortable head atlas, top heads."""
    table = heads_table(results)
    score_columns = [c for c in table.columns
                     if c not in ("layer", "head", "name") and table[c].nunique(dropna=True) > 1]
    figures = []
    for i, column in enumerate(score_columns):
        view = HeadScores(table[["layer", "head", column]].rename(columns={column: "score"}))
        fig = view.figure(title=f"{column} — {summary['model']}")
        figures.append(f'<section><h3>{html.escape(column)}</h3><p class="meaning">'
                       f'{html.escape(MEANINGS.get(column, ""))}</p>'
                       + fig.to_html(include_plotlyjs=(i == 0), full_html=False, div_id=f"heatmap-{i}")
                       + "</section>")
    tops = []
    for column in score_columns:
        top = table.sort_values(column, ascending=False).head(top_k)
        items = "".join(f"<li><code>{r['name']}</code> {r[column]:.3f}</li>" for _, r in top.iterrows())
        tops.append(f"<div class='top'><h4>{html.escape(column)}</h4><ol>{items}</ol></div>")
    card = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.get("geometry", {}).items())
    timings = "".join(f"<tr><th>{html.escape(p)}</th><td>{t:.1f} s</td></tr>"
                      for p, t in summary.get("seconds", {}).items())
    failures = "".join(f"<li><b>{html.escape(p)}</b> failed: {html.escape(e)}</li>"
                       for p, e in summary.get("failed", {}).items())
    failures = f'<h2>Failed probes</h2><ul class="failed">{failures}</ul>' if failures else ""
    atlas = table.to_html(index=False, float_format="{:.4f}".format, table_id="atlas", classes="atlas")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>headlab report — {html.escape(summary['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
table.atlas th {{ cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }}
.tops {{ display: flex; flex-wrap: wrap; gap: 2em; }} .meaning {{ color: #555; }}
</style></head><body>
<h1>headlab report: {html.escape(summary['model'])}</h1>
<h2>Model</h2><table>{card}</table>
<h2>Probes</h2><table>{timings}</table>
<p>headlab {html.escape(summary.get('versions', {}).get('headlab', ''))}, seed {summary.get('seed')}</p>
{failures}
<h2>Top heads</h2><div class="tops">{''.join(tops)}</div>
<h2>Heatmaps</h2>{''.join(figures)}
<h2>Head atlas</h2><p>Click a column header to sort.</p>{atlas}
<script>
document.querySelectorAll("table.atlas th").forEach((th, col) => th.addEventListener("click", () => {{
  const body = th.closest("table").tBodies[0];
  const rows = Array.from(body.rows);
  const down = th.dataset.dir !== "desc"; th.dataset.dir = down ? "desc" : "asc";
  const key = r => {{ const t = r.cells[col].textContent; const x = parseFloat(t); return isNaN(x) ? t : x; }};
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (down ? -1 : 1));
  rows.forEach(r => body.appendChild(r));
}}));
</script>
</body></html>
"""


def write_report(out: str | Path, summary: dict, results: dict[str, HeadScores]) -> Path:
    """Write heads.csv, scan.json, report.html and each probe's table into `out`, all or nothing:
    everything goes to a sibling temporary folder that then replaces `out`."""
    out = Path(out)
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        atomic_write_text(staging / "heads.csv", heads_table(results).to_csv(index=False))
        atomic_write_text(staging / "scan.json", json.dumps(summary, indent=2, default=str))
        atomic_write_text(staging / "report.html", render_html(summary, results))
        for probe, scores in results.items():
            scores.save(staging / "probes" / probe)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_results(out: str | Path) -> tuple[dict, dict[str, HeadScores]]:
    """(summary, results) of a finished scan folder."""
    out = Path(out)
    if not (out / "scan.json").exists():
        raise InputError(f"{out} holds no finished scan (no scan.json); run `headlab scan` first")
    summary = json.loads((out / "scan.json").read_text())
    results = {probe: HeadScores.load(out / "probes" / probe) for probe in summary["probes"]}
    return summary, results
