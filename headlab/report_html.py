"""report.html: what was run and whether to trust it, the heads that matter across probes, one section per probe with
its heatmaps, a head atlas that filters and sorts, and a page for every head (`#L18H6`). One plotly bundle per page,
inline or from a shared local file; everything else is written here (no network)."""

from __future__ import annotations

import html
import json
import math

import pandas as pd

from headlab.heads import head_name
from headlab.scores import HeadScores
from headlab.viewer import VIEWER_CSS, VIEWER_JS

TOP = 5  # a head "tops" a probe when it ranks among its first TOP heads


def column_info(table: pd.DataFrame, results: dict[str, HeadScores], column: str) -> dict:
    """The probe that wrote `column`, its local name in that probe's table, and whether its sign means something
    (the probe's `signed` descriptor, recorded in meta; for tables of an older headlab: values on both sides of 0)."""
    from headlab.report import meaning

    probe = max((p for p in results if column == p or column.startswith(p + "_")), key=len, default="")
    local = "score" if column == probe else column[len(probe) + 1:]
    declared = results[probe].meta.get("signed") if probe else None
    values = table[column].dropna()
    signed = local in declared if declared is not None else bool(len(values) and values.min() < 0 < values.max())
    return {"name": column, "probe": probe, "local": local, "meaning": meaning(results, column), "signed": signed}


def _number(x) -> float | None:
    """Six significant digits, None for NaN or infinity (JSON has neither)."""
    return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None


def page_data(summary: dict, table: pd.DataFrame, results: dict, columns: list[str], examples: list | None) -> dict:
    """What the page's scripts read: every head's scores, ranks and intervals, the model's layout, the examples."""
    geometry = summary.get("geometry", {})
    data = {"model": summary["model"], "n_layers": int(table["layer"].max()) + 1,
            "n_heads": int(table["head"].max()) + 1, "n_kv_heads": geometry.get("n_kv_heads"),
            "layer_types": summary.get("layer_types"), "names": table["name"].tolist(), "columns": [],
            "examples": examples or [], "sinks": {}, "tops": {},
            "roles": table["roles"].fillna("").tolist() if "roles" in table.columns else [], "role_lines": {}}
    for column in columns:
        info = column_info(table, results, column)
        ranks = table[column].rank(ascending=False, method="min")
        info.update(values=[_number(v) for v in table[column]], ranks=[_number(v) for v in ranks],
                    count=int(table[column].notna().sum()))
        for bound in ("lo", "hi"):
            if f"{column}_{bound}" in table.columns:
                info[bound] = [_number(v) for v in table[f"{column}_{bound}"]]
        data["columns"].append(info)
    for probe, scores in results.items():
        if probe in columns:
            data["tops"][probe] = table.sort_values(probe, ascending=False, kind="stable")["name"].head(TOP).tolist()
        for role, line in scores.meta.get("roles", {}).items():  # Probe.role_lines: where each role is cut
            data["role_lines"][role] = {"probe": probe, **line}
        positions = scores.meta.get("sink_positions")
        if positions:
            data["sinks"] = {head: spots[:12] for head, spots in positions.items()}
    return data


def _esc(x) -> str:
    return html.escape(str(x))


