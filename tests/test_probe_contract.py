"""The probe contract: every probe's units, split into shards and merged, give the one-process table bit for bit; a
scan killed mid-probe resumes at the unit; --set / --config; `headlab probes`; a probe added from outside."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from headlab.probes import get_probe, probes
from planted import copier_model, copy_task_files
from typer.testing import CliRunner

import headlab
from headlab.cli import app
from headlab.journal import Journal
from headlab.engines.local import run_local, run_units
from headlab.engines.scheduler import merge

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
PAIR = {"name": "tiny pair", "clean": [[0, 70, 71, 72, 73, 74]], "corrupted": [[0, 70, 75, 72, 73, 74]],
        "answer": [80], "wrong": [81]}


def cases(tmp_path_factory) -> dict:
    """probe -> (model, params overrides): small runs of every probe with several units each."""
    folder = tmp_path_factory.mktemp("copy")
    items = [{"question": f"Question {i}?", "options": ["x", "y", "z"], "answer": i % 3} for i in range(8)]
    return {
        "detectors": ("tiny-llama", {"seq_len": 6, "n_prompts": 5, "batch_size": 2}),
        "retrieval": ("copier", copy_task_files(folder)),
        "sinks": ("tiny-gemma3", {"n_texts": 4, "n_tokens": 40, "min_queries": 4}),
        "flow": ("tiny-llama", {"n_texts": 4}),
        "qk": ("tiny-llama", {"items": items, "batch_size": 3}),
        "patching": ("tiny-llama", {"task": PAIR}),
        "vision": ("tiny-llava", {"n": 3, "max_new_tokens": 3}),
        "function_vector": ("tiny-llama", {"tasks": ("antonym", "capitalise", "next_item"), "n_mean": 2,
                                           "n_corrupted": 2}),
        "successor": ("tiny-llama", {"sequences": ("numbers", "letters", "roman")}),
        "copy_suppression": ("tiny-gemma3", {"n_texts": 3, "n_tokens": 40, "max_tokens": 64}),
        "query_retrieval": ("tiny-gemma3", {"n_passages": 4, "passage_tokens": 10, "groups": 2}),
        "weight_scores": ("tiny-gemma3", {"n_tokens": 64}),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return cases(tmp_path_factory)


def load(name):
    return copier_model() if name == "copier" else headlab.load_model(name)


@pytest.mark.parametrize("probe_name", ["detectors", "retrieval", "sinks", "flow", "qk", "patching", "vision",
                                        "function_vector", "successor", "copy_suppression", "query_retrieval",
                                        "weight_scores"])
def test_three_shuffled_shards_merge_to_the_one_process_table(probe_name, runs, tmp_path):
    model_name, overrides = runs[probe_name]
    model = load(model_name)
    probe = get_probe(probe_name)
    params = probe.params(**overrides)
    whole = run_local(probe, model, params, progress=False)
    units = probe.plan(model, params)
    assert len(units) >= 3, "the case must split"
    random.Random(0).shuffle(units)
    shards = [units[i::3] for i in range(3)]
    partials = {}
    for i, shard in enumerate(shards):  # each shard with its own journal, as three workers would have
        partials.update(run_units(probe, model, params, shard, journal=tmp_path / f"shard{i}.jsonl", progress=False))
    merged = merge(probe, model, params, partials)
    assert merged.frame.equals(whole.frame)
    assert merged.meta == whole.meta or {k for k in merged.meta if merged.meta[k] != whole.meta[k]} <= {"versions"}


@pytest.mark.parametrize("plan, message", [([], "holds no work"), (["a", "b", "a"], "duplicate unit keys")])
def test_the_local_engine_refuses_an_empty_plan_or_repeated_keys(plan, message, tmp_path):
    from planned import with_plan

    model = headlab.load_model("tiny-llama")
    probe = with_plan(get_probe("detectors"), plan)
    with pytest.raises(headlab.InputError, match=message):
        run_local(probe, model, probe.params(seq_len=6, n_prompts=2), journal=tmp_path / "j.jsonl", progress=False)
    assert not (tmp_path / "j.jsonl").exists()  # nothing written
    with pytest.raises(headlab.InputError, match=message):
        probe.scan(model, progress=False, seq_len=6, n_prompts=2)


def test_a_journal_of_other_parameters_is_refused(tmp_path):
    model = headlab.load_model("tiny-llama")
    probe = get_probe("flow")
    run_local(probe, model, probe.params(n_texts=2), journal=tmp_path / "j.jsonl", progress=False)
    with pytest.raises(headlab.InputError, match="another run.*n_texts"):
        run_local(probe, model, probe.params(n_texts=3), journal=tmp_path / "j.jsonl", progress=False)
    other = headlab.load_model("tiny-gemma3")
    with pytest.raises(headlab.InputError, match="another run"):
        run_local(probe, other, probe.params(n_texts=2), journal=tmp_path / "j.jsonl", progress=False)


def test_a_torn_journal_line_is_run_again(tmp_path):
    model = headlab.load_model("tiny-llama")
    probe = get_probe("flow")
    params = probe.params(n_texts=3)
    path = tmp_path / "j.jsonl"
    whole = run_local(probe, model, params, journal=path, progress=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed while writing
    assert len(Journal(path, probe.fingerprint(model, params)).read()) == 2
    again = run_local(probe, model, params, journal=path, progress=False)
    assert again.frame.equals(whole.frame)
    assert len(path.read_text().splitlines()) == 1 + 3 and path.read_text().endswith("\n")


# ---- a scan killed in the middle of a probe ------------------------------------------------------------------------

SLOW_SCAN = """
import sys, time
from headlab.journal import Journal
append = Journal.append
def slow(self, key, partial):
    append(self, key, partial)
    time.sleep(1.0)
