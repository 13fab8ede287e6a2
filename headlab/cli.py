"""`headlab scan`, `headlab probes`, `headlab report`, `headlab models`, `headlab sweep`, `headlab kv`.

Everything about a probe — its parameters, defaults, quick profile and column meanings — comes from its descriptor
(headlab.probe); this module only reads them. Bad input gets one `error:` line on stderr and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from headlab.errors import HeadlabError, InputError
from headlab.scores import HeadScores, versions
from headlab.kv.run import KVSettings
from headlab.settings import SCAN_SETTINGS, ScanSettings

# rich_markup_mode=None: plain help, so bracketed defaults such as [full] are printed, not read as markup
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find and explain what attention heads do.",
                  context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)
console = Console()
errors = Console(stderr=True, soft_wrap=True)

CONFIG_KEYS = {"model", "probes", "params", "settings", *SCAN_SETTINGS}


def _version(value: bool) -> None:
    if value:
        from headlab import __version__

        typer.echo(f"headlab {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="print headlab's version and exit")) -> None:
    """Find and explain what attention heads do."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


# ---- scan -------------------------------------------------------------------------------------------------------

def with_settings(kind, flags: dict | None = None):
    """Give a command one option per field of the settings dataclass `kind` (help and default from the field; unset
    options stay None so that a config file can fill them; tuples are written as comma lists); the command receives
    them as keyword arguments."""
    import inspect
    import typing

    def decorate(command):
        signature = inspect.signature(command)
        hints = typing.get_type_hints(kind)
        extra = []
        for f in dataclasses.fields(kind):
            hint = str if typing.get_origin(hints[f.name]) is tuple else hints[f.name]
            default = f.default if not isinstance(f.default, tuple) else ",".join(map(str, f.default))
            if isinstance(default, bool) and "/" in "".join((flags or {}).get(f.name, [])):
                default = (flags or {})[f.name][0].split("/")[0 if default else 1].lstrip("-")  # --quick/--full
            shown = f" (default {default})" if default is not None else ""
            option = typer.Option(None, *(flags or {}).get(f.name, []), help=f"{f.metadata['help']}{shown}")
            extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[hint],
                                           default=option))
        fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        command.__signature__ = signature.replace(parameters=fixed + extra)
        command.__annotations__ = {**{p.name: p.annotation for p in fixed + extra}, "return": None}
        return command

    return decorate


@app.command()
@with_settings(ScanSettings, {"quick": ["--quick/--full"]})
def scan(
    model: Optional[str] = typer.Argument(None, help="registry name (`headlab models`), local folder, GGUF file or hub "
                                                     "id; optional with --config"),
    probes: Optional[str] = typer.Option(None, help="comma-separated probes (`headlab probes`; default: all)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default scan-<model>)"),
    top: int = typer.Option(10, help="heads to print per probe"),
    set_: list[str] = typer.Option([], "--set", help="a probe parameter, e.g. --set retrieval.lengths=2048,4096 "
                                                      "(repeatable; see `headlab probes`)"),
    config: Optional[Path] = typer.Option(None, help="a TOML or JSON file of these options (a scan folder's "
                                                     "scan.json re-runs that scan)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a scan folder of other probes, settings or "
                                                              "parameters (default: add the probes to it, or refuse)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (units per probe, fitted parameters) and "
                                                          "run nothing"),
    **options,
) -> None:
    """Run probes on a model and write heads.csv, scan.json and report.html (added to an existing scan folder of
    the same model and settings)."""
    try:
        request = scan_request(model, probes, top=top, set_items=set_, config=config, **options)
        request["command"] = " ".join(["headlab", *sys.argv[1:]]) if sys.argv[1:] else "headlab scan"
        out = out or Path(f"scan-{Path(request['model']).name}")
        if dry_run:
            print_plan(request)
            return
        check_writable(out)
        previous = check_existing(out, request, overwrite)
        results, failed = run_scan(request, out, previous=previous)
    except HeadlabError as error:
        _fail(str(error))
    for name, result in results.items():
        _print_top(result, name, top)
    console.print(f"report: {(out / 'report.html').resolve()}")
    if failed:
        _fail(f"{len(failed)} probe(s) failed ({', '.join(failed)}); the report marks them")


