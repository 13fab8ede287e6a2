"""MkDocs hooks: the pages made from the code, at build time.

- probes/<name>.md for every probe the registry knows (headlab's own and any registered), from its descriptor: what it
  finds, its paper, its parameters with defaults and quick values, its columns, a link to its findings and a heatmap
  from the committed SmolLM2 scan (docs/smollm2-scan/heads.csv) when that scan has its column;
- cli.md from the typer commands (every option with its default and help);
- api.md from headlab.__all__ (mkdocstrings renders each object's docstring and signature).
The navigation lists them, so a new probe gets a page without editing anything here.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.structure.files import File

DOCS = Path(__file__).resolve().parent
SCAN = DOCS / "smollm2-scan"

PAGES = [
    {"Home": "index.md"},
    {"Getting started": "getting-started.md"},
    {"Scans and the report": "scans.md"},
    "PROBES",
    {"Notebooks": ["notebooks/quickstart.ipynb", "NOTEBOOKS"]},
    {"Findings": "FINDINGS.md"},
    {"Head-aware KV cache": "kv.md"},
    {"Scaling out": "scaling.md"},
    {"The Triton kernel": "kernel.md"},
    {"Design": "DESIGN.md"},
    {"Testing": "testing.md"},
    {"CLI reference": "cli.md"},
    {"API reference": "api.md"},
]


def _probes() -> dict:
    from headlab.probes import probes

    return probes()


def on_config(config):
    nav = []
    for entry in PAGES:
        if entry == "PROBES":
            nav.append({"Probes": ["probes/index.md"] + [{p.name: f"probes/{p.name}.md"} for p in _probes().values()]})
        elif "Notebooks" in entry:
            others = sorted(p.name for p in (DOCS / "notebooks").glob("*.ipynb") if p.stem != "quickstart")
            nav.append({"Notebooks": ["notebooks/quickstart.ipynb"] + [f"notebooks/{n}" for n in others]})
        else:
            nav.append(entry)
    config["nav"] = nav
    return config


def on_files(files, config):
    for name, content in generated_pages().items():
        files.append(File.generated(config, name, content=content))
    import plotly

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    files.append(File.generated(config, "assets/plotly.min.js", content=plotly_js.read_bytes()))
    return files


def generated_pages() -> dict[str, str]:
    pages = {"probes/index.md": probe_index(), "cli.md": cli_reference(), "api.md": api_reference()}
    for probe in _probes().values():
        pages[f"probes/{probe.name}.md"] = probe_page(probe)
    return pages


# ---- probes ------------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def findings_anchor(probe) -> str | None:
    """The FINDINGS.md section whose heading names the probe (or its module), as a link target."""
    names = {probe.name.lower(), type(probe).__module__.rsplit(".", 1)[-1].lower()}
    for line in (DOCS / "FINDINGS.md").read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
            words = set(re.findall(r"[a-z0-9]+", heading.lower()))
            if names & words or any(heading.lower().startswith(n) for n in names):
                return f"../FINDINGS.md#{slugify(heading, '-')}"
    return None


def scan_figure(probe) -> str:
    """A heatmap (layers x heads) of the probe's column in the committed SmolLM2 scan, or a sentence saying there is
    none yet."""
    import pandas as pd
    import plotly.graph_objects as go

    heads = SCAN / "heads.csv"
    table = pd.read_csv(heads) if heads.is_file() else None
    if table is None or probe.name not in table.columns:
        return ("*No committed scan has this probe's column yet: `headlab scan smollm2-135m --probes "
                f"{probe.name}` draws it in the report.*\n")
    grid = table.pivot(index="layer", columns="head", values=probe.name)
    figure = go.Figure(go.Heatmap(z=grid.values, x=[f"H{h}" for h in grid.columns],
                                  y=[f"L{layer}" for layer in grid.index], colorscale="Viridis",
                                  colorbar={"title": probe.name}))
    figure.update_layout(title=f"{probe.name} on SmolLM2-135M (quick profile)", height=620, margin={"t": 50},
                         yaxis={"autorange": "reversed"}, xaxis={"title": "head"})
    html = figure.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{probe.name}")
    return ('<script src="../assets/plotly.min.js"></script>\n\n' + html + "\n\nFrom the scan in "
            "`docs/smollm2-scan/` (`make scan`: `headlab scan smollm2-135m --quick`).\n")


def probe_page(probe) -> str:
    module = inspect.getmodule(type(probe))
    lines = [f"# {probe.name}: {probe.description}", "", f"**Paper:** {probe.paper}", "",
             f"**Module:** `{module.__name__}` · **run it:** `headlab scan MODEL --probes {probe.name}` or "
             f"`{module.__name__.rsplit('.', 1)[-1]}.scan(model)`", ""]
    if probe.needs_decoder:
        lines += [f"Needs a causal language model: it {probe.needs_decoder}.", ""]
    lines += ["## Method", "", inspect.cleandoc(module.__doc__ or "").split("\n\n    ")[0], ""]
    scan = getattr(module, "scan", None)
    if scan is not None and scan.__doc__:
        lines += ["## `scan`", "", f"```python\nscan{inspect.signature(scan)}\n```", "",
                  inspect.cleandoc(scan.__doc__), ""]
    lines += ["## Parameters", "", f"Set any of them with `--set {probe.name}.NAME=VALUE` or in a scan config's "
              f"`[params.{probe.name}]`; `--quick` uses the quick column.", "",
              "| parameter | type | default | quick |", "|---|---|---|---|"]
    for p in probe.describe_params():
        lines.append(f"| `{p['name']}` | {_cell(p['type'])} | `{_cell(p['default'])}` | `{_cell(p['quick'])}` |")
    lines += ["", "## Columns", "", "| column | meaning |", "|---|---|"]
    for column, meaning in probe.columns.items():
        lines.append(f"| `{probe.name if column == 'score' else column}` | {_cell(meaning)} |")
    from headlab.probe import Probe

    threshold = type(probe).threshold
    if threshold is not Probe.threshold and threshold.__doc__:
        lines += ["", f"**Threshold:** {inspect.cleandoc(threshold.__doc__)}"]
    anchor = findings_anchor(probe)
    lines += ["", "## Findings", "", f"What it showed on the real models: [Findings]({anchor})." if anchor else
              "No findings recorded yet.", "", "## Figure", "", scan_figure(probe)]
    return "\n".join(lines)


def probe_index() -> str:
    lines = ["# Probes", "", "Every probe is one file in `headlab.probes` and one descriptor: its parameters, its "
             "plan of independent units and its merge. `headlab probes` prints the same tables.", "",
             "| probe | what it finds | paper |", "|---|---|---|"]
    for probe in _probes().values():
        lines.append(f"| [{probe.name}]({probe.name}.md) | {_cell(probe.description)} | {_cell(probe.paper)} |")
    return "\n".join(lines) + "\n"


# ---- CLI ---------------------------------------------------------------------------------------------------------

def cli_reference() -> str:
    import click
    import typer

    from headlab.cli import app

    group = typer.main.get_command(app)
    lines = ["# CLI reference", "", "Every `headlab` command with its arguments and options, generated from the "
             "commands themselves (`headlab COMMAND --help` prints the same).", ""]
    for name, command in sorted(group.commands.items()):
        lines += [f"## `headlab {name}`", "", inspect.cleandoc(command.help or ""), "",
                  "| argument or option | default | help |", "|---|---|---|"]
        for param in command.params:
            if isinstance(param, click.Argument):
                label = f"`{param.human_readable_name}`" + (" (required)" if param.required else "")
            else:
                label = " / ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
            default = "" if param.default in (None, (), []) or param.required else f"`{param.default}`"
            if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
                default = f"`{param.opts[0] if param.default else param.secondary_opts[0]}`"
            lines.append(f"| {label} | {_cell(default)} | {_cell(getattr(param, 'help', '') or '')} |")
        lines.append("")
    return "\n".join(lines)


# ---- API ---------------------------------------------------------------------------------------------------------

def api_reference() -> str:
    import headlab

    lines = ["# API reference", "", "Every name `headlab` exports (`headlab.__all__`), with its signature and "
             "docstring. The probes' own functions are on their pages.", ""]
    for name in sorted(headlab.__all__, key=str.lower):
        module, _, attribute = (headlab._LAZY.get(name) or getattr(headlab, name).__module__).partition(":")
        # "module:attribute" where the exported name differs from the object's own; Head is an alias: no __module__
        lines += [f"::: {module}.{attribute or name}", "    options:", "      heading_level: 2",
                  "      show_root_full_path: false", ""]
    return "\n".join(lines)
