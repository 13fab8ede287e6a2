"""Reading data: headlab's own files in `datasets/` (installed as `headlab.datasets`), the user's JSONL and text."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from headlab.errors import InputError


def dataset_path(name: str) -> Path:
    """Path of one of headlab's data files, e.g. dataset_path("needles.jsonl")."""
    path = Path(str(resources.files("headlab.datasets").joinpath(name)))
    if not path.is_file():
        raise InputError(f"headlab has no data file {name!r}")
    return path


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Records of a JSONL file (one JSON object per line, blank lines skipped), each holding `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number} is not valid JSON ({error.msg})") from None
        missing = [key for key in required if key not in record] if isinstance(record, dict) else list(required)
        if missing:
            raise InputError(f"{path}:{number} lacks the field(s) {', '.join(missing)}")
        records.append(record)
    if not records:
        raise InputError(f"{path} holds no records")
    return records


def haystack_text(path: str | Path | None = None) -> str:
    """Long English prose: the user's text file, or by default Python's own `pydoc_data.topics`
    (the language reference's topics, ~110k tokens, installed with every Python)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"haystack file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    if not text.strip():
        raise InputError(f"the haystack {'file ' + str(path) if path else 'text'} is empty")
    return text


def haystack_sentences(count: int, seed: int = 0, min_chars: int = 40, max_chars: int = 200) -> list[str]:
    """`count` seeded prose sentences of the default haystack: paragraphs that start at the margin (not code or
    grammar), hard line breaks joined, split after '.', '!' or '?'."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", haystack_text())
                  if p.strip() and not p.startswith((" ", "*", ">>>", "|"))]
    candidates = [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p) if min_chars <= len(s) <= max_chars]
    if count > len(candidates):
        raise InputError(f"the haystack has {len(candidates)} such sentences; asked for {count}")
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(candidates))[:count]
    return [candidates[i] for i in order]