def scan_request(model, probes, *, top: int = 10, set_items=(), config=None, params: dict | None = None,
                 **options) -> dict:
    """Everything a scan needs, checked before any compute: model, probes, settings and each probe's Params
    (`params`: {probe: {parameter: value}}, over those of the config)."""
    from headlab.probes import get_probe
    from headlab.probes import probes as registry
    from headlab.settings import parse_setting

    if top < 1:
        raise InputError(f"--top must be at least 1, got {top}")
    file = read_config(config) if config is not None else {}
    if params:
        file = {**file, "params": {**file.get("params", {}), **params}}
    settings = ScanSettings.from_values({**file.get("settings", {}), **{k: file[k] for k in SCAN_SETTINGS if k in file},
                                       **{k: v for k, v in options.items() if v is not None}})
    model = model or file.get("model")
    if not model:
        raise InputError("give a model (a registry name, folder, GGUF file or hub id) or a --config that names one")
    names = ([p.strip() for p in probes.split(",") if p.strip()] if probes is not None
             else list(file.get("probes") or registry()))
    known = registry()
    unknown = [p for p in names if p not in known]
    if not names or unknown:
        raise InputError(f"unknown probe(s) {', '.join(unknown) or repr(probes)}; choose from {', '.join(known)}")
    overrides: dict[str, dict[str, Any]] = {name: dict(file.get("params", {}).get(name, {})) for name in names}
    for name in file.get("params", {}):
        if name not in names:
            raise InputError(f"the config sets parameters of {name!r}, which is not among the probes "
                             f"({', '.join(names)})")
    for item in set_items:
        key, sep, text = item.partition("=")
        probe_name, dot, field = key.strip().partition(".")
        if not sep or not dot:
            raise InputError(f"--set takes probe.parameter=value (e.g. retrieval.lengths=2048,4096), got {item!r}")
        if probe_name not in names:
            raise InputError(f"--set {key} names {probe_name!r}, which is not among the probes ({', '.join(names)})")
        overrides[probe_name][field] = parse_setting(probe_name, get_probe(probe_name).Params, field, text)
    params = {}
    for name in names:
        probe = get_probe(name)
        fields = {f.name for f in dataclasses.fields(probe.Params)}
        chosen = dict(overrides[name])
        if "seed" in fields and "seed" not in chosen:
            chosen["seed"] = settings.seed
        params[name] = probe.params(settings.quick, **probe_values(probe, chosen))
        if settings.max_context < probe.min_context:
            raise InputError(f"--max-context {settings.max_context} is below what {name} needs "
                             f"({probe.min_context} tokens)")
    return {"model": model, "probes": names, "settings": settings, "params": params}


def probe_values(probe, values: dict) -> dict:
    """Config values (TOML or JSON: numbers, strings, lists) checked against the probe's Params types; strings are
    parsed as --set parses them."""
    from headlab.settings import check_value

    return {key: check_value(probe.name, probe.Params, key, value) for key, value in values.items()}


def read_file(path: Path) -> dict:
    """A config file's contents: TOML (.toml) or JSON; InputError when it is missing or cannot be read."""
    if not path.is_file():
        raise InputError(f"config {path} does not exist")
    try:
        return tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"config {path} cannot be read: {error}") from None


def read_config(path: Path) -> dict:
    """A scan config: TOML (.toml) or JSON (a scan folder's scan.json); InputError names unknown keys."""
    data = read_file(path)
    if path.name == "scan.json":  # a finished scan: re-run what it ran, with its full parameters
        data = {"model": data.get("model"), "probes": data.get("probes"), "params": data.get("params", {}),
                "settings": {k: v for k, v in data.get("settings", {}).items() if k in SCAN_SETTINGS}}
        data["settings"]["quick"] = False  # the parameters are explicit
    unknown = sorted(set(data) - CONFIG_KEYS)
    unknown_settings = sorted(set(data.get("settings", {})) - set(SCAN_SETTINGS))
    if unknown or unknown_settings:
        raise InputError(f"config {path} has unknown key(s) {', '.join(unknown + unknown_settings)}; the keys are "
                         f"model, probes, params.<probe>.<parameter> and {', '.join(SCAN_SETTINGS)}")
    if not isinstance(data.get("params", {}), dict):
        raise InputError(f"config {path}: params must be a table of probes")
    return data


