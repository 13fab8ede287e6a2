"""report.html in headless Chromium: no console messages, every heatmap drawn, a screenshot saved."""

import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from headlab.cli import app

CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-extensions",
            "--no-first-run", "--disable-sync", "--disable-component-update", "--virtual-time-budget=15000"]


def chromium(*args, cwd):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed (make test installs the Debian package `chromium`)"
    return subprocess.run([binary, *CHROMIUM, *args], capture_output=True, text=True, timeout=180, cwd=cwd)


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "scan"
    result = CliRunner().invoke(app, ["scan", "tiny-llama", "--probes", "detectors,sinks,flow", "--quick",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    url = (out / "report.html").resolve().as_uri()
    html = (out / "report.html").read_text()
    figures = len(re.findall(r'id="heatmap-\d+"', html))
    assert figures >= 3

    dom = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    drawn = re.findall(r'<div id="heatmap-\d+" class="[^"]*js-plotly-plot', dom.stdout)
    assert len(drawn) == figures  # plotly marks each div it has drawn
    assert dom.stdout.count("<svg") >= figures and 'id="atlas"' in dom.stdout

    shot = tmp_path / "report.png"
    done = chromium("--window-size=1400,2400", f"--screenshot={shot}", url, cwd=tmp_path)
    assert done.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.browser
@pytest.mark.real
@pytest.mark.slow
def test_sweep_of_two_real_models_writes_both_scans_and_an_atlas_that_renders(tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", "smollm2-135m", "gemma3-270m", "--probes", "detectors,retrieval,sinks",
                                      "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for model, n_heads in (("smollm2-135m", 270), ("gemma3-270m", 72)):
        heads = (out / model / "heads.csv").read_text().splitlines()
        assert len(heads) == 1 + n_heads and {"detectors", "retrieval", "sinks"} <= set(heads[0].split(","))
    atlas = (out / "atlas.csv").read_text().splitlines()
    assert len(atlas) == 1 + 3 * (270 + 72)
    html = (out / "atlas.html").read_text()
    assert "Top heads per role" in html and "Heads above each probe" in html
    dom = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", (out / "atlas.html").resolve().as_uri(),
                   cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    drawn = re.findall(r'<div id="atlas-[a-z0-9-]+" class="[^"]*js-plotly-plot', dom.stdout)
    assert len(drawn) == 1 + 2  # the depth strip and one agreement heatmap per model


def _report_dom(url, tmp_path):
    dom = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    return dom.stdout


@pytest.mark.browser
@pytest.mark.real
@pytest.mark.slow
def test_a_real_quick_scan_report_says_what_ran_and_whether_to_trust_it(tmp_path):
    """SmolLM2's quick scan: header, baselines, the IOI warning, head pages behind every cell and row, the atlas
    filter; screenshots of the page, a head page, a probe and the atlas go to $HEADLAB_SCREENSHOTS when it is set."""
    out = tmp_path / "scan"
    result = CliRunner().invoke(app, ["scan", "smollm2-135m", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    check_real_report(out, tmp_path)


def check_real_report(out, tmp_path):
    """The checks of a quick SmolLM2 scan folder's report.html (also run by hand on an existing folder)."""
    import html
    import json
    import os

    import pandas as pd

    heads = pd.read_csv(out / "heads.csv")
    page = (out / "report.html").read_text()
    url = (out / "report.html").resolve().as_uri()
    top = heads.sort_values("detectors", ascending=False)["name"].iloc[0]
    dom = _report_dom(f"{url}#{top}", tmp_path)
    summary = json.loads((out / "scan.json").read_text())
    assert "<b class=\"badge quick\">quick</b>" in dom
    for package, version in summary["versions"].items():
        assert f"{package} {version}" in dom
    from headlab.probes import get_probe

    for probe in summary["probes"]:  # headlab's own probes all say what they rest on (a plugin need not)
        meta = json.loads((out / "probes" / f"{probe}.json").read_text())
        if "validity" not in meta and not type(get_probe(probe)).__module__.startswith("headlab.probes"):
            continue
        baseline = meta["validity"]["baseline"]
        assert html.escape(baseline, quote=False) in dom, probe
    assert "the model fails the task on the clean prompts (clean logit difference -2.35, accuracy 0.25 on 4 pairs)" in dom
    # every heatmap cell and atlas row names a head whose page exists
    pages = set(re.findall(r'<section class="head-page" id="(L\d+H\d+)"', dom))
    assert pages == set(heads["name"])
    figures = re.findall(r'<div id="heatmap-\d+" class="[^"]*js-plotly-plot', dom)
    assert len(figures) == len(re.findall(r'id="heatmap-\d+"', page)) >= 20
    cells = set(re.findall(r'"(L\d+H\d+)"', "".join(re.findall(r'Plotly\.newPlot\([^;]*', page))))
    assert cells == pages
    rows = re.findall(r'<tr data-row="\d+"><td><a href="#(L\d+H\d+)">', dom)
    assert sorted(rows) == sorted(pages)
    assert f"Head {top}</h2>" in dom and "GQA group: KV head" in dom and "95% interval" in dom
    # the head page lists the head's roles (heads.csv's roles column), each with the line its probe cuts it at
    roles = heads.set_index("name")["roles"].fillna("")[top].split()
    listed = re.search(r"<p><b>Roles</b>: (.*?)</p>", dom).group(1)
    assert roles and all(f'class="role"' in listed and f">{role}</span>" in listed for role in roles)
    assert "Roles (each probe's stated line)" in dom
    # the atlas filters (from the address, as a shared link would)
    filtered = _report_dom(f"{url}?filter=L18#head-atlas", tmp_path)
    assert 'id="atlas-count">9 of 270 heads' in filtered
    visible = re.findall(r'<tr data-row="\d+"><td><a href="#(L\d+H\d+)">', filtered)  # hidden rows carry a style
    assert sorted(visible) == sorted(f"L18H{h}" for h in range(9))
    shots = os.environ.get("HEADLAB_SCREENSHOTS")
    if shots:
        for name, address in (("report-top", url), ("report-head", f"{url}#L18H6"),
                              ("report-probe", f"{url}?view=probe-retrieval"),
                              ("report-atlas", f"{url}?filter=L18&view=atlas-part")):
            done = chromium("--window-size=1400,1000", f"--screenshot={shots}/{name}.png", address, cwd=tmp_path)
            assert done.returncode == 0
