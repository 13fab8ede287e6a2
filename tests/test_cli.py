import json
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