def _header(summary: dict) -> str:
    settings = summary.get("settings", {})
    profile = "quick" if settings.get("quick") else "full"
    versions = ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())
    machine = summary.get("machine", {})
    device = machine.get("device", settings.get("device", ""))
    rows = [("command", f"<code>{_esc(summary.get('command') or 'not recorded')}</code>"),
            ("profile", f"<b class='badge {profile}'>{profile}</b> "
                        + ("(each probe's quick profile: fewer, shorter prompts)" if profile == "quick" else "")),
            ("date", _esc(summary.get("date", "not recorded"))), ("seed", _esc(summary.get("seed"))),
            ("device", _esc(f"{device}; {machine.get('platform', '')}; {machine.get('torch_threads', '?')} torch "
                            f"threads" if machine else device)),
            ("versions", _esc(versions)), ("time", f"{summary.get('total_seconds', 0):.0f} s in all")]
    runs = summary.get("runs", [])
    if len(runs) > 1:
        rows.append(("runs", "<br>".join(f"{_esc(r.get('date'))}: <code>{_esc(r.get('command'))}</code> "
                                         f"({_esc(', '.join(r.get('probes', [])))})" for r in runs)))
    adapted = [f"<code>{_esc(p)}.{_esc(k)}</code>: {_esc(json.dumps(a))} &rarr; {_esc(json.dumps(b))}"
               for p, changed in summary.get("adapted", {}).items() for k, (a, b) in changed.items()]
    if adapted:
        rows.append(("fitted", "parameters fitted to the model and --max-context "
                               f"{_esc(settings.get('max_context'))}: " + "; ".join(adapted)))
    geometry = ", ".join(f"{k} {v}" for k, v in summary.get("geometry", {}).items())
    rows.append(("model", _esc(geometry)))
    return "<table class='run'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _validity(summary: dict, results: dict) -> tuple[str, str]:
    """(the validity table, the warnings box for the top of the page)."""
    rows, warnings = [], []
    for probe, scores in results.items():
        meta = scores.meta
        check = meta.get("validity") or {}
        interval = meta.get("uncertainty")
        method = (f"{interval['level']:.0%} {interval['method']}, {interval['resamples']} resamples over "
                  f"{interval['n']} {interval['samples']}" if interval else "no interval recorded")
        warning = check.get("warning")
        if warning:
            warnings.append(f"<li><a href='#probe-{_esc(probe)}'>{_esc(probe)}</a>: {_esc(warning)}</li>")
        rows.append(f"<tr><th><a href='#probe-{_esc(probe)}'>{_esc(probe)}</a></th>"
                    f"<td>{_esc(check.get('rests_on', ''))}</td><td>{_esc(check.get('baseline', ''))}</td>"
                    f"<td>{_esc(method)}</td><td class='warn'>{_esc(warning or '')}</td></tr>")
    table = ("<table class='validity'><tr><th>probe</th><th>rests on</th><th>baseline</th><th>interval</th>"
             "<th>warning</th></tr>" + "".join(rows) + "</table>")
    box = f"<div class='warning-box'><b>Read with care</b><ul>{''.join(warnings)}</ul></div>" if warnings else ""
    return table, box


def _roles(table: pd.DataFrame, results: dict) -> str:
    """Heads at the top of several probes, and how much the probes' rankings agree."""
    from headlab.stats import spearman

    probes = [p for p in results if p in table.columns and table[p].nunique(dropna=True) > 1]
    tops: dict[str, list] = {}
    for probe in probes:
        ranked = table.sort_values(probe, ascending=False, kind="stable")["name"].head(TOP).tolist()
        for rank, name in enumerate(ranked, 1):
            tops.setdefault(name, []).append((probe, rank))
    shared = sorted(((n, t) for n, t in tops.items() if len(t) > 1), key=lambda x: (-len(x[1]), x[0]))
    items = "".join(f"<li><a href='#{n}'>{n}</a>: " + ", ".join(f"{_esc(p)} #{r}" for p, r in t) + "</li>"
                    for n, t in shared) or f"<li>no head is in the top {TOP} of two probes</li>"
    cells = []
    for a in probes:
        row = []
        for b in probes:
            both = table[[a, b]].dropna() if a != b else table[[a]].dropna()
            rho = 1.0 if a == b else spearman(both[a], both[b]) if len(both) > 2 else float("nan")
            shade = f"background: rgba({'38,79,143' if rho >= 0 else '214,39,40'}, {min(abs(rho), 1) * 0.6:.2f})" \
                if not math.isnan(rho) else ""
            row.append(f"<td style='{shade}'>{rho:.2f}</td>")
        cells.append(f"<tr><th>{_esc(a)}</th>{''.join(row)}</tr>")
    agreement = ("<table class='agreement'><tr><th></th>" + "".join(f"<th>{_esc(p)}</th>" for p in probes) + "</tr>"
                 + "".join(cells) + "</table>") if len(probes) > 1 else ""
    declared = _declared_roles(table, results)
    return (f"<h3>Heads in the top {TOP} of several probes</h3><ul class='roles'>{items}</ul>" + declared
            + (f"<h3>Agreement between probes</h3><p class='meaning'>Spearman rank correlation of the probes' scores "
               f"over all heads.</p>{agreement}" if agreement else ""))