Journal.append = slow
from headlab.cli import app
sys.argv = ["headlab", *sys.argv[1:]]
app()
"""


def scan_command(probe_name, model_name, overrides, folder, out):
    """headlab scan arguments for one probe of `cases`, through a TOML config (the copier as a saved folder)."""
    if model_name == "copier":
        model_name = str(folder / "copier")
        if not (folder / "copier").exists():
            copier = copier_model()
            copier.hf.save_pretrained(folder / "copier")
            copier.tokenizer.save_pretrained(folder / "copier")
    config = folder / f"{probe_name}.toml"
    config.write_text(toml(probe_name, overrides))
    return ["scan", model_name, "--probes", probe_name, "--config", str(config), "--out", str(out)]


def toml(probe_name, overrides) -> str:
    lines = [f"[params.{probe_name}]"]
    for key, value in overrides.items():
        if isinstance(value, dict):
            lines.append(f"{key} = {{ {', '.join(f'{k} = {json.dumps(v)}' for k, v in value.items())} }}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{key} = [" + ", ".join("{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in item.items())
                                                 + " }" for item in value) + "]")
        else:
            lines.append(f"{key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("probe_name", ["detectors", "retrieval", "sinks", "flow", "qk", "patching", "vision",
                                        "function_vector", "copy_suppression", "query_retrieval"])
def test_a_killed_scan_resumes_at_the_unit(probe_name, runs, tmp_path):
    model_name, overrides = runs[probe_name]
    env = {**os.environ, "HEADLAB_PROGRESS": "0"}
    whole = tmp_path / "whole"
    done = subprocess.run([sys.executable, "-m", "headlab", *scan_command(probe_name, model_name, overrides, tmp_path,
                                                                          whole)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    journal = tmp_path / ".killed.partial" / f"{probe_name}.journal.jsonl"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SCAN, *scan_command(probe_name, model_name, overrides,
                                                                                 tmp_path, out)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not (journal.exists() and len(journal.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # in the middle: one unit journaled, the next one running or asleep
    process.wait()
    finished = len(journal.read_text().splitlines()) - 1
    assert 1 <= finished and not out.exists()
    again = subprocess.run([sys.executable, "-m", "headlab", *scan_command(probe_name, model_name, overrides, tmp_path,
                                                                           out)],
                           env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{probe_name}: resuming, {finished} of" in again.stdout
    assert (out / "heads.csv").read_bytes() == (whole / "heads.csv").read_bytes()


# ---- the faces read the descriptors -------------------------------------------------------------------------------

def test_set_and_config_reach_the_probe_and_scan_json_reproduces_the_scan(tmp_path):
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--out", str(out),
                                 "--set", "detectors.seq_len=7", "--set", "flow.fuse=max", "--set", "flow.n_texts=2",
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "scan.json").read_text())
    assert summary["params"]["detectors"]["seq_len"] == 7 and summary["params"]["detectors"]["n_prompts"] == 8
    assert summary["params"]["flow"]["fuse"] == "max" and summary["params"]["flow"]["seed"] == 3
    again = tmp_path / "again"
    result = runner.invoke(app, ["scan", "--config", str(out / "scan.json"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    assert (again / "heads.csv").read_bytes() == (out / "heads.csv").read_bytes()
    config = tmp_path / "scan.toml"
    config.write_text('model = "tiny-llama"\nprobes = ["flow"]\nseed = 3\n[params.flow]\nfuse = "max"\nn_texts = 2\n')
    third = tmp_path / "third"
    assert runner.invoke(app, ["scan", "--config", str(config), "--out", str(third)]).exit_code == 0
    first = pd.read_csv(out / "heads.csv")
    assert pd.read_csv(third / "heads.csv")["flow"].equals(first["flow"])


def test_set_takes_lists_and_the_users_own_files(tmp_path):
    needles = tmp_path / "mine.jsonl"
    needles.write_text(json.dumps({"id": "lamp", "fact": "The lamp code is {answer}.", "question": "What is the lamp "
                                   "code?", "answer": "912"}) + "\n")
    items = tmp_path / "my_mcqa.jsonl"
    items.write_text("".join(json.dumps({"question": f"Which is number {i}?", "options": ["one", "two", "three"],
                                         "answer": i % 3}) + "\n" for i in range(6)))
    from headlab.cli import scan_request

    request = scan_request("tiny-llama", "retrieval,qk", set_items=["retrieval.lengths=2048,4096",
                                                                    f"retrieval.needles={needles}", f"qk.items={items}"])
    assert request["params"]["retrieval"].lengths == (2048, 4096)
    assert request["params"]["retrieval"].needles == str(needles) and request["params"]["qk"].items == str(items)
    assert [t.needle.id for t in get_probe("retrieval").task(request["params"]["retrieval"]).tests()] == ["lamp"] * 6
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "qk", "--quick", "--out", str(out),
                                 "--set", f"qk.items={items}", "--set", "qk.permutations=false"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scan.json").read_text())["params"]["qk"]["items"] == str(items)
    assert json.loads((out / "probes" / "qk.json").read_text())["n_items"] == 6  # the user's six, not headlab's set


@pytest.mark.parametrize("args,says", [
    (["--set", "flow.nope=3"], "flow has no parameter 'nope'; its parameters are texts, outputs"),
    (["--set", "flow.n_texts=many"], "flow.n_texts takes int, not 'many'"),
    (["--set", "detectors.seq_len=4"], "'detectors', which is not among the probes"),
    (["--set", "flow"], "--set takes probe.parameter=value"),
    (["--set", "flow.fuse=median"], "fuse must be one of"),
    (["--config", "{bad_key}"], "unknown key(s) colour"),
    (["--config", "{bad_value}"], "flow.n_texts takes int, not [1, 2]"),
    (["--config", "{missing}"], "does not exist"),
])
def test_bad_settings_get_one_sentence(args, says, tmp_path):
    (tmp_path / "bad_key.toml").write_text('colour = "red"\n')
    (tmp_path / "bad_value.toml").write_text("[params.flow]\nn_texts = [1, 2]\n")
    args = [a.format(bad_key=tmp_path / "bad_key.toml", bad_value=tmp_path / "bad_value.toml",
                     missing=tmp_path / "missing.toml") for a in args]
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "flow", "--out", str(out), *args])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and says in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and not out.exists()


def test_probes_lists_every_probe_with_its_parameters():
    result = runner.invoke(app, ["probes"])
    assert result.exit_code == 0
    for name, probe in probes().items():
        assert name in result.output and probe.paper.split(",")[0][:20] in result.output.replace("\n", " ")
    assert "retrieval.lengths" in result.output and "[1024, 2048, 3072]" in result.output
    assert "detectors.seq_len" in result.output and "25" in result.output  # the quick value


def test_a_probe_from_outside_runs_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_PROBES", "probe_plugin")
    listing = runner.invoke(app, ["probes"])
    assert "self_attention" in listing.output and "self_attention.texts" in listing.output
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "self_attention,detectors", "--quick",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    heads = pd.read_csv(out / "heads.csv")
    assert heads["self_attention"].between(0, 1).all()
    assert "mean attention of a query on its own position" in (out / "report.html").read_text()
    model = headlab.load_model("tiny-llama")
    texts = get_probe("self_attention").Params().texts
    expected = sum(model.run_with_cache(model.to_tokens(text))[1].stack_activation("pattern")[:, 0]
                   .diagonal(dim1=-2, dim2=-1).double().mean(-1) for text in texts) / len(texts)  # [layer, head]
    assert torch.equal(torch.tensor(heads["self_attention"].to_numpy()).view(model.n_layers, model.n_heads), expected)
    monkeypatch.delenv("HEADLAB_PROBES")
    assert "self_attention" not in probes()  # named by the variable, not registered for the rest of the process


def test_constraints_declared_on_params_fields_are_checked_once():
    from dataclasses import dataclass

    from headlab.settings import check_constraints, constrained

    with pytest.raises(headlab.InputError, match=r"^patching\.corruption must be one of swap, names, got 'nope'$"):
        get_probe("patching").params(corruption="nope")

    @dataclass(frozen=True)
    class Params:
        mode: str = constrained("a", choices=("a", "b"))
        n: int = constrained(1, at_least=1)
        fractions: tuple = constrained((0.5,), between=(0, 1))
        limit: int | None = constrained(None, at_least=0)

    label = "p.{}".format
    check_constraints(Params(), label)  # the defaults, and None for an unset optional field, pass
    check_constraints(Params(mode="b", n=1, fractions=(0, 1), limit=0), label)  # the bounds are inclusive
    for bad, says in [({"mode": "c"}, "p.mode must be one of a, b, got 'c'"), ({"n": 0}, "p.n must be at least 1"),
                      ({"fractions": (0.5, 1.5)}, r"p.fractions must lie in \[0, 1\], got 1.5"),
                      ({"limit": -1}, "p.limit must be at least 0")]:
        with pytest.raises(headlab.InputError, match=says):
            check_constraints(Params(**bad), label)


def test_fit_context_honours_a_probe_written_against_fit():
    """`fit` is the earlier name of `fit_context`: a probe overriding either adapts its Params through both."""
    detectors = get_probe("detectors")
    model = headlab.load_model("tiny-llama")  # 256 positions: seq_len 200 needs 2 x 200 + 1
    params = detectors.params(seq_len=200)
    assert detectors.fit_context(params, model, 4096) == detectors.fit(params, model, 4096) != params

    from dataclasses import replace

    from headlab.probe import Probe

    class Old(type(detectors)):
        fit_context = Probe.fit_context  # as a probe written before the rename: only `fit` is its own

        def fit(self, params, model, max_context):
            return replace(params, seq_len=7)

    assert Old().fit_context(params, model, 4096).seq_len == 7 and Old().fit(params, model, 4096).seq_len == 7
