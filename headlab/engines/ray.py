"""A probe's units on a Ray cluster: each worker is an actor that loads the model once and runs the units it is
handed; units go out one at a time to whichever worker is free (a slow unit holds no fixed shard), partials stream
back to the driver, which journals each one as it arrives (the same journal as the local loop) and merges exactly as
the local loop does.

    engine = RayEngine("smollm2-135m", workers=2, threads_per_worker=1)   # a local cluster, or address="auto"
    scores = engine.run(PROBE, model, params, journal="retrieval.journal.jsonl")
    engine.close()

Faults: a worker killed in the middle of a unit restarts (and reloads the model) while its unit goes to another
worker; a unit is journaled once, however many workers ran it. The driver killed: rerunning resumes from the journal.
A worker that cannot load the model: one sentence naming its node, before any unit runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections import deque
from pathlib import Path

from headlab import errors
from headlab.errors import HeadlabError, InputError, PackageMissingError
from headlab.engines.scheduler import Schedule, merge
from headlab.probe import Probe, Unit, as_json, normalise

PASSED_ENV = ("HEADLAB_PROBES", "HEADLAB_CACHE", "TRITON_INTERPRET", "HF_HUB_OFFLINE")  # what workers inherit


def init(**options) -> None:
    """ray.init from a neutral folder: Ray puts the driver's working directory first on every worker's sys.path, and
    from a source checkout that would shadow the installed headlab with its source folder."""
    ray = import_ray()
    here = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, **options)
    finally:
        os.chdir(here)


def import_ray():
    try:
        import ray
    except ImportError:
        raise PackageMissingError("the Ray engine needs Ray: pip install 'headlab[ray]'") from None
    return ray


class UnitWorker:
    """A Ray actor (see RayEngine): the model, loaded once; runs units of any probe on it."""

    def __init__(self, model_name: str, device: str, dtype: str | None, threads: int, device_map=None):
        import torch

        torch.set_num_threads(threads)
        self.error = None
        try:
            from headlab.loading import load_model

            self.model = load_model(model_name, device=device, dtype=dtype, device_map=device_map)
        except HeadlabError as error:
            self.error = (type(error).__name__, str(error))

    def ready(self) -> dict:
        """{"ok", "error": (class name, sentence) or None, "node": the node's address, "pid"}."""
        import ray

        return {"ok": self.error is None, "error": self.error, "node": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    def run(self, probe, params: dict, key: str, data: dict):
        """One unit of `probe` (the descriptor itself, sent by Ray: any object with Params and run)."""
        return as_json(probe.run(self.model, probe.Params(**normalise(params)), Unit(key, data)))


class RayEngine:
    """Runs probes' units on `workers` actors of a Ray cluster (started here with `workers * threads_per_worker`
    CPUs unless `address` names one: "auto" or HOST:PORT)."""

    def __init__(self, model_name: str, *, address: str | None = None, workers: int = 2, threads_per_worker: int = 1,
                 device: str = "cpu", dtype: str | None = None, device_map: str | dict | None = None,
                 runtime_env: dict | None = None):
        if workers < 1 or threads_per_worker < 1:
            raise InputError(f"--workers and --threads-per-worker must be at least 1, got {workers}, "
                             f"{threads_per_worker}")
        ray = self.ray = import_ray()
        self.model_name = model_name
        self.started = False
        if not ray.is_initialized():
            resources = ({"num_cpus": workers * threads_per_worker, "num_gpus": 0 if device == "cpu" else None}
                         if address is None else {"address": address})
            try:
                init(**resources)
            except ConnectionError as error:
                raise InputError(f"cannot connect to the Ray cluster at {address}: {error}") from None
            self.started = True
        env = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if k in os.environ}}
        if runtime_env:
            env = {**env, **runtime_env, "env_vars": {**env["env_vars"], **runtime_env.get("env_vars", {})}}
        actor = ray.remote(UnitWorker).options(num_cpus=threads_per_worker,
                                               num_gpus=0 if device == "cpu" else 1,
                                               max_restarts=-1, max_task_retries=0, runtime_env=env)
        self.workers = [actor.remote(model_name, device, dtype, threads_per_worker, device_map) for _ in range(workers)]
        self.retried: list[str] = []  # the last run's units that ran again because their worker died
        self._check_workers()

    def _check_workers(self) -> None:
        states = self.ray.get([worker.ready.remote() for worker in self.workers])
        for state in states:
            if not state["ok"]:
                name, sentence = state["error"]
                self.close()
                error_class = getattr(errors, name, HeadlabError)
                raise error_class(f"the worker on node {state['node']} cannot load {self.model_name}: {sentence}")

    def pids(self) -> list[int]:
        """The worker processes' ids (tests kill them); waits for workers that are restarting."""
        return [self._state(worker)["pid"] for worker in self.workers]

    def _state(self, worker, timeout: float = 300.0) -> dict:
        """A worker's ready() once it answers (a restarting worker refuses calls until its model is loaded again)."""
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ray.get(worker.ready.remote())
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def run(self, probe: Probe, model, params, journal: str | Path | None = None, progress: bool = True,
            on_resume=None):
        """Plan here, run the units on the workers (journaled as they arrive), merge here -> HeadScores."""
        schedule = Schedule(probe.name, probe.plan(model, params), probe.fingerprint(model, params), journal=journal,
                            progress=progress, on_resume=on_resume)
        try:
            self.run_schedule(probe, params, schedule)
        finally:
            schedule.close()
        return merge(probe, model, params, schedule.partials)

    def run_schedule(self, probe, params, schedule: Schedule) -> None:
        """Hand the schedule's units out, one at a time, to whichever worker is free, until every one finished."""
        from ray.exceptions import RayActorError, RayTaskError

        self.retried = []
        todo = deque(schedule.todo)
        payload = as_json(dataclasses.asdict(params))
        probe_ref = self.ray.put(probe)
        idle = list(range(len(self.workers)))
        in_flight: dict = {}
        recovering: dict = {}  # ready() calls on workers that died, by future: idle again once they answer
        avoid: dict[str, int] = {}  # a unit whose worker died goes to another worker when one is free
        while todo or in_flight:
            while todo and idle:
                unit = todo.popleft()
                others = [w for w in idle if w != avoid.get(unit.key)]
                worker = (others or idle)[0]
                idle.remove(worker)
                future = self.workers[worker].run.remote(probe_ref, payload, unit.key, unit.data)
                in_flight[future] = (worker, unit)
            ready, _ = self.ray.wait(list(in_flight) + list(recovering), num_returns=1)
            if ready[0] in recovering:
                worker = recovering.pop(ready[0])
                try:
                    self.ray.get(ready[0])
                    idle.append(worker)
                except RayActorError:  # still restarting: ask again in a moment
                    time.sleep(0.2)
                    recovering[self.workers[worker].ready.remote()] = worker
                continue
            worker, unit = in_flight.pop(ready[0])
            try:
                partial = self.ray.get(ready[0])
            except RayActorError:  # the worker died in the middle of the unit: it restarts, the unit runs again
                avoid[unit.key] = worker
                self.retried.append(unit.key)
                todo.appendleft(unit)
                recovering[self.workers[worker].ready.remote()] = worker
                continue
            except RayTaskError as error:  # the probe itself failed: as it would have here
                raise error.as_instanceof_cause() from None
            idle.append(worker)
            schedule.finish(unit.key, partial)

    def close(self) -> None:
        """Stop the workers, and the cluster if this engine started it."""
        for worker in getattr(self, "workers", []):
            self.ray.kill(worker)
        self.workers = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