def _declared_roles(table: pd.DataFrame, results: dict) -> str:
    """Each role a probe declares (its line recorded in meta["roles"]) and the heads whose score clears it."""
    items = []
    for probe, scores in results.items():
        for role, line in scores.meta.get("roles", {}).items():
            heads = [n for n, roles in zip(table["name"], table["roles"].fillna("")) if role in roles.split()]
            shown = ", ".join(f"<a href='#{n}'>{n}</a>" for n in heads[:20]) + (" ..." if len(heads) > 20 else "")
            items.append(f"<li title='{_esc(line['why'])}'><b>{_esc(role)}</b> ({_esc(probe)} {_esc(line['column'])} "
                         f"&gt; {line['threshold']:.3g}): {len(heads)} heads{': ' + shown if heads else ''}</li>")
    return f"<h3>Roles (each probe's stated line)</h3><ul class='roles'>{''.join(items)}</ul>" if items else ""


def _figure(table: pd.DataFrame, info: dict, index: int, n_layers: int, n_heads: int) -> str:
    view = HeadScores(table[["layer", "head", info["name"]]].rename(columns={info["name"]: "score"}))
    fig = view.figure(title=info["name"], signed=info["signed"])
    fig.update_layout(width=max(300, 24 * n_heads + 150), height=max(220, 13 * n_layers + 110),
                      margin={"l": 50, "r": 10, "t": 40, "b": 40}, title_font_size=13)
    return (f"<div class='figure'>" + fig.to_html(include_plotlyjs=False, full_html=False, div_id=f"heatmap-{index}",
                                                  config={"displaylogo": False, "responsive": True})
            + "</div>")


def _top_list(table: pd.DataFrame, column: str, k: int) -> str:
    ranked = table.sort_values(column, ascending=False, kind="stable").head(k)
    if ranked[column].nunique(dropna=True) <= 1:
        return (f"<p class='folded'>{_esc(column)}: the top {k} all tie at {ranked[column].iloc[0]:.3f} "
                f"(ranking by it says nothing)</p>")
    lo, hi = f"{column}_lo", f"{column}_hi"
    items = []
    frame = ranked.reset_index(drop=True)
    for i in range(len(frame)):
        name = frame.loc[i, "name"]
        text = f"<a href='#{name}'>{name}</a> {frame.loc[i, column]:.3f}"
        if lo in frame.columns and not pd.isna(frame.loc[i, lo]):
            text += f" <span class='ci'>[{frame.loc[i, lo]:.3f}, {frame.loc[i, hi]:.3f}]</span>"
            if i + 1 < len(frame) and frame.loc[i, lo] <= frame.loc[i + 1, hi]:
                text += " <span class='tie' title='its interval overlaps the next head&#39;s'>&asymp;</span>"
        items.append(f"<li>{text}</li>")
    return f"<div class='top'><h4>{_esc(column)}</h4><ol>{''.join(items)}</ol></div>"


