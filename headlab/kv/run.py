"""One run of `headlab kv`: settings (a frozen dataclass, from options, `--set`, a config file or a run's kv.json),
a scan's scores -> policies (full, streaming, score-ranked, random) -> the evaluation on held-out NIAH tests -> files.

    settings = KVSettings(fractions=(0.25, 0.5), lengths=(2048,), tests=8)
    out = run_kv("smollm2-135m", "scan-smollm2-135m", settings)        # kv.csv, kv.json, kv.tests.jsonl, pareto.html

kv.json records the model, the scores and every setting, so `headlab kv --config <out>/kv.json` re-runs the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from headlab.errors import InputError
from headlab.niah import MAX_NEW_TOKENS
from headlab.settings import ENGINES, check_constraints, check_value, constrained, option_label


@dataclass(frozen=True)
class KVSettings:
    """Everything a `headlab kv` run takes besides the model and the scores; checked once, on construction."""

    probe: str = constrained("retrieval", help="which probe's scores rank the KV heads")
    column: str = constrained("score", help="the scores' column that ranks the KV heads (a scan's heads.csv: e.g. "
                                            "retrieval)")
    aggregate: str = constrained("max", choices=("max", "mean"), help="max or mean over the query heads of a KV "
                                                                      "group (GQA)")
    fractions: tuple[float, ...] = constrained((0.25, 0.5, 0.75), between=(0, 1),
                                               help="comma-separated fractions of KV heads kept full")
    sink: int = constrained(4, at_least=0, help="first positions every streaming head keeps")
    window: int = constrained(128, at_least=1, help="last positions every streaming head keeps")
    lengths: tuple[int, ...] = constrained((2048,), at_least=1, help="comma-separated prompt lengths in tokens")
    tests: int = constrained(8, at_least=1, help="held-out NIAH tests per length")
    variant: str = constrained("single", choices=("single", "multi"),
                               help="single (one needle) or multi (distractor needles, one asked)")
    mode: str = constrained("stream", choices=("stream", "full"),
                            help="stream (policy from the first token) or full (exact prefill, then evict)")
    seed: int = constrained(0, help="seed of the random-head control")
    max_new_tokens: int = constrained(MAX_NEW_TOKENS, at_least=1, help="longest answer, in tokens (the NIAH answer "
                                                                       "rule's)")
    device: str = constrained("cpu", help="auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    decode_threads: Optional[int] = constrained(None, at_least=1, help="torch threads while decoding (default: "
                                                                       "unchanged)")
    engine: str = constrained("local", choices=ENGINES, help="local or ray (the tests run on Ray workers)")
    address: Optional[str] = constrained(None, help="Ray cluster: auto or HOST:PORT (default: a local cluster)")
    workers: int = constrained(2, at_least=1, help="Ray workers, each loading the model once")
    threads_per_worker: int = constrained(1, at_least=1, help="CPU threads (num_cpus) per Ray worker")

    def __post_init__(self):
        for key in ("fractions", "lengths"):
            if not getattr(self, key):
                raise InputError(f"--{key} is empty")
        check_constraints(self, option_label)

    @classmethod
    def from_values(cls, values: dict) -> "KVSettings":
        """Settings from option, `--set`, TOML or JSON values, each checked against its field's type."""
        from headlab.probe import normalise

        return cls(**{key: normalise(check_value("kv", cls, key, value)) for key, value in values.items()})


