import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from headlab.cli import app

runner = CliRunner()


def test_scan_writes_table_json_and_report(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-gemma3", "--probes", "detectors,sinks,flow", "--quick", "--out",
                                 str(out), "--seed", "2"])
    assert result.exit_code == 0, result.output
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 3 * 4 and list(heads.columns[:4]) == ["layer", "head", "name", "detectors"]
    assert {"sinks", "sinks_first_mass", "flow"} <= set(heads.columns)
    assert heads.loc[5, "name"] == "L1H1"
    summary = json.loads((out / "scan.json").read_text())
    assert summary["seed"] == 2 and summary["geometry"]["n_heads"] == 4 and set(summary["seconds"]) == {
        "detectors", "sinks", "flow"}
    html = (out / "report.html").read_text()
    assert "Plotly.newPlot" in html and 'id="atlas"' in html
    assert '<script src="http' not in html  # plotly.js is embedded: the report works offline
    assert not list(tmp_path.glob(".*"))  # no staging or partial folders left


def test_rerun_resumes_from_the_journal_and_report_rerenders(tmp_path):
    out = tmp_path / "scan"
    assert runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out", str(out)]).exit_code == 0
    from headlab.probes import get_probe

    import headlab
    from headlab.engines.local import run_units

    model, probe = headlab.load_model("tiny-llama"), get_probe("detectors")
    params = probe.fit_context(probe.params(quick=True), model, 4096)
    journal = tmp_path / ".scan.partial" / "detectors.journal.jsonl"  # as an interrupted run leaves it
    run_units(probe, model, params, probe.plan(model, params)[:1], journal=journal, progress=False)
    first = (out / "heads.csv").read_bytes()
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out", str(out)])
    assert result.exit_code == 0 and "detectors: resuming, 1 of 1 units" in result.output
    assert (out / "heads.csv").read_bytes() == first and not journal.parent.exists()
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert (out / "report.html").exists()


def test_bad_input_exits_nonzero_without_output(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "smolm2", "--out", str(out)])
    assert result.exit_code == 1 and "unknown model" in result.output and not out.exists()
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "nope", "--out", str(out)])
    assert result.exit_code == 1 and "unknown probe" in result.output and not out.exists()
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no finished scan" in result.output