def render_html(summary: dict, results: dict[str, HeadScores], *, kv_html: str = "", examples: list | None = None,
                plotly_src: str | None = None, top_k: int = 10) -> str:
    """The report page (see the module docstring); `plotly_src`: a path to plotly.min.js to load instead of
    embedding it."""
    import plotly.offline

    from headlab.report import heads_table, score_columns

    table = heads_table(results)
    columns = score_columns(table)
    constant = [c for c in table.columns if c not in ("layer", "head", "name", "roles") and not c.endswith(("_lo", "_hi"))
                and c not in columns]
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    data = page_data(summary, table, results, columns, examples)
    infos = {c["name"]: c for c in data["columns"]}
    validity, warnings = _validity(summary, results)
    sections, figure = [], 0
    for probe, scores in results.items():
        own = [c for c in columns if infos[c]["probe"] == probe]
        folded = [c for c in constant if c == probe or c.startswith(probe + "_")]
        figures = []
        for column in own:
            figures.append(_figure(table, infos[column], figure, n_layers, n_heads))
            figure += 1
        tops = "".join(_top_list(table, c, top_k) for c in own)
        check = scores.meta.get("validity") or {}
        warning = f"<div class='warning-box'>{_esc(check['warning'])}</div>" if check.get("warning") else ""
        params = json.dumps(summary.get("params", {}).get(probe, scores.meta.get("params", {})), indent=1,
                            default=str)[:20000]
        meanings = "".join(f"<li><b>{_esc(c)}</b>: {_esc(infos[c]['meaning'])}"
                           + (" <i>(signed: diverging scale centred on 0)</i>" if infos[c]["signed"] else "") + "</li>"
                           for c in own)
        note = (f"<p class='folded'>Constant in every head (not drawn): "
                + ", ".join(f"{_esc(c)} = {table[c].dropna().iloc[0] if table[c].notna().any() else 'NaN'}"
                            for c in folded) + "</p>") if folded else ""
        sections.append(
            f"<section id='probe-{_esc(probe)}'><h2>{_esc(probe)}</h2><p class='meaning'>{_esc(scores.meta.get('paper', ''))}"
            f"</p>{warning}<p><b>Rests on</b> {_esc(check.get('rests_on', '?'))}. <b>Baseline</b>: "
            f"{_esc(check.get('baseline', 'not recorded'))}.</p><ul class='meanings'>{meanings}</ul>{note}"
            f"<div class='tops'>{tops}</div><div class='grid'>{''.join(figures)}</div>"
            f"<details><summary>parameters</summary><pre>{_esc(params)}</pre></details></section>")
    failures = "".join(f"<li><b>{_esc(p)}</b> failed: {_esc(e)}</li>" for p, e in summary.get("failed", {}).items())
    failures = f'<h2 id="failed">Failed probes</h2><ul class="failed">{failures}</ul>' if failures else ""
    toc = "".join(f"<a href='#probe-{_esc(p)}'>{_esc(p)}</a>" for p in results)
    bundle = (f"<script src='{_esc(plotly_src)}'></script>" if plotly_src else
              f"<script>{plotly.offline.get_plotlyjs()}</script>")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    placeholders = "".join(f"<section class='head-page' id='{head_name(l, h)}'></section>"
                           for l in range(n_layers) for h in range(n_heads))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>headlab report — {_esc(summary['model'])}</title>
