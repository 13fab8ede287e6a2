"""The probe contract: a plan of independent work units, what each unit contributes, and an exact merge.

A probe is one file in `probes/` that defines a `Probe` subclass and an instance of it named PROBE:

    @dataclass(frozen=True)
    class Params:                        # every parameter, with its default (recorded in meta and scan.json)
        seq_len: int = constrained(50, at_least=2)     # constraints declared beside the default, checked once
        seed: int = 0

    class Detectors(Probe):
        name, description, paper = "detectors", "induction, previous- and duplicate-token heads", "..."
        Params = Params
        quick = {"seq_len": 25}          # the quick profile: overrides of the defaults
        columns = {"score": "induction score: ...", "previous_token": "..."}   # the report and CLI read these
        def plan(self, model, params) -> list[Unit]          # independent units, stable keys, JSON data
        def run(self, model, params, unit) -> dict           # what the unit contributes (JSON: sums, counts, records)
        def merge(self, model, params, partials) -> HeadScores   # {key: partial} merged in key order

    PROBE = Detectors()
    scan = PROBE.scan                    # the one-line Python entry: plan, run (journaled, resumable), merge

Partials always pass through JSON before they are merged (here as through a journal or a network), and merge reads
them in key order, so a table is bit-identical however its units were split, scheduled or resumed. Every engine runs
the units through one scheduler (headlab.engines.scheduler: plan checks, journal, resume, progress, merge).
The registry of probes (headlab's own, and yours) is `headlab.probes.probes()`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

from headlab.errors import InputError, UnsupportedModelError
from headlab.settings import check_constraints, type_name


@dataclass(frozen=True)
class Unit:
    """One independent piece of a probe's work: `key` orders the merge, `data` (JSON) says what to compute."""

    key: str
    data: dict = dataclasses.field(default_factory=dict)


def as_json(value: Any) -> Any:
    """A partial in JSON's own types (tensors and arrays as nested lists): what a journal or a network carries."""
    return json.loads(json.dumps(value, default=_encode))


def _encode(value: Any) -> Any:
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"a partial holds {type(value).__name__}, which JSON cannot carry")


@dataclass(frozen=True)
class Role:
    """A role a head has when `column` of its probe's table exceeds `threshold` (None: the probe's
    `threshold(scores)`, the line its `score` is cut at); `why` says why the line lies there."""

    column: str = "score"
    threshold: float | None = None
    why: str = ""