def fitted_params(request: dict, model) -> tuple[dict, dict]:
    """({probe: Params fitted to the model and --max-context}, {probe: {parameter: [asked, fitted]}}); each probe
    checked against the model before any compute."""
    from headlab.probe import as_json
    from headlab.probes import get_probe

    params, adapted = {}, {}
    for name in request["probes"]:
        probe = get_probe(name)
        asked = request["params"][name]
        params[name] = probe.fit_context(asked, model, request["settings"].max_context)
        probe.check(model, params[name])
        before, after = as_json(dataclasses.asdict(asked)), as_json(dataclasses.asdict(params[name]))
        changed = {key: [before[key], after[key]] for key in after if before.get(key) != after[key]}
        if changed:
            adapted[name] = changed
    return params, adapted


def print_adapted(adapted: dict, max_context: int) -> None:
    """One line per parameter a probe fitted to the model or to --max-context."""
    for name, changed in adapted.items():
        for key, (asked, fitted) in changed.items():
            console.print(escape(f"{name}.{key}: {_short(asked)} -> {_short(fitted)} (fitted to the model and "
                                 f"--max-context {max_context})"), highlight=False)


def print_plan(request: dict) -> None:
    """--dry-run: the probes, their fitted parameters and units; the model is loaded (its geometry and tokenizer
    make the plan), nothing is run or written."""
    from headlab.loading import load_model
    from headlab.probes import get_probe

    settings = request["settings"]
    model = load_model(request["model"], device=settings.device, dtype=settings.dtype,
                       device_map=parse_device_map(settings.device_map))
    params, adapted = fitted_params(request, model)
    console.print(f"plan for {model} ({'quick' if settings.quick else 'full'}, seed {settings.seed}, "
                  f"max context {settings.max_context})", highlight=False)
    print_adapted(adapted, settings.max_context)
    for name in request["probes"]:
        units = get_probe(name).plan(model, params[name])
        console.print(f"{name}: {len(units)} units ({units[0].key} ... {units[-1].key})" if units else
                      f"{name}: no units", highlight=False)


RESULT_SETTINGS = ("seed", "max_context", "quick", "dtype")  # settings that change a table (device and engine do not)


def check_existing(out: Path, request: dict, overwrite: bool) -> tuple[dict, dict] | None:
    """The scan an existing folder holds, to which this scan's probes are added; InputError (before any compute)
    when the folder holds a scan of another model or of other settings, unless `overwrite`."""
    from headlab.report import load_results

    if overwrite or not (out / "scan.json").exists():
        return None
    summary, results = load_results(out)
    hint = "; choose another --out or pass --overwrite to replace it"
    if summary.get("model") != request["model"]:
        raise InputError(f"{out} holds a scan of {summary.get('model')}, not {request['model']}{hint}")
    old = summary.get("settings", {})
    new = request["settings"]
    differ = [f"{key} {old[key]} there, {getattr(new, key)} here" for key in RESULT_SETTINGS if key in old and old[key] != getattr(new, key)]
    if differ:
        raise InputError(f"{out} holds a scan with other settings ({'; '.join(differ)}){hint}")
    return summary, results


def merge_scans(previous: tuple[dict, dict] | None, summary: dict, results: dict) -> tuple[dict, dict]:
    """This scan added to the one a folder holds: its probes replace theirs of the same name, the others stay."""
    if previous is None:
        return summary, results
    old, old_results = previous
    merged = {**old_results, **results}  # a probe that failed now keeps its earlier table
    keep = [name for name in old["probes"] if name not in results]
    order = [*old["probes"], *(name for name in results if name not in old["probes"])]
    failed = {**old.get("failed", {}), **summary["failed"]}
    summary = {**summary, "probes": order, "failed": {k: v for k, v in failed.items() if k not in merged}}
    for key in ("params", "seconds", "adapted"):
        summary[key] = {**{k: v for k, v in old.get(key, {}).items() if k in keep}, **summary.get(key, {})}
    summary["runs"] = [*old.get("runs", [{"command": old.get("command"), "probes": old["probes"],
                                          "date": old.get("date")}]),
                       {"command": summary.get("command"), "probes": list(results), "date": summary.get("date")}]
    return summary, {name: merged[name] for name in summary["probes"]}


