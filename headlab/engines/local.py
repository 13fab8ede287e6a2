"""The local engine: a plan's units run one after the other in this process, through the scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from headlab.engines.scheduler import Schedule, merge
from headlab.probe import Probe, Unit


def run_units(probe: Probe, model, params, units: Sequence[Unit], *, journal: str | Path | None = None,
              progress: bool = True, done: dict | None = None, on_resume=None) -> dict[str, dict]:
    """{key: partial} for `units`, run in this process; with `journal`, finished units are read from it and each new
    one is appended as it finishes (a killed run loses at most the unit it was in)."""
    schedule = Schedule(probe.name, units, probe.fingerprint(model, params), journal=journal, done=done,
                        progress=progress, on_resume=on_resume)
    try:
        for unit in schedule.todo:
            schedule.finish(unit.key, probe.run(model, params, unit))
    finally:
        schedule.close()
    return schedule.partials


def run_local(probe: Probe, model, params, *, journal: str | Path | None = None, progress: bool = True,
              on_resume=None):
    """The whole probe in this process: plan, run (journaled), merge in key order."""
    partials = run_units(probe, model, params, probe.plan(model, params), journal=journal, progress=progress,
                         on_resume=on_resume)
    return merge(probe, model, params, partials)


class LocalEngine:
    """Runs a probe's units in this process (the engine `headlab scan` uses unless told --engine ray), with
    `threads` torch threads when given."""

    def __init__(self, threads: int | None = None):
        if threads is not None:
            import torch

            torch.set_num_threads(threads)

    def run(self, probe: Probe, model, params, journal: str | Path | None = None, progress: bool = True,
            on_resume=None):
        return run_local(probe, model, params, journal=journal, progress=progress, on_resume=on_resume)

    def close(self) -> None:
        pass