class Probe:
    """The descriptor of one probe; subclasses set the class attributes and implement plan, run and merge."""

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type]
    quick: ClassVar[dict] = {}
    columns: ClassVar[dict[str, str]]
    signed: ClassVar[tuple[str, ...]] = ()  # columns whose sign means something (an effect, a correlation): the report
    #                                         draws them on a diverging scale centred on 0
    needs_decoder: ClassVar[str | None] = None  # why, when the probe needs a causal language model
    min_context: ClassVar[int] = 8  # the shortest prompt (tokens) the probe can work with
    order: ClassVar[int] = 100  # where the probe comes in listings, scans and heads.csv (then by name)
    roles: ClassVar[dict[str, Role]] = {}  # role name -> Role; none declared: one role named after the probe

    # ---- parameters --------------------------------------------------------------------------------------------
    def params(self, quick: bool = False, **overrides) -> Any:
        """Params from the defaults, the quick profile if asked, then `overrides`; InputError names bad keys."""
        fields = {f.name for f in dataclasses.fields(self.Params)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise InputError(f"{self.name} has no parameter {', '.join(unknown)}; its parameters are "
                             f"{', '.join(sorted(fields))}")
        values = {**(self.quick if quick else {}), **overrides}
        params = self.Params(**{k: normalise(v) for k, v in values.items()})
        check_constraints(params, lambda field: f"{self.name}.{field}")
        return self.check_params(params)

    def check_params(self, params):
        """InputError for values no run could use beyond the constraints declared on Params' fields
        (`headlab.settings.constrained`: choices, at_least, between), which `params` checks first; returns params."""
        return params

    def fit_context(self, params, model, max_context: int):
        """Params adapted to a model and the longest prompt allowed (e.g. lengths above the context dropped);
        InputError when nothing fits."""
        if type(self).fit is not Probe.fit:  # a probe written against the earlier name, `fit`
            return self.fit(params, model, max_context)
        return params

    def fit(self, params, model, max_context: int):
        """The earlier name of `fit_context` (still honoured when a probe overrides it)."""
        return self.fit_context(params, model, max_context)

    def check(self, model, params) -> None:
        """UnsupportedModelError before any compute when the probe cannot run on this model."""
        if self.needs_decoder and not model.is_causal:
            raise UnsupportedModelError(f"the {self.name} probe {self.needs_decoder} and needs a causal language "
                                        f"model; {model.name} is a bidirectional encoder")

    def threshold(self, scores) -> float | None:
        """The score above which a head counts as having the behaviour (the cross-model atlas counts them); None: the
        probe names no such line. Subclasses say why theirs is where it is."""
        return None

    def role_lines(self, scores) -> dict[str, dict]:
        """{role: {"column", "threshold", "why"}}: each declared role's line resolved for this table (recorded in
        its meta, so heads.csv's `roles` re-renders without the probe's code); roles without a line are left out."""
        out = {}
        for role, spec in (self.roles or {self.name: Role()}).items():
            line = self.threshold(scores) if spec.threshold is None else spec.threshold
            if line is not None and spec.column in scores.frame.columns:
                why = spec.why or " ".join((type(self).threshold.__doc__ or "").split())
                out[role] = {"column": spec.column, "threshold": float(line), "why": why}
        return out

    def validity(self, meta: dict) -> dict | None:
        """What the table rests on, read from its meta: {"rests_on": the counts, "baseline": what the scores are
        measured against, "warning": why not to trust them (e.g. the model fails the task), or None}; recorded in meta
        so the report shows it without the probe's code. None: nothing to say beyond the intervals."""
        return None

    def describe_params(self) -> list[dict]:
        """Each parameter: name, type, default and quick value (for `headlab probes` and the docs)."""
        hints = typing.get_type_hints(self.Params)
        descriptions = param_descriptions(self.Params)
        out = []
        for f in dataclasses.fields(self.Params):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append({"name": f.name, "type": type_name(hints[f.name]), "default": default,
                        "quick": self.quick.get(f.name, default), "description": descriptions.get(f.name, "")})
        return out

    # ---- the work ----------------------------------------------------------------------------------------------
    def plan(self, model, params) -> list[Unit]:
        raise NotImplementedError

    def run(self, model, params, unit: Unit) -> dict:
        raise NotImplementedError

    def merge(self, model, params, partials: dict[str, dict]):
        raise NotImplementedError

    def meta(self, model, params, **extra) -> dict:
        """What every table records: the probe, its paper, the model and every parameter (mechanically)."""
        from headlab.scores import versions

        seed = {"seed": params.seed} if hasattr(params, "seed") else {}
        meta = {"probe": self.name, "paper": self.paper, "model": model.name, "geometry": model.geometry,
                "params": dataclasses.asdict(params), **seed, "columns": dict(self.columns),
                "signed": list(self.signed), **extra, "versions": versions()}
        validity = self.validity(meta)
        if validity:
            meta["validity"] = validity
        return meta

    def scan(self, model, *, journal: str | Path | None = None, progress: bool = True, quick: bool = False,
             **params):
        """Plan, run every unit here (journaled to `journal` when given: an interrupted scan resumes at the unit),
        and merge -> HeadScores."""
        from headlab.engines.local import run_local

        params = self.params(quick, **params)
        self.check(model, params)
        return run_local(self, model, params, journal=journal, progress=progress)

    def fingerprint(self, model, params) -> dict:
        """What a journal must match to be resumed: the probe, the model and every parameter."""
        from headlab import __version__

        return {"probe": self.name, "model": model.name, "geometry": model.geometry,
                "params": as_json(dataclasses.asdict(params)), "headlab": __version__}

    def __repr__(self) -> str:
        return f"<probe {self.name}: {self.description}>"


def param_descriptions(params_class: type) -> dict[str, str]:
    """What each parameter does, from the code: the comment after its field, and the part of the Params docstring
    that starts with `name:` (up to the next `other:`), else the docstring's sentences that name it."""
    import inspect
    import re

    names = [f.name for f in dataclasses.fields(params_class)]
    out: dict[str, str] = {}
    try:
        source = inspect.getsource(params_class)
    except (OSError, TypeError):
        source = ""
    for name in names:
        comment = re.search(rf"^\s+{name}\s*:[^\n]*?#\s*(.+)$", source, re.M)
        if comment:
            out[name] = comment.group(1).strip()
    doc = " ".join((params_class.__doc__ or "").split())
    if doc.startswith(params_class.__name__ + "("):  # the dataclass' generated signature: no description
        return out
    labels = list(re.finditer(r"\b(" + "|".join(map(re.escape, names)) + r"):\s", doc)) if names else []
    for i, match in enumerate(labels):
        end = labels[i + 1].start() if i + 1 < len(labels) else len(doc)
        text = doc[match.end():end].strip().rstrip(";,")
        out.setdefault(match.group(1), text)
    sentences = re.split(r"(?<=[.;])\s+", doc)
    for name in names:
        if name not in out:
            mentions = [re.sub(r"^\w+:\s+", "", s) for s in sentences if re.search(rf"\b{re.escape(name)}\b", s)]
            if mentions:
                out[name] = " ".join(mentions)
    return out


def normalise(value: Any) -> Any:
    """Lists as tuples, so Params stay hashable and compare equal after a round trip through JSON or TOML."""
    if isinstance(value, list):
        return tuple(normalise(v) for v in value)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


def iter_partials(partials: dict[str, dict]) -> Iterable[tuple[str, dict]]:
    """(key, partial) in key order: the order every merge reads."""
    return ((key, partials[key]) for key in sorted(partials))
