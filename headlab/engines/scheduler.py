"""The one scheduler of a plan's units, whichever engine runs them: plan checks, journal, resume, progress, merge.

    schedule = Schedule(probe.name, units, probe.fingerprint(model, params), journal=path)
    for unit in schedule.todo: ...; schedule.finish(unit.key, partial)      # here, or as a cluster returns them
    table = merge(probe, model, params, schedule.partials)

A plan is refused (one sentence) when it is empty or two units share a key. With a journal, finished units are read
from it (units of this plan only) and each new one is appended as it finishes, so a killed run loses at most the
units in flight; a unit finished twice (a worker that finished after its unit went to another) is kept once.
Partials pass through JSON before they are kept, so a merge reads the same values however the units ran.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from headlab.errors import InputError
from headlab.journal import Journal
from headlab.probe import Unit, as_json
from headlab.progress import progress_bar


def check_plan(name: str, units: Sequence[Unit]) -> None:
    """InputError when a plan holds no unit or repeats a key."""
    if not units:
        raise InputError(f"the {name} plan holds no work for these parameters")
    repeated = sorted(key for key, count in Counter(unit.key for unit in units).items() if count > 1)
    if repeated:
        raise InputError(f"the {name} plan has duplicate unit keys ({', '.join(repeated[:3])})")


class Schedule:
    """The state of one run of a plan: `partials` {key: partial} finished so far, `todo` the units still to run."""

    def __init__(self, name: str, units: Sequence[Unit], fingerprint: dict, *, journal: str | Path | None = None,
                 done: dict | None = None, progress: bool = True,
                 on_resume: Callable[[int, int, Path], None] | None = None):
        check_plan(name, units)
        self.name = name
        self.journal = Journal(journal, fingerprint) if journal is not None else None
        self.partials: dict[str, dict] = dict(done or {})
        keys = {unit.key for unit in units}
        if self.journal is not None:
            resumed = {key: value for key, value in self.journal.resume().items() if key in keys}
            if resumed and on_resume is not None:
                on_resume(len(resumed), len(units), self.journal.path)
            self.partials.update(resumed)
        self.todo = [unit for unit in units if unit.key not in self.partials]
        self.n_units = len(units)
        self._bar = iter(progress_bar(range(len(self.todo) + 1), f"{name} ({self.n_units - len(self.todo)} of "
                                      f"{self.n_units} units done)", disable=not progress))
        next(self._bar, None)

    def finish(self, key: str, partial) -> None:
        """Keep a finished unit's partial (as JSON) and journal it; a key already finished is ignored."""
        if key in self.partials:
            return
        partial = as_json(partial)
        if self.journal is not None:
            self.journal.append(key, partial)
        self.partials[key] = partial
        next(self._bar, None)

    def close(self) -> None:
        """End the progress bar (every unit finished, or the run stopped)."""
        for _ in self._bar:
            pass


def merge(probe, model, params, partials: dict[str, dict]):
    """probe.merge over partials in key order (JSON types, as a journal holds them); meta["roles"] records the
    probe's role lines (`Probe.role_lines`)."""
    ordered = {key: as_json(partials[key]) for key in sorted(partials)}
    scores = probe.merge(model, params, ordered)
    if hasattr(probe, "role_lines"):  # any object with Params and run may be scheduled; only probes declare roles
        scores.meta["roles"] = probe.role_lines(scores)
    return scores
