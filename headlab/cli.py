"""`headlab scan`, `headlab report`, `headlab models`."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from headlab.errors import HeadlabError, InputError
from headlab.scores import HeadScores, versions

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Find and explain what attention heads do.")
console = Console()
errors = Console(stderr=True)


def _detectors(model, quick: bool, seed: int, max_context: int) -> HeadScores:
    from headlab.probes import detectors

    seq_len = min(25 if quick else 100, max(2, (max_context - 1) // 2))
    return detectors.scan(model, seq_len=seq_len, n_prompts=8 if quick else 32, seed=seed)


PROBES: dict[str, Callable[..., HeadScores]] = {"detectors": _detectors}


def _fail(message: str) -> None:
    errors.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=1)


@app.command()
def scan(
    model: str = typer.Argument(..., help="registry name (see `headlab models`), local Hugging Face folder or hub id"),
    probes: str = typer.Option("detectors", help=f"comma-separated probes: {', '.join(PROBES)}"),
    out: Optional[Path] = typer.Option(None, help="output folder (default scan-<model>)"),
    max_context: int = typer.Option(4096, help="longest prompt any probe may build, in tokens"),
    seed: int = typer.Option(0, help="seed for every random choice"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    quick: bool = typer.Option(False, help="the quick profile: fewer and shorter prompts"),
    top: int = typer.Option(10, help="heads to print per probe"),
) -> None:
    """Run probes on a model and write heads.csv, scan.json and report.html."""
    from headlab.model import load_model
    from headlab.report import write_report

    names = [p.strip() for p in probes.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROBES]
    try:
        if not names or unknown:
            raise InputError(f"unknown probe(s) {unknown or probes!r}; choose from {', '.join(PROBES)}")
        out = out or Path(f"scan-{Path(model).name}")
        partial = out.with_name(f".{out.name}.partial")  # finished probes of an interrupted run
        start = time.perf_counter()
        loaded = load_model(model, device=device)
        console.print(f"{loaded}  (loaded in {loaded.load_info.seconds:.1f} s)")
        results, seconds = {}, {}
        for name in names:
            saved = partial / name
            if saved.with_suffix(".csv").exists():
                results[name] = HeadScores.load(saved)
                seconds[name] = results[name].meta.get("seconds", 0.0)
                console.print(f"{name}: resumed from {saved.with_suffix('.csv')}")
                continue
            t = time.perf_counter()
            results[name] = PROBES[name](loaded, quick, seed, max_context)
            seconds[name] = time.perf_counter() - t
            results[name].save(saved)
        summary = {
            "model": model, "geometry": loaded.geometry, "load": vars(loaded.load_info), "probes": names,
            "params": {"quick": quick, "max_context": max_context, "device": device}, "seed": seed,
            "seconds": seconds, "total_seconds": time.perf_counter() - start, "versions": versions(),
        }
        write_report(out, summary, results)
        shutil.rmtree(partial, ignore_errors=True)
    except HeadlabError as error:
        _fail(str(error))
    for name, result in results.items():
        _print_top(result, name, top)
    console.print(f"report: {(out / 'report.html').resolve()}")


def _print_top(result: HeadScores, title: str, k: int) -> None:
    frame = result.top(k)
    table = Table(title=f"{title}: top {k} heads")
    columns = [c for c in frame.columns
               if c not in ("layer", "head") and (c == "score" or not frame[c].equals(frame["score"]))]
    for column in columns:
        table.add_column(column, justify="right")
    for _, row in frame.iterrows():
        table.add_row(*[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    console.print(table)


@app.command()
def report(folder: Path = typer.Argument(..., help="a folder written by `headlab scan`")) -> None:
    """Re-render report.html (and heads.csv) from a scan folder's files."""
    from headlab.report import load_results, write_report

    try:
        summary, results = load_results(folder)
        write_report(folder, summary, results)
    except HeadlabError as error:
        _fail(str(error))
    console.print(f"report: {(folder / 'report.html').resolve()}")


@app.command()
def models() -> None:
    """List the model registry with installed and cached state."""
    from headlab.model import models as registry

    table = Table(title="headlab models")
    for column in ("name", "installed", "cached", "description", "install"):
        table.add_column(column)
    for row in registry():
        table.add_row(row["name"], "yes" if row["installed"] else "no", "yes" if row["cached"] else "no",
                      row["description"], row["install"])
    console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
