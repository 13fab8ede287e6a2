"""HeadScores: one row per (layer, head), the table every probe returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from headlab.errors import InputError
from headlab.files import atomic_write_text
from headlab.heads import head_name, parse_head  # noqa: F401 - also part of this module's API


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    import importlib.metadata as md

    out = {}
    for package in ["headlab", "torch", "transformers", "transformer-lens", "triton"]:
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


class HeadScores:
    """A probe's result: a DataFrame with columns `layer, head, name, score` (+ probe columns) and `meta`.

    Rows are sorted by (layer, head); `score` is the probe's main number, higher = more of the behaviour.
    """

    def __init__(self, frame: pd.DataFrame, meta: dict[str, Any] | None = None):
        missing = {"layer", "head", "score"} - set(frame.columns)
        if missing:
            raise InputError(f"a HeadScores frame needs the columns layer, head and score; {sorted(missing)} missing")
        for key in ("layer", "head"):
            values = pd.to_numeric(frame[key], errors="coerce")
            if values.isna().any() or (values % 1 != 0).any() or (values < 0).any():
                raise InputError(f"a HeadScores frame's {key} column must hold whole numbers >= 0 in every row; "
                                 f"{int(values.isna().sum())} row(s) are empty or not numbers")
        frame = frame.sort_values(["layer", "head"]).reset_index(drop=True)
        frame["layer"] = frame["layer"].astype(int)
        frame["head"] = frame["head"].astype(int)
        if "name" not in frame.columns:
            frame.insert(2, "name", [head_name(layer, head) for layer, head in zip(frame["layer"], frame["head"])])
        self.frame = frame
        self.meta = dict(meta or {})

    @classmethod
    def from_matrix(
        cls,
        score: Float[torch.Tensor, "layer head"] | np.ndarray,
        meta: dict[str, Any] | None = None,
        **columns: Float[torch.Tensor, "layer head"] | np.ndarray,
    ) -> "HeadScores":
        """Build from a [n_layers, n_heads] score matrix and optional extra matrices of the same shape."""
        score = np.asarray(torch.as_tensor(score).detach().cpu().double())
        if score.ndim != 2:
            raise InputError(f"scores must be a [n_layers, n_heads] matrix, got shape {tuple(score.shape)}")
        n_layers, n_heads = score.shape
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        data = {"layer": layer.ravel(), "head": head.ravel(), "score": score.ravel()}
        for key, value in columns.items():
            value = np.asarray(torch.as_tensor(value).detach().cpu().double())
            if value.shape != score.shape:
                raise InputError(f"column {key!r} has shape {tuple(value.shape)}, not {tuple(score.shape)}")
            data[key] = value.ravel()
        return cls(pd.DataFrame(data), meta)

    # ---- views -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.frame["layer"].max()) + 1

    @property
    def n_heads(self) -> int:
        return int(self.frame["head"].max()) + 1

    def to_frame(self) -> pd.DataFrame:
        """A copy of the table."""
        return self.frame.copy()

    def matrix(self, column: str = "score") -> np.ndarray:
        """[n_layers, n_heads] array of one column (NaN where a head has no row)."""
        out = np.full((self.n_layers, self.n_heads), np.nan)
        out[self.frame["layer"].to_numpy(), self.frame["head"].to_numpy()] = self.frame[column].to_numpy()
        return out

    def top(self, k: int = 10, by: str = "score") -> pd.DataFrame:
        """The k rows with the highest `by`, best first; where `by` has a confidence interval (`<by>_lo`, `<by>_hi`),
        `overlaps_next` flags a head whose interval overlaps the next head's (their order is not established)."""
        if by not in self.frame.columns:
            raise InputError(f"no column {by!r}; the columns are {list(self.frame.columns)}")
        ranked = self.frame.sort_values(by, ascending=False, kind="stable").reset_index(drop=True)
        lo, hi = f"{by}_lo", f"{by}_hi"
        if lo in ranked.columns and hi in ranked.columns:
            ranked["overlaps_next"] = (ranked[lo] <= ranked[hi].shift(-1)).fillna(False).astype(bool)
        return ranked.head(k)

    def heads(self, k: int = 10, by: str = "score") -> list[tuple[int, int]]:
        """The top-k heads as (layer, head) tuples."""
        top = self.top(k, by)
        return list(zip(top["layer"].tolist(), top["head"].tolist()))

    def figure(self, column: str = "score", title: str | None = None, signed: bool | None = None):
        """A plotly heatmap, layers down and heads across, hover shows L{l}H{h} and the value. A signed score (the
        probe's `signed` columns, recorded in meta) gets a diverging scale centred on 0, others Viridis."""
        import plotly.graph_objects as go

        if signed is None:
            signed = column in self.meta.get("signed", ())
        values = self.matrix(column)
        names = [[head_name(layer, head) for head in range(self.n_heads)] for layer in range(self.n_layers)]
        scale = {"colorscale": "RdBu", "reversescale": True, "zmid": 0.0} if signed else {"colorscale": "Viridis"}
        fig = go.Figure(go.Heatmap(
            z=values, x=list(range(self.n_heads)), y=list(range(self.n_layers)), text=names,
            hovertemplate="%{text}: %{z:.4f}<extra></extra>", colorbar={"title": column}, **scale,
        ))
        probe, model = self.meta.get("probe", "scores"), self.meta.get("model", "")
        fig.update_layout(
            title=title or f"{probe} {column} — {model}".strip(" —"),
            xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
            height=max(300, 18 * self.n_layers + 120), width=max(400, 40 * self.n_heads + 200),
        )
        return fig

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write `<path>.csv` and `<path>.json` (meta) atomically."""
        path = Path(path)
        atomic_write_text(path.with_suffix(".csv"), self.frame.to_csv(index=False))
        atomic_write_text(path.with_suffix(".json"), json.dumps(self.meta, indent=2, default=str))
        return path.with_suffix(".csv")

    @classmethod
    def load(cls, path: str | Path) -> "HeadScores":
        path = Path(path)
        meta_path = path.with_suffix(".json")
        table = path.with_suffix(".csv")
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if not table.read_bytes().endswith(b"\n"):
                raise InputError(f"{table} is not a HeadScores table: it ends in the middle of a row (a truncated "
                                 "file); write it again with HeadScores.save or rerun the scan")
            frame = pd.read_csv(table)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{table} is not a readable HeadScores table ({str(error).splitlines()[0]}); "
                             "write it again with HeadScores.save or rerun the scan") from None
        try:
            return cls(frame, meta)
        except InputError as error:
            raise InputError(f"{table} is not a HeadScores table: {error}") from None

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        probe, model = self.meta.get("probe", "?"), self.meta.get("model", "?")
        top = ", ".join(f"{r.name}={r.score:.3f}" for r in self.top(3).itertuples())
        return f"HeadScores({probe} on {model}: {len(self)} heads; top {top})"

    def _repr_html_(self) -> str:
        return f"<p><b>{self!r}</b></p>" + self.top(10).to_html(index=False, float_format="{:.4f}".format)


def head_roles(results: dict[str, "HeadScores"]) -> pd.DataFrame:
    """`layer, head, roles`: for every head, each role recorded in a table's meta["roles"] (Probe.role_lines) whose
    column exceeds its threshold, space-separated in the order of the tables and their roles ("" for none)."""
    found: dict[tuple[int, int], list[str]] = {}
    for scores in results.values():
        frame = scores.frame
        for head in zip(frame["layer"], frame["head"]):
            found.setdefault((int(head[0]), int(head[1])), [])
        for role, line in scores.meta.get("roles", {}).items():
            above = frame[frame[line["column"]] > line["threshold"]]
            for layer, head in zip(above["layer"], above["head"]):
                found[(int(layer), int(head))].append(role)
    heads = sorted(found)
    return pd.DataFrame({"layer": [h[0] for h in heads], "head": [h[1] for h in heads],
                         "roles": [" ".join(found[h]) for h in heads]})