def run_scan(request: dict, out: Path, previous: tuple[dict, dict] | None = None, model=None
             ) -> tuple[dict[str, HeadScores], dict[str, str]]:
    """Load the model (unless `model`, a HeadModel, is given), fit and check each probe's params, run every probe
    (journaled in a sibling folder, so a rerun resumes at the unit), and write the scan folder (with `previous`, the
    scan the folder held, merged in: a probe already there with other parameters is refused before any compute); a
    probe that fails does not stop the others."""
    from headlab.loading import load_model
    from headlab.probe import as_json
    from headlab.probes import get_probe
    from headlab.report import write_report

    settings = request["settings"]
    start = time.perf_counter()
    if model is None:
        model = load_model(request["model"], device=settings.device, dtype=settings.dtype,
                           device_map=parse_device_map(settings.device_map))
    params, adapted = fitted_params(request, model)
    if previous is not None:
        for name in request["probes"]:
            there = previous[0].get("params", {}).get(name)
            if there is not None and there != as_json(dataclasses.asdict(params[name])):
                differ = sorted(k for k in there if there[k] != as_json(dataclasses.asdict(params[name])).get(k))
                raise InputError(f"{out} holds {name} run with other parameters ({', '.join(differ)}); choose "
                                 "another --out or pass --overwrite to replace it")
    console.print(f"{model}  (loaded in {model.load_info.seconds:.1f} s)")
    print_adapted(adapted, settings.max_context)
    partial = out.with_name(f".{out.name}.partial")  # the journals of an unfinished scan
    results, seconds, failed = {}, {}, {}
    engine = make_engine(request["model"], settings)
    try:
        for name in request["probes"]:
            t = time.perf_counter()
            journal = partial / f"{name}.journal.jsonl"
            try:
                if not console.is_terminal:  # a log file: one plain line per probe, as it starts and ends
                    console.print(f"{name}: running {len(get_probe(name).plan(model, params[name]))} units",
                                  highlight=False)
                results[name] = engine.run(get_probe(name), model, params[name], journal,
                                           on_resume=functools.partial(_report_resume, name))
            except Exception as error:  # noqa: BLE001 - one probe's failure, ours or torch's, must not stop the others
                failed[name] = f"{type(error).__name__}: {error}"
                errors.print(f"[red]{name} failed:[/red] {escape(failed[name])}")
                continue
            seconds[name] = time.perf_counter() - t
            console.print(f"{name}: done in {seconds[name]:.1f} s", highlight=False)
    finally:
        engine.close()
    if not results:
        raise InputError("every probe failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    import datetime
    import platform

    summary = {
        "model": request["model"], "probes": list(results), "failed": failed,
        "settings": dataclasses.asdict(settings), "seed": settings.seed,
        "params": {name: dataclasses.asdict(p) for name, p in params.items() if name in results},
        "adapted": {name: changed for name, changed in adapted.items() if name in results},
        "geometry": model.geometry, "load": vars(model.load_info), "seconds": seconds,
        "total_seconds": time.perf_counter() - start, "versions": versions(),
        "command": request.get("command"), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "machine": {"device": str(model.device), "platform": platform.platform(),
                                             "torch_threads": _threads()},
        "layer_types": [f"sliding window {window}" if (window := model.sliding_window(layer)) else "global"
                        for layer in range(model.n_layers)],
    }
    summary, all_results = merge_scans(previous, summary, results)
    write_report(out, summary, all_results, examples=_examples(model))
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    return results, failed


def scan_model(model, out: str | Path, *, probes: str | list[str] | None = None, quick: bool = False,
               overwrite: bool = False, params: dict | None = None, **settings) -> dict[str, HeadScores]:
    """`headlab scan` from Python: run the probes on `model` and write the scan folder `out` (heads.csv, scan.json,
    report.html) as the command does. `model`: a HeadModel, or anything `headlab.load_model` takes, a transformers
    model or TransformerLens bridge in memory included. probes: names (default: all); params: {probe: {parameter:
    value}}; settings: the command's other options (seed, max_context, threads, device, dtype, ...; device, dtype
    and device_map only for a model loaded by name). Returns {probe: HeadScores}; a probe that failed is named in
    scan.json's `failed`."""
    from headlab.loading import load_model
    from headlab.model import HeadModel

    if isinstance(probes, (list, tuple)):
        probes = ",".join(probes)
    by_name = isinstance(model, (str, os.PathLike))
    if not by_name:
        placed = sorted(key for key in ("device", "dtype", "device_map") if settings.get(key) is not None)
        if placed or settings.get("engine", "local") != "local":
            raise InputError(f"{', '.join(placed) or 'engine'} applies only to a model loaded by name; a model in "
                             "memory is scanned here, by the local engine, where and as it is (Ray workers load models "
                             "by name)")
        model = model if isinstance(model, HeadModel) else load_model(model)
    request = scan_request(str(model) if by_name else model.name, probes, params=params, quick=quick, **settings)
    request["command"] = f"headlab.scan({request['model']!r}, {str(out)!r}, ...)"
    out = Path(out)
    check_writable(out)
    previous = check_existing(out, request, overwrite)
    results, _ = run_scan(request, out, previous=previous, model=None if by_name else model)
    return results


def _report_resume(name: str, done: int, total: int, journal: Path) -> None:
    console.print(f"{name}: resuming, {done} of {total} units journaled in {journal}")


def _examples(model) -> list | None:
    """Every head's attention on the report's short example prompts (None when the model cannot give them)."""
    from headlab.viewer import head_examples

    try:
        return head_examples(model)
    except Exception as error:  # noqa: BLE001 - a report without examples beats no report
        errors.print(f"the head pages get no example attention: {escape(str(error))}")
        return None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def parse_device_map(text):
    """None, "auto"/"balanced"/"sequential", or a JSON object {module: device}."""
    if text is None or isinstance(text, dict) or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"--device-map takes auto, balanced, sequential or a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise InputError(f"--device-map takes auto, balanced, sequential or a JSON object, got {text!r}")
    return value


def make_engine(model_name: str, settings: ScanSettings):
    """The engine that runs the probes' units: here, or on a Ray cluster."""
    if settings.engine == "ray":
        from headlab.engines.ray import RayEngine

        return RayEngine(model_name, address=settings.address, workers=settings.workers,
                         threads_per_worker=settings.threads_per_worker, device=settings.device,
                         dtype=settings.dtype, device_map=parse_device_map(settings.device_map))
    from headlab.engines.local import LocalEngine

    return LocalEngine(threads=settings.threads)


def check_writable(out: Path) -> None:
    """Fail before any compute when the output folder cannot be written: try it in the nearest existing parent."""
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write the output folder {out}: it is a file")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:
        for folder in [parent] + ([out] if out.exists() else []):
            os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".headlab-write-check-"))
    except OSError as error:
        raise InputError(f"cannot write the output folder {out}: {error.strerror.lower()} in "
                         f"{out if out.exists() else parent}") from None