@pytest.mark.slow
def test_console_script_and_models_listing():
    script = Path(sys.executable).parent / "headlab"
    done = subprocess.run([str(script), "models"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "smollm2-135m" in done.stdout and "tiny-llama" in done.stdout
    done = subprocess.run([str(script), "scan", "no-such-model"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "unknown model" in done.stderr and "Traceback" not in done.stderr


def test_a_failing_probe_is_marked_and_the_others_finish(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,retrieval", "--quick", "--out", str(out)])
    assert result.exit_code == 1 and "retrieval failed" in result.output
    assert "detectors" in pd.read_csv(out / "heads.csv").columns
    summary = json.loads((out / "scan.json").read_text())
    assert summary["probes"] == ["detectors"] and "retrieval" in summary["failed"]
    assert "Failed probes" in (out / "report.html").read_text()


def test_unwritable_output_fails_before_any_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["scan", "no-such-model", "--out", str(blocker / "scan")])
    assert result.exit_code == 1 and "cannot write the output folder" in result.output  # before the model lookup


@pytest.mark.real
def test_scan_patching_on_smollm2(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "smollm2-135m", "--probes", "patching", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 270 and {"patching", "patching_noising", "patching_attribution", "patching_dla"} <= set(
        heads.columns)
    assert heads["patching"].notna().all() and heads["patching"].abs().max() > 0.05
    meta = json.loads((out / "probes" / "patching.json").read_text())
    assert meta["task"].startswith("ioi") and meta["clean_metric"] == pytest.approx(-meta["corrupted_metric"], abs=1e-4)


def test_scan_vision_on_the_shapes_testbed(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "shapes-llava", "--probes", "vision", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 16 and {"vision", "vision_text_norm", "vision_span_attention"} <= set(heads.columns)
    assert heads["vision"].gt(0).all() and heads["vision_span_attention"].between(0, 1).all()



def test_a_probe_added_to_a_scan_folder_keeps_the_others_and_the_merged_table_equals_one_scan(tmp_path):
    out, whole = tmp_path / "scan", tmp_path / "whole"
    assert runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "flow", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--out",
                               str(whole)]).exit_code == 0
    summary = json.loads((out / "scan.json").read_text())
    assert summary["probes"] == ["detectors", "flow"] and set(summary["params"]) == {"detectors", "flow"}
    assert [run["probes"] for run in summary["runs"]] == [["detectors"], ["flow"]]
    assert (out / "heads.csv").read_bytes() == (whole / "heads.csv").read_bytes()
    assert "detectors_previous_token" in (out / "report.html").read_text()
    # the same probe again with the same parameters: run again, nothing lost
    assert runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out", str(out)]).exit_code == 0
    assert json.loads((out / "scan.json").read_text())["probes"] == ["detectors", "flow"]
    # --overwrite replaces the folder
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "flow", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0 and json.loads((out / "scan.json").read_text())["probes"] == ["flow"]


def test_diff_ranks_two_scans(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, "0"), (b, "1")):
        assert runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--seed", seed,
                                   "--out", str(folder)]).exit_code == 0
    from headlab.diff import compare_scans
    from headlab.report import load_results
    from headlab.stats import spearman

    same = compare_scans(load_results(a), load_results(a), top=3)
    assert all(row["spearman"] == 1.0 and row["top_shared"] == 3 for row in same)
    assert all(m["rank_a"] == m["rank_b"] for row in same for m in row["moved"])
    rows = {row["column"]: row for row in compare_scans(load_results(a), load_results(b), top=3)}
    x, y = pd.read_csv(a / "heads.csv"), pd.read_csv(b / "heads.csv")
    assert rows["detectors"]["spearman"] == spearman(x["detectors"], y["detectors"]) and rows["detectors"]["n"] == 8
    moved = rows["detectors"]["moved"][0]
    rank_a = x["detectors"].rank(ascending=False)[x["name"] == moved["name"]].item()
    rank_b = y["detectors"].rank(ascending=False)[y["name"] == moved["name"]].item()
    assert (moved["rank_a"], moved["rank_b"]) == (rank_a, rank_b)
    assert abs(rank_a - rank_b) == max(abs(x["detectors"].rank(ascending=False) - y["detectors"].rank(ascending=False)))
    result = runner.invoke(app, ["diff", str(a), str(b), "--top", "2"])
    assert result.exit_code == 0 and "flow: Spearman" in result.output and "detectors_previous_token" in result.output
    result = runner.invoke(app, ["diff", str(a), str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no finished scan" in result.output


def test_cli_conventions_version_help_probe_parameters_dry_run():
    from headlab import __version__

    assert runner.invoke(app, ["--version"]).output.strip() == f"headlab {__version__}"
    help_text = runner.invoke(app, ["scan", "-h"]).output
    assert all(shown in help_text for shown in ("(default full)", "(default local)", "(default cpu)", "--overwrite"))
    assert "(default 0.25,0.5,0.75)" in " ".join(runner.invoke(app, ["kv", "--help"]).output.split())
    listing = runner.invoke(app, ["probes", "retrieval"])
    assert listing.exit_code == 0
    lines = [line for line in listing.output.splitlines() if line.startswith("retrieval.")]
    assert len(lines) == len(get_probe_params("retrieval"))
    assert any(line.startswith("retrieval.needles (") and "how many of headlab's needles" in line for line in lines)
    assert runner.invoke(app, ["probes", "nope"]).exit_code == 1
    plan = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--max-context", "10",
                               "--dry-run"])
    assert plan.exit_code == 0, plan.output
    assert "detectors.seq_len: 25 -> 4" in plan.output and "detectors: 1 units" in plan.output
    assert "flow: 8 units" in plan.output


def get_probe_params(name):
    import dataclasses

    from headlab.probes import get_probe

    return dataclasses.fields(get_probe(name).Params)


def test_a_log_file_gets_one_line_per_probe_and_what_was_fitted(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--max-context", "10",
                                 "--out", str(out)])  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "detectors.seq_len: 25 -> 4 (fitted to the model and --max-context 10)" in lines
    assert "detectors: running 1 units" in lines and "flow: running 8 units" in lines
    assert any(re.fullmatch(r"flow: done in \d+\.\d s", line) for line in lines)
    assert "" not in lines[:lines.index("flow: running 8 units")]  # no blank lines left by a live progress bar
    summary = json.loads((out / "scan.json").read_text())
    assert summary["adapted"] == {"detectors": {"seq_len": [25, 4]}}
    assert "<code>detectors.seq_len</code>: 25 &rarr; 4" in (out / "report.html").read_text()  # the header says it
    assert summary["command"].startswith("headlab") and summary["date"]


def test_reports_can_share_one_plotly_file(tmp_path):
    out = tmp_path / "scan"
    assert runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors", "--quick", "--out", str(out)]).exit_code == 0
    inline = (out / "report.html").read_text()
    assert inline.count("Plotly.newPlot") >= 3 and len(re.findall(r"<script src=", inline)) == 0
    assert runner.invoke(app, ["report", str(out), "--plotly", "shared"]).exit_code == 0
    shared = (out / "report.html").read_text()
    bundle = list(tmp_path.glob("plotly-*.min.js"))
    assert len(bundle) == 1 and f"<script src='../{bundle[0].name}'>" in shared
    assert len(inline) - len(shared) > 0.9 * bundle[0].stat().st_size  # the bundle left the page
    assert runner.invoke(app, ["report", str(out), "--plotly", "cdn"]).exit_code == 1
