"""The Ray engine's speedup and overhead, in one run on this machine (nothing else should be running).

(a) The quick retrieval scan with 8 NIAH tests on SmolLM2 (4 needles x 1024 tokens x 2 depths): 1 worker x 1 thread
    against 2 workers x 1 thread, each on a local Ray cluster with that many CPUs; the tables must be equal.
(b) The engine's own overhead per unit (scheduling, transfer, journal): a probe whose units do almost nothing
    (detectors on tiny-llama, one 3-token prompt per unit) through one Ray worker, journaled, against the same units
    computed here without a journal: the difference per unit.

    python tests/bench/bench_ray.py --out bench_ray.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from headlab.probes import get_probe

import headlab
from headlab.engines.ray import RayEngine, import_ray
from headlab.engines.local import run_local


def timed_ray(model_name, model, probe, params, workers: int, journal: Path) -> tuple[float, object, float]:
    """(seconds of engine.run, table, seconds to start the cluster and load the model on every worker)."""
    ray = import_ray()
    start = time.perf_counter()
    engine = RayEngine(model_name, workers=workers, threads_per_worker=1)
    setup = time.perf_counter() - start
    try:
        start = time.perf_counter()
        table = engine.run(probe, model, params, journal=journal, progress=False)
        return time.perf_counter() - start, table, setup
    finally:
        engine.close()
        assert not ray.is_initialized()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--units", type=int, default=200, help="units of the overhead run")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    report = {}

    model = headlab.load_model("smollm2-135m")
    probe = get_probe("retrieval")
    params = probe.fit_context(probe.params(quick=True, needles=4), model, 4096)
    assert len(probe.plan(model, params)) == 8
    one, table_one, setup_one = timed_ray("smollm2-135m", model, probe, params, 1, folder / "one.jsonl")
    two, table_two, setup_two = timed_ray("smollm2-135m", model, probe, params, 2, folder / "two.jsonl")
    assert table_one.frame.equals(table_two.frame)
    report["retrieval_8_tests"] = {"one_worker_s": one, "two_workers_s": two, "speedup": one / two,
                                   "setup_one_s": setup_one, "setup_two_s": setup_two}
    print(f"retrieval, 8 NIAH tests on SmolLM2: 1 worker {one:.1f} s, 2 workers {two:.1f} s, speedup {one / two:.2f}x "
          f"(cluster start + model load: {setup_one:.1f} s / {setup_two:.1f} s, not in the times)")

    tiny = headlab.load_model("tiny-llama")
    probe = get_probe("detectors")
    params = probe.params(texts=["ab"] * args.units)  # one 3-token prompt per unit: the unit itself is ~free
    start = time.perf_counter()
    local = run_local(probe, tiny, params, progress=False)
    local_s = time.perf_counter() - start
    remote_s, remote, _ = timed_ray("tiny-llama", tiny, probe, params, 1, folder / "ray.jsonl")
    assert remote.frame.equals(local.frame)
    per_unit_ms = 1000 * (remote_s - local_s) / args.units
    report["overhead"] = {"units": args.units, "local_no_journal_s": local_s, "ray_1_worker_journaled_s": remote_s,
                          "overhead_per_unit_ms": per_unit_ms, "compute_per_unit_ms": 1000 * local_s / args.units}
    print(f"overhead: {args.units} near-empty units, computed here {local_s:.2f} s "
          f"({1000 * local_s / args.units:.1f} ms/unit), on 1 Ray worker with the journal {remote_s:.2f} s: "
          f"engine overhead {per_unit_ms:.1f} ms per unit")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