<style>{CSS}{VIEWER_CSS}</style>{bundle}</head><body>
<nav class="toc"><b>headlab</b> <a href="#run">run</a><a href="#validity">validity</a><a href="#roles">head roles</a>
{toc}<a href="#head-atlas">atlas</a>{"<a href='#kv'>KV policies</a>" if kv_html else ""}</nav>
<main>
<div id="heads">{placeholders}</div>
<h1 id="run">headlab report: {_esc(summary['model'])}</h1>
{warnings}
{_header(summary)}
<h2 id="validity">Validity</h2>{validity}
{failures}
<h2 id="roles">Head roles</h2>{_roles(table, results)}
{''.join(sections)}
<div id="atlas-part"><h2 id="head-atlas">Head atlas</h2>
<p class="meaning">Every head, every score. Filter by name (L18, H6, L18H6), keep the heads above a value of one
column, sort by a column's header; a name opens the head's page. The address keeps a filter:
<code>report.html?filter=L18&amp;column=...&amp;min=0.1#head-atlas</code>.</p>
<div class="atlas-controls"><input id="atlas-filter" placeholder="head name, e.g. L18"> <select id="atlas-column"></select>
&ge; <input id="atlas-min" type="number" step="any" placeholder="min"> <label><input id="atlas-intervals"
type="checkbox"> intervals</label> <span id="atlas-count"></span></div>
<div class="atlas-wrap"><table id="atlas" class="atlas"><thead></thead><tbody></tbody></table></div></div>
{"<div id='kv'>" + kv_html + "</div>" if kv_html else ""}
</main>
<script id="headlab-data" type="application/json">{payload}</script>
<script>{VIEWER_JS}{SCRIPT}</script>
</body></html>
"""


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; }
main { padding: 0 1.5em 3em; max-width: 1800px; }
nav.toc { position: sticky; top: 0; z-index: 5; background: #fafafa; border-bottom: 1px solid #ddd; padding: 6px 1.5em;
  display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav.toc a { color: #264f8f; text-decoration: none; }
h2 { border-bottom: 1px solid #ddd; margin-top: 1.6em; } section { scroll-margin-top: 40px; } h1, h2 { scroll-margin-top: 40px; }
table { border-collapse: collapse; } th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
table.run th, table.validity th { background: #f6f6f6; }
.badge { padding: 1px 8px; border-radius: 8px; color: #fff; } .badge.quick { background: #c77700; } .badge.full { background: #2e7d32; }
.warning-box { border: 1px solid #d33; background: #fdecea; padding: 6px 12px; margin: 8px 0; border-radius: 4px; }
td.warn { color: #b00; } .meaning { color: #555; } .folded { color: #777; font-style: italic; }
.tops { display: flex; flex-wrap: wrap; gap: 0 2em; } .top ol { margin-top: 0; padding-left: 2em; } .ci { color: #777; font-size: 12px; }
.tie { color: #c77700; font-weight: bold; cursor: help; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 6px; }
.atlas-controls { margin: 6px 0; } .atlas-controls input { width: 10em; } .atlas-controls input[type=checkbox] { width: auto; }
.atlas-wrap { max-width: 100%; max-height: 75vh; overflow: auto; border: 1px solid #ddd; }
table.atlas { font-size: 12px; } table.atlas td { text-align: right; white-space: nowrap; }
table.atlas th { position: sticky; top: 0; background: #f4f4f4; cursor: pointer; z-index: 2; max-width: 7em;
  overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-weight: 600; }
table.atlas td:first-child, table.atlas th:first-child { position: sticky; left: 0; background: #fff; z-index: 1; text-align: left; }
table.atlas th:first-child { z-index: 3; background: #f4f4f4; } table.atlas .iv { display: none; color: #777; }
table.atlas.show-iv .iv { display: table-cell; }
.head-page { display: none; } .head-page:target { display: block; border: 2px solid #264f8f; border-radius: 6px;
  padding: 0 1em 1em; margin: 1em 0; background: #fcfdff; }
main.only > :not(.shown) { display: none; }
.head-page table td { text-align: right; white-space: nowrap; }
.head-page table td.m { text-align: left; color: #555; font-size: 12px; white-space: normal; }
canvas.nxn { border: 1px solid #ccc; image-rendering: pixelated; }
"""