def _print_top(result: HeadScores, title: str, k: int) -> None:
    frame = result.top(k)
    table = Table(title=f"{title}: top {k} heads")
    columns = [c for c in frame.columns if c not in ("layer", "head", "overlaps_next") and not c.endswith(("_lo", "_hi"))
               and (c == "score" or not frame[c].equals(frame["score"]))]
    interval = "score_lo" in frame.columns
    for column in columns + (["95% interval", "overlaps next"] if interval else []):
        table.add_column(column, justify="right")
    for _, row in frame.iterrows():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        if interval:
            cells += [f"[{row['score_lo']:.3f}, {row['score_hi']:.3f}]", "yes" if row["overlaps_next"] else ""]
        table.add_row(*cells)
    console.print(table)


# ---- sweep -------------------------------------------------------------------------------------------------------

@app.command()
@with_settings(ScanSettings, {"quick": ["--quick/--full"]})
def sweep(
    models_: list[str] = typer.Argument(..., metavar="MODEL...", help="models to scan (as for `headlab scan`)"),
    out: Path = typer.Option(..., help="folder for one scan folder per model, atlas.html and atlas.csv"),
    probes: Optional[str] = typer.Option(None, help="comma-separated probes (default: all)"),
    set_: list[str] = typer.Option([], "--set", help="a probe parameter for every model (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="a TOML or JSON file of these options, for every model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace scan folders of other settings or parameters "
                                                              "(default: add the probes to them, or refuse)"),
    **options,
) -> None:
    """Scan several models and draw the cross-model head atlas (atlas.html, atlas.csv); on Ray (--engine ray) the
    models run side by side on one cluster."""
    from headlab.atlas import write_atlas
    from headlab.loading import check_model_name

    try:
        requests = {name: scan_request(name, probes, set_items=set_, config=config, **options) for name in models_}
        for name in models_:
            check_model_name(name)
        folders = {name: out / Path(name).name for name in models_}
        for folder in folders.values():
            check_writable(folder)
        previous = {name: check_existing(folders[name], requests[name], overwrite) for name in models_}
        scans, failed = run_sweep(requests, folders, previous)
        if not scans:
            raise InputError("every model failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        write_atlas(out, scans, failed)
    except HeadlabError as error:
        _fail(str(error))
    console.print(f"atlas: {(out / 'atlas.html').resolve()}")
    if failed:
        _fail(f"{len(failed)} model(s) failed ({', '.join(failed)}); the atlas lists them")


def run_sweep(requests: dict, folders: dict, previous: dict | None = None):
    """{model: (summary, results)} of the models whose scan finished, and {model: why} of the others; on Ray the
    models run side by side on one cluster (each with its own workers, waiting for room)."""
    from concurrent.futures import ThreadPoolExecutor

    from headlab.report import load_results

    def scan_one(name):
        run_scan(requests[name], folders[name], previous=(previous or {}).get(name))
        return load_results(folders[name])

    scans, failed = {}, {}
    settings = next(iter(requests.values()))["settings"]
    if settings.engine != "ray":
        for name in requests:
            try:
                scans[name] = scan_one(name)
            except HeadlabError as error:
                failed[name] = str(error)
        return scans, failed
    from headlab.engines.ray import import_ray, init

    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        init(**({"address": settings.address} if settings.address else
                {"num_cpus": settings.workers * settings.threads_per_worker}))
    try:
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = {name: pool.submit(scan_one, name) for name in requests}
            for name, future in futures.items():
                try:
                    scans[name] = future.result()
                except HeadlabError as error:
                    failed[name] = str(error)
    finally:
        if started:
            ray.shutdown()
    return scans, failed


# ---- probes, report, models ---------------------------------------------------------------------------------------

@app.command("probes")
def list_probes(name: Optional[str] = typer.Argument(None, help="one probe: each parameter on one line with its "
                                                               "default, quick value and description")) -> None:
    """List every probe: what it finds, its paper, its parameters with their defaults and quick values."""
    from headlab.probes import probes as registry

    try:
        known = registry()
        if name is not None and name not in known:
            raise InputError(f"unknown probe {name!r}; choose from {', '.join(known)}")
    except HeadlabError as error:
        _fail(str(error))
    if name is not None:
        probe = known[name]
        typer.echo(f"{probe.name}: {probe.description}\n{probe.paper}\n")
        for row in probe.describe_params():
            quick = "" if row["quick"] == row["default"] else f", quick {_short(json.dumps(row['quick']))}"
            typer.echo(f"{probe.name}.{row['name']} ({row['type']}, default {_short(json.dumps(row['default']))}{quick})"
                       + (f": {row['description']}" if row["description"] else ""))
        return
    for probe in known.values():
        table = Table(title=f"{probe.name} — {probe.description}", caption=probe.paper, title_justify="left")
        for column in ("parameter", "type", "default", "quick"):
            table.add_column(column)
        for row in probe.describe_params():
            quick = "" if row["quick"] == row["default"] else _short(row["quick"])
            table.add_row(f"{probe.name}.{row['name']}", escape(row["type"]), escape(_short(row["default"])),
                          escape(quick))
        console.print(table)


def _short(value, width: int = 48) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


@app.command()
def report(folder: Path = typer.Argument(..., help="a folder written by `headlab scan`"),
           plotly: str = typer.Option("inline", help="inline (the page works alone) or shared (one plotly.js beside "
                                                     "the scan folders, loaded by each report)")) -> None:
    """Re-render report.html (and heads.csv) from a scan folder's files."""
    from headlab.report import load_results, write_report

    try:
        summary, results = load_results(folder)
        write_report(folder, summary, results, plotly=plotly)
    except HeadlabError as error:
        _fail(str(error))
    console.print(f"report: {(folder / 'report.html').resolve()}")


@app.command()
def diff(first: Path = typer.Argument(..., help="a scan folder"), second: Path = typer.Argument(..., help="another "
         "scan folder (another model, seed, or quick against full)"),
         top: int = typer.Option(5, help="heads that moved most, per probe")) -> None:
    """Compare two scans: per probe (and score column), the Spearman rank correlation over the heads both have and
    the heads whose rank moved most."""
    from headlab.diff import compare_scans
    from headlab.report import load_results

    try:
        if top < 1:
            raise InputError(f"--top must be at least 1, got {top}")
        rows = compare_scans(load_results(first), load_results(second), top=top)
    except HeadlabError as error:
        _fail(str(error))
    for row in rows:
        moved = ", ".join(f"{m['name']} {m['rank_a']:g}->{m['rank_b']:g}" for m in row["moved"])
        typer.echo(f"{row['column']}: Spearman {row['spearman']:.3f} over {row['n']} heads; top-{top} shared "
                   f"{row['top_shared']}; moved most: {moved}")


@app.command()
def models() -> None:
    """List the model registry with installed and cached state."""
    from headlab.loading import models as registry

    table = Table(title="headlab models")
    for column in ("name", "installed", "cached", "description", "install"):
        table.add_column(column)
    for row in registry():
        table.add_row(row["name"], "yes" if row["installed"] else "no", "yes" if row["cached"] else "no",
                      row["description"], row["install"])
    console.print(table)


@app.command("kv")
@with_settings(KVSettings)
def kv(
    model: Optional[str] = typer.Argument(None, help="registry name, local Hugging Face folder or hub id; optional "
                                                     "with --config"),
    scores: Optional[Path] = typer.Option(None, help="scan folder (headlab scan --out), its heads.csv (pick the "
                                                     "probe's column with --column) or a HeadScores .csv"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: <scan folder>/kv, which the scan's report "
                                                  "then shows; kv-<model> for a .csv of scores)"),
    duo: Optional[Path] = typer.Option(None, help="also write each policy's DuoAttention pattern under this folder"),
    set_: list[str] = typer.Option([], "--set", help="a setting, e.g. --set fractions=0.25,0.5 (repeatable)"),
    config: Optional[Path] = typer.Option(None, help="a TOML or JSON file of these settings (a run's kv.json re-runs "
                                                     "that run)"),
    **options,
) -> None:
    """Evaluate full, streaming, score-ranked and random KV-cache policies on held-out NIAH tests; write kv.csv,
    kv.json (every setting), kv.tests.jsonl (resumable) and pareto.html; in a scan folder its report shows them."""
    from headlab.kv.run import run_kv
    from headlab.report import load_results, write_report

    try:
        model, scores, settings = kv_request(model, scores, set_, config, options)
        out, table = run_kv(model, scores, settings, out, duo)
        if out == scores / "kv" and (scores / "scan.json").exists():
            write_report(scores, *load_results(scores))
            console.print(f"report: {(scores / 'report.html').resolve()}")
    except HeadlabError as error:
        _fail(str(error))
    columns = ["policy", "length", "accuracy", "n_tests", "kv_fraction", "kv_fraction_measured", "decode_ms_per_token"]
    typer.echo(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    typer.echo(f"results: {(out / 'kv.csv').resolve()}")


def kv_request(model, scores, settings: list[str], config: Optional[Path], options: dict):
    """(model, scores, KVSettings) from a config file (TOML, or a run's kv.json), then --set, then options."""
    from headlab.settings import parse_setting

    file = {}
    if config is not None:
        file = read_file(config)
        unknown = sorted(set(file) - {"model", "scores", "settings", "policies", "evaluation", "summary"})
        if unknown:
            raise InputError(f"config {config} has unknown key(s) {', '.join(unknown)}; the keys are model, scores "
                             "and settings.<name>")
    values = dict(file.get("settings", {}))
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"--set takes setting=value (e.g. fractions=0.25,0.5), got {item!r}")
        values[key.strip()] = parse_setting("kv", KVSettings, key.strip(), text)
    values.update({k: v for k, v in options.items() if v is not None})
    model = model or file.get("model")
    scores = scores or (Path(file["scores"]) if file.get("scores") else None)
    if not model or scores is None:
        raise InputError("give a model and --scores (a scan folder or a scores .csv), or a --config that names them")
    return model, Path(scores), KVSettings.from_values(values)


if __name__ == "__main__":  # pragma: no cover
    app()
