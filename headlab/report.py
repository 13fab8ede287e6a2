"""The head report: heads.csv (one row per head, one column per probe score), scan.json and a
self-contained report.html (plotly embedded, works offline). Faces layer: reads HeadScores, runs nothing.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pandas as pd

from headlab.errors import InputError
from headlab.files import atomic_folder, atomic_write_text
from headlab.scores import HeadScores


def meaning(results: dict[str, HeadScores], column: str) -> str:
    """What a heads.csv column means, from the descriptor of the probe that wrote it (recorded in its meta):
    `<probe>` is its score, `<probe>_<column>` one of its columns (`score_<length>` patterns match too)."""
    for probe, scores in results.items():
        columns = scores.meta.get("columns", {})
        if column == probe:
            return columns.get("score", "")
        if column.startswith(probe + "_"):
            name = column[len(probe) + 1:]
            if name in columns:
                return columns[name]
            for pattern, text in columns.items():
                if "<" in pattern and re.fullmatch(re.sub(r"<[^>]+>", ".+", re.escape(pattern)), name):
                    return text
    return ""


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


INTERVAL = ("_lo", "_hi")  # suffixes of a column's confidence interval (headlab.uncertainty)


def score_columns(table: pd.DataFrame) -> list[str]:
    """The columns of heads.csv that hold scores: not layer/head/name, not an interval bound, not constant."""
    return [c for c in table.columns if c not in ("layer", "head", "name") and not c.endswith(INTERVAL)
            and pd.api.types.is_numeric_dtype(table[c]) and table[c].nunique(dropna=True) > 1]


KEPT = ("kv",)  # folders other commands write into a scan folder (`headlab kv`), kept when the report is rewritten


def kv_section(kv_table: pd.DataFrame | None) -> str:
    """The KV-cache policies `headlab kv` evaluated on this scan's scores: their Pareto figure and table."""
    if kv_table is None:
        return ""
    from headlab.kv.evaluate import pareto_figure

    figure = pareto_figure(kv_table).to_html(include_plotlyjs=False, full_html=False, div_id="kv-pareto")
    columns = [c for c in ("policy", "length", "accuracy", "n_tests", "kv_fraction", "kv_fraction_measured",
                           "decode_ms_per_token") if c in kv_table.columns]
    table = kv_table[columns].to_html(index=False, float_format="{:.3f}".format, classes="kv")
    return ("<h2>KV-cache policies (headlab kv)</h2><p>NIAH accuracy on held-out needles against the share of the "
            "KV cache each policy keeps.</p>" + figure + table)


def render_html(summary: dict, results: dict[str, HeadScores], top_k: int = 10,
                kv_table: pd.DataFrame | None = None) -> str:
    """A self-contained HTML report: model card, a heatmap per score, the sortable head atlas, top heads (and the
    KV-cache policies evaluated on these scores, when `headlab kv` wrote them into the scan folder)."""
    table = heads_table(results)
    score_columns = [c for c in table.columns
                     if c not in ("layer", "head", "name") and table[c].nunique(dropna=True) > 1]
    figures = []
    for i, column in enumerate(score_columns):
        view = HeadScores(table[["layer", "head", column]].rename(columns={column: "score"}))
        fig = view.figure(title=f"{column} — {summary['model']}")
        figures.append(f'<section><h3>{html.escape(column)}</h3><p class="meaning">'
                       f'{html.escape(meaning(results, column))}</p>'
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
    params = "".join(f"<details><summary>{html.escape(probe)}</summary><pre>"
                     f"{html.escape(json.dumps(values, indent=1, default=str)[:20000])}</pre></details>"
                     for probe, values in summary.get("params", {}).items())
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
<h3>Parameters (re-run with <code>headlab scan --config &lt;this folder&gt;/scan.json</code>)</h3>{params}
<p>headlab {html.escape(summary.get('versions', {}).get('headlab', ''))}, seed {summary.get('seed')}</p>
{failures}
<h2>Top heads</h2><div class="tops">{''.join(tops)}</div>
<h2>Heatmaps</h2>{''.join(figures)}
<h2>Head atlas</h2><p>Click a column header to sort.</p>{atlas}
{kv_section(kv_table)}
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
    kv_table = pd.read_csv(out / "kv" / "kv.csv") if (out / "kv" / "kv.csv").exists() else None
    with atomic_folder(out) as staging:
        for name in KEPT:
            if (out / name).is_dir():
                shutil.copytree(out / name, staging / name)
        atomic_write_text(staging / "heads.csv", heads_table(results).to_csv(index=False))
        atomic_write_text(staging / "scan.json", json.dumps(summary, indent=2, default=str))
        atomic_write_text(staging / "report.html", render_html(summary, results, kv_table=kv_table))
        for probe, scores in results.items():
            scores.save(staging / "probes" / probe)
    return Path(out)


def load_results(out: str | Path) -> tuple[dict, dict[str, HeadScores]]:
    """(summary, results) of a finished scan folder."""
    out = Path(out)
    if not (out / "scan.json").exists():
        raise InputError(f"{out} holds no finished scan (no scan.json); run `headlab scan` first")
    summary = json.loads((out / "scan.json").read_text())
    results = {probe: HeadScores.load(out / "probes" / probe) for probe in summary["probes"]}
    return summary, results