SCRIPT = """
const HL = JSON.parse(document.getElementById("headlab-data").textContent);
(function oneView() {  // report.html?view=probe-retrieval (or atlas-part): that part of the page alone
  const part = new URLSearchParams(location.search).get("view"), el = part && document.getElementById(part);
  if (el && el.parentElement.tagName === "MAIN") { el.classList.add("shown"); el.parentElement.classList.add("only"); }
})();
const nameIndex = Object.fromEntries(HL.names.map((n, i) => [n, i]));
function colour(info, x) {
  if (x === null) return "";
  const vals = info.values.filter(v => v !== null);
  if (info.signed) { const m = Math.max(...vals.map(Math.abs)) || 1; const t = Math.min(Math.abs(x) / m, 1);
    return x >= 0 ? `rgba(214,39,40,${(0.7 * t).toFixed(2)})` : `rgba(38,79,143,${(0.7 * t).toFixed(2)})`; }
  const lo = Math.min(...vals), hi = Math.max(...vals); const t = hi > lo ? (x - lo) / (hi - lo) : 0;
  return `rgba(38,120,80,${(0.75 * t).toFixed(2)})`;
}
function fmt(x) { return x === null || x === undefined ? "" : (Math.abs(x) >= 100 ? x.toFixed(1) : x.toFixed(3)); }
// ---- the atlas -------------------------------------------------------------------------------------------------------
const atlas = document.getElementById("atlas"), select = document.getElementById("atlas-column");
HL.columns.forEach((c, i) => { const o = document.createElement("option"); o.value = i; o.textContent = c.name; select.appendChild(o); });
(function buildAtlas() {
  let head = "<tr><th title='head'>head</th><th>layer</th><th>head</th>";
  HL.columns.forEach((c, i) => { head += `<th data-col="${i}" title="${c.name}: ${c.meaning.replace(/"/g, "&quot;")}">${c.name}</th>`;
    if (c.lo) head += `<th class="iv">${c.name} 95%</th>`; });
  atlas.tHead.innerHTML = head + "</tr>";
  const rows = HL.names.map((name, r) => {
    let cells = `<td><a href="#${name}">${name}</a></td><td>${name.match(/L(\\d+)/)[1]}</td><td>${name.match(/H(\\d+)/)[1]}</td>`;
    HL.columns.forEach(c => { const x = c.values[r];
      cells += `<td style="background:${colour(c, x)}">${fmt(x)}</td>`;
      if (c.lo) cells += `<td class="iv">${c.lo[r] === null ? "" : "[" + fmt(c.lo[r]) + ", " + fmt(c.hi[r]) + "]"}</td>`; });
    return `<tr data-row="${r}">${cells}</tr>`; });
  atlas.tBodies[0].innerHTML = rows.join("");
})();
function filterAtlas() {
  const text = document.getElementById("atlas-filter").value.trim().toUpperCase();
  const col = HL.columns[+select.value], min = parseFloat(document.getElementById("atlas-min").value);
  let shown = 0;
  Array.from(atlas.tBodies[0].rows).forEach(tr => { const r = +tr.dataset.row; const name = HL.names[r];
    const ok = (!text || name.includes(text) || new RegExp("^" + text + "(H|$)").test(name)) &&
               (isNaN(min) || (col && col.values[r] !== null && col.values[r] >= min));
    tr.style.display = ok ? "" : "none"; shown += ok; });
  document.getElementById("atlas-count").textContent = `${shown} of ${HL.names.length} heads`;
}
["atlas-filter", "atlas-min"].forEach(id => document.getElementById(id).addEventListener("input", filterAtlas));
select.addEventListener("change", filterAtlas);
(function fromAddress() {  // report.html?filter=L18&column=retrieval&min=0.1#head-atlas: a filtered atlas to share
  const q = new URLSearchParams(location.search);
  if (q.get("filter")) document.getElementById("atlas-filter").value = q.get("filter");
  const c = HL.columns.findIndex(c => c.name === q.get("column")); if (c >= 0) select.value = c;
  if (q.get("min")) document.getElementById("atlas-min").value = q.get("min");
})();
document.getElementById("atlas-intervals").addEventListener("change", e => atlas.classList.toggle("show-iv", e.target.checked));
atlas.tHead.addEventListener("click", e => { const th = e.target.closest("th"); if (!th || th.dataset.col === undefined) return;
  const c = HL.columns[+th.dataset.col]; const down = th.dataset.dir !== "desc"; th.dataset.dir = down ? "desc" : "asc";
  const body = atlas.tBodies[0];
  Array.from(body.rows).sort((a, b) => { const x = c.values[+a.dataset.row], y = c.values[+b.dataset.row];
    if (x === null) return 1; if (y === null) return -1; return (x - y) * (down ? -1 : 1); }).forEach(tr => body.appendChild(tr)); });
filterAtlas();
// ---- heatmap cells open head pages --------------------------------------------------------------------------------
document.querySelectorAll(".js-plotly-plot, div[id^='heatmap-']").forEach(div => {
  if (div.on) div.on("plotly_click", e => { const p = e.points[0]; location.hash = p.text || ("L" + p.y + "H" + p.x); }); });
// ---- head pages -------------------------------------------------------------------------------------------------------
function drawNxN(canvas, rows, n) {
  const cell = Math.max(2, Math.min(10, Math.floor(320 / n))); canvas.width = canvas.height = cell * n;
  const g = canvas.getContext("2d"); g.fillStyle = "#fff"; g.fillRect(0, 0, canvas.width, canvas.height);
  rows.forEach((row, q) => row.forEach((v, k) => { if (v) { g.fillStyle = `rgba(214,39,40,${(v / 255).toFixed(3)})`;
    g.fillRect(k * cell, q * cell, cell, cell); } }));
}
function headPage(name) {
  const section = document.getElementById(name); const r = nameIndex[name];
  if (!section || r === undefined || section.dataset.done) return;
  const [layer, head] = name.match(/\\d+/g).map(Number);
  const group = HL.n_kv_heads ? HL.n_heads / HL.n_kv_heads : 1, kv = Math.floor(head / group);
  const siblings = Array.from({length: group}, (_, i) => `L${layer}H${kv * group + i}`).filter(n => n !== name)
    .map(n => `<a href="#${n}">${n}</a>`).join(", ");
  const type = HL.layer_types ? HL.layer_types[layer] : "not recorded";
  const tops = Object.entries(HL.tops).filter(([p, t]) => t.includes(name)).map(([p, t]) => `top ${t.indexOf(name) + 1} of ${p}`);
  const roles = (HL.roles[r] || "").split(" ").filter(Boolean).map(role => { const l = HL.role_lines[role];
    return l ? `<span class="role" title="${l.why.replace(/"/g, "&quot;")}">${role}</span> (${l.probe} ${l.column} &gt; ${fmt(l.threshold)})` : role; });
  let rows = "";
  HL.columns.forEach(c => { const x = c.values[r]; if (x === null) return;
    rows += `<tr><th><a href="#probe-${c.probe}">${c.name}</a></th><td>${fmt(x)}</td><td>${c.ranks[r]} / ${c.count}</td>` +
      `<td>${c.lo && c.lo[r] !== null ? "[" + fmt(c.lo[r]) + ", " + fmt(c.hi[r]) + "]" : ""}</td><td class="m">${c.meaning}</td></tr>`; });
  const sinks = (HL.sinks[name] || []).map(s => `text ${s[0]}, position ${s[1]} ${JSON.stringify(s[2])}`).join("; ");
  section.innerHTML = `<h2>Head ${name}</h2><p>layer ${layer} of ${HL.n_layers}, head ${head} of ${HL.n_heads}; ` +
    `GQA group: KV head ${kv}${siblings ? " (shared with " + siblings + ")" : ""}; layer type: ${type}</p>` +
    `<p><b>Roles</b>: ${roles.length ? roles.join(", ") : "none: no score clears its probe's line"}</p>` +
    `<p><b>Top lists</b>: ${tops.length ? tops.join(", ") : "in no probe's top " + 5}</p>` +
    `<table><tr><th>score</th><th>value</th><th>rank</th><th>95% interval</th><th>meaning</th></tr>${rows}</table>` +
    (sinks ? `<p><b>Sink positions</b> (from the kernel's column sums, sinks probe): ${sinks}</p>` : "") +
    `<div class="examples"></div><p><a href="#head-atlas">back to the atlas</a></p>`;
  const box = section.querySelector(".examples");
  HL.examples.forEach(ex => { const div = document.createElement("div");
    div.innerHTML = `<h3>Attention on ${ex.title} (${ex.tokens.length} tokens)</h3>`;
    if (ex.full && ex.full[name]) { const c = document.createElement("canvas"); c.className = "nxn";
      c.title = "rows: queries, columns: keys"; drawNxN(c, ex.full[name], ex.tokens.length); div.appendChild(c); }
    const view = document.createElement("div"); div.appendChild(view); box.appendChild(div);
    const one = Object.assign({}, ex, {heads: [name]}); hlAttentionView(view, one); });
  section.dataset.done = "1";
}
function route() { const name = decodeURIComponent(location.hash.slice(1)); if (/^L\\d+H\\d+$/.test(name)) headPage(name); }
window.addEventListener("hashchange", route); route();
"""