def load_scores(path: Path, probe: str, column: str):
    """HeadScores ranked by `column`, from a scan folder (`<dir>/probes/<probe>.csv`), a HeadScores .csv, or a scan's
    heads.csv (one column per probe and statistic: `column` names it, e.g. retrieval)."""
    from headlab.scores import HeadScores

    path = Path(path)
    if path.is_dir():
        table = path / "probes" / f"{probe}.csv"
        if not table.exists():
            found = sorted(p.stem for p in (path / "probes").glob("*.csv")) if (path / "probes").is_dir() else []
            raise InputError(f"{path} holds no {probe} scores (probes found: {', '.join(found) or 'none'}); "
                             f"run `headlab scan --probes {probe}` or pass --probe")
    elif path.suffix == ".csv" and path.is_file():
        table = path
    else:
        raise InputError(f"--scores {path} is neither a scan folder nor a HeadScores .csv file")
    if table.name == "heads.csv":  # a scan's table of every probe: the asked column becomes the score
        import pandas as pd

        try:
            header = pd.read_csv(table, nrows=0).columns
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise InputError(f"{table} is not a readable heads table ({str(error).splitlines()[0]})") from None
        if column not in header:
            raise InputError(f"{table} has no column {column!r}; its score columns are "
                             f"{', '.join(c for c in header if c not in ('layer', 'head', 'name'))}")
        frame = pd.read_csv(table, usecols=["layer", "head", "name", column]).rename(columns={column: "score"})
        scores = HeadScores(frame, {"probe": column, "source": str(table)})
        column = "score"
    else:
        scores = HeadScores.load(table)
    if column not in scores.frame.columns:
        raise InputError(f"the {probe} scores in {table} have no column {column!r}; their columns are "
                         f"{', '.join(scores.frame.columns)}")
    return scores, column


def run_kv(model_name: str, scores: Path, settings: KVSettings, out: Path | None = None, duo: Path | None = None):
    """Evaluate the policies; write kv.csv, kv.json (every setting: `--config kv.json` re-runs it),
    kv.tests.jsonl (the journal: a rerun resumes) and pareto.html into `out`. Returns (out, summary table)."""
    from headlab.files import atomic_write_text
    from headlab.kv import evaluate as ev
    from headlab.kv import interchange
    from headlab.kv import policy as kvp
    from headlab.loading import check_model_name

    table_scores, column = load_scores(scores, settings.probe, settings.column)
    check_model_name(model_name)
    out = Path(out) if out is not None else (Path(scores) / "kv" if Path(scores).is_dir()
                                             else Path(f"kv-{Path(model_name).name}"))
    import headlab

    loaded = headlab.load_model(model_name, device=settings.device)
    if not loaded.is_causal:
        raise InputError(f"{loaded.name} is a bidirectional encoder; KV-cache policies need a causal model")
    too_long = [n for n in settings.lengths if n > loaded.n_ctx]
    if too_long:
        raise InputError(f"--lengths {too_long} exceed {loaded.name}'s context of {loaded.n_ctx}")
    s = settings
    ranked = [kvp.from_scores(loaded, table_scores, f, column=column, aggregate=s.aggregate, sink=s.sink,
                              window=s.window) for f in s.fractions]
    policies = [kvp.full(), kvp.streaming(s.sink, s.window), *ranked,
                *[kvp.random(loaded, f, seed=s.seed, sink=s.sink, window=s.window) for f in s.fractions]]
    task = ev.heldout_task(lengths=tuple(s.lengths))
    engine = None
    if s.engine == "ray":
        from headlab.engines.ray import RayEngine

        engine = RayEngine(model_name, address=s.address, workers=s.workers, threads_per_worker=s.threads_per_worker,
                           device=s.device)
    out.mkdir(parents=True, exist_ok=True)
    try:
        table = ev.evaluate(loaded, policies, task, ev.subsample(task, s.tests), variant=s.variant, mode=s.mode,
                            journal=out / "kv.tests.jsonl", max_new_tokens=s.max_new_tokens,
                            decode_threads=s.decode_threads, engine=engine)
    finally:
        if engine is not None:
            engine.close()
    atomic_write_text(out / "kv.csv", table.to_csv(index=False))
    meta = {"model": model_name, "scores": str(scores), "settings": dataclasses.asdict(s),
            "policies": {p.name: p.describe(loaded) for p in policies},
            "evaluation": "datasets/needles_heldout.jsonl over the evaluation half of the haystack",
            "summary": json.loads(table.to_json(orient="records"))}
    atomic_write_text(out / "kv.json", json.dumps(meta, indent=1, default=str))
    ev.pareto_figure(table, title=f"KV policies — {loaded.name}").write_html(out / "pareto.html")
    if duo is not None:
        for p in ranked:
            interchange.export_duo(loaded, p, duo / p.name.replace(" ", "_").replace("%", "pct"))
    return out, table
