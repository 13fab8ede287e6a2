"""The head report: heads.csv (one row per head, one column per probe score), scan.json and a
self-contained report.html (plotly embedded, works offline). Faces layer: reads HeadScores, runs nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd

from headlab.errors import InputError
from headlab.files import atomic_folder, atomic_write_text
from headlab.scores import HeadScores, head_roles


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
    """One row per (layer, head): `layer, head, name`, then `<probe>` (its score) and `<probe>_<column>`, then
    `roles` (headlab.scores.head_roles: every role whose column clears the line its probe declares)."""
    table = None
    for probe, scores in results.items():
        frame = scores.frame
        columns = {"score": probe}
        for column in frame.columns:
            if (column not in ("layer", "head", "name", "score") and not column.endswith(INTERVAL)
                    and pd.api.types.is_numeric_dtype(frame[column])):
                if not frame[column].equals(frame["score"]):
                    columns[column] = f"{probe}_{column}"
        for column in list(columns):  # each column's interval beside it: score_lo -> <probe>_lo
            for suffix in INTERVAL:
                if column + suffix in frame.columns:
                    columns[column + suffix] = columns[column] + suffix
        columns = {c: columns[c] for c in frame.columns if c in columns}  # the probe's own column order
        part = frame[["layer", "head", "name", *columns]].rename(columns=columns)
        table = part if table is None else table.merge(part, on=["layer", "head", "name"], how="outer")
    if table is None:
        raise InputError("no probe results to report")
    table = table.merge(head_roles(results), on=["layer", "head"], how="left")
    return table.sort_values(["layer", "head"]).reset_index(drop=True)


INTERVAL = ("_lo", "_hi")  # suffixes of a column's confidence interval (headlab.uncertainty)


def score_columns(table: pd.DataFrame) -> list[str]:
    """The columns of heads.csv that hold scores: not layer/head/name, not an interval bound, not constant."""
    return [c for c in table.columns if c not in ("layer", "head", "name") and not c.endswith(INTERVAL)
            and pd.api.types.is_numeric_dtype(table[c]) and table[c].nunique(dropna=True) > 1]


EXAMPLES = "attention.json"  # every head's attention on short example prompts (headlab.viewer.head_examples)
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
                kv_table: pd.DataFrame | None = None, examples: list | None = None,
                plotly_src: str | None = None) -> str:
    """A self-contained HTML report (headlab.report_html): what was run and whether to trust it, head roles, a section
    per probe, the head atlas and a page per head (and the KV-cache policies `headlab kv` wrote into the folder)."""
    from headlab.report_html import render_html as page

    return page(summary, results, kv_html=kv_section(kv_table), examples=examples, plotly_src=plotly_src,
                top_k=top_k)


PLOTLY_FILE = "plotly-{version}.min.js"


def shared_plotly(out: Path) -> str:
    """Write plotly.js once beside the scan folder (shared by every report in that parent folder) and return the
    relative path report.html loads it from."""
    import plotly
    import plotly.offline

    name = PLOTLY_FILE.format(version=plotly.__version__)
    target = out.resolve().parent / name
    if not target.exists():
        atomic_write_text(target, plotly.offline.get_plotlyjs())
    return f"../{name}"


def write_report(out: str | Path, summary: dict, results: dict[str, HeadScores], *, examples: list | None = None,
                 plotly: str = "inline") -> Path:
    """Write heads.csv, scan.json, report.html, attention.json (the head pages' example prompts: `examples`, else
    the folder's own) and each probe's table into `out`, all or nothing: everything goes to a sibling temporary
    folder that then replaces `out`. plotly: "inline" (the page works alone) or "shared" (one plotly.js file beside
    the scan folders, loaded by each report)."""
    out = Path(out)
    if plotly not in ("inline", "shared"):
        raise InputError(f"plotly must be 'inline' or 'shared', got {plotly!r}")
    kv_table = pd.read_csv(out / "kv" / "kv.csv") if (out / "kv" / "kv.csv").exists() else None
    if examples is None and (out / EXAMPLES).exists():
        examples = json.loads((out / EXAMPLES).read_text())
    source = shared_plotly(out) if plotly == "shared" else None
    with atomic_folder(out) as staging:
        for name in KEPT:
            if (out / name).is_dir():
                shutil.copytree(out / name, staging / name)
        atomic_write_text(staging / "heads.csv", heads_table(results).to_csv(index=False))
        atomic_write_text(staging / "scan.json", json.dumps(summary, indent=2, default=str))
        if examples:
            atomic_write_text(staging / EXAMPLES, json.dumps(examples, separators=(",", ":")))
        atomic_write_text(staging / "report.html", render_html(summary, results, kv_table=kv_table,
                                                               examples=examples, plotly_src=source))
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
