"""Parameter values from text and files: `--set probe.key=value` strings and TOML / JSON values, checked against a
dataclass's field types (a probe's Params, or any settings dataclass)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from headlab.errors import InputError


def _hint(owner: str, kind: type, key: str):
    hints = typing.get_type_hints(kind)
    if key not in hints:
        raise InputError(f"{owner} has no parameter {key!r}; its parameters are {', '.join(hints)}")
    return hints[key]


def parse_setting(owner: str, kind: type, key: str, text: str) -> Any:
    """The value of `--set <owner>.<key>=<text>` for the dataclass `kind`, coerced to the field's type: numbers,
    booleans, comma lists for tuples, `none` for optional values; InputError names the parameter and what it takes."""
    hint = _hint(owner, kind, key)
    try:
        return _coerce(text, hint)
    except ValueError:
        raise InputError(f"{owner}.{key} takes {type_name(hint)}, not {text!r}") from None


def check_value(owner: str, kind: type, key: str, value: Any) -> Any:
    """A value from a config file (TOML or JSON types) checked against the field's type; strings are parsed as
    --set parses them."""
    if isinstance(value, str):
        return parse_setting(owner, kind, key, value)
    hint = _hint(owner, kind, key)
    if not _fits(value, hint):
        raise InputError(f"{owner}.{key} takes {type_name(hint)}, not {value!r}")
    return value


def _fits(value: Any, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in args)
    if annotation is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0] if args else Any) for v in value)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _coerce(text: str, annotation) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null", ""):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(text, option)
            except ValueError:
                continue
        raise ValueError(text)
    if origin in (tuple, list):
        item = args[0] if args else str
        return tuple(_coerce(part, item) for part in text.split(",") if part.strip())
    if annotation is bool:
        if text.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if text.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if annotation in (int, float):
        return annotation(text)
    if annotation is str:
        return text
    if annotation is dict or origin is dict:
        return json.loads(text)
    raise ValueError(text)


def type_name(annotation) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


ENGINES = ("local", "ray")


def constrained(default, *, choices: tuple | None = None, at_least: float | None = None,
                between: tuple[float, float] | None = None, help: str | None = None):
    """A dataclass field with its constraints declared beside its default (checked once, by `check_constraints`):
    `choices` it must be one of, `at_least` a lower bound, `between` an inclusive range; a tuple value is checked
    item by item, None (an optional field left unset) passes."""
    metadata = {key: value for key, value in (("choices", choices), ("at_least", at_least), ("between", between),
                                               ("help", help)) if value is not None}
    return dataclasses.field(default=default, metadata=metadata)


def check_constraints(instance, label: Callable[[str], str]) -> None:
    """InputError (one sentence) for the first field of `instance` outside its declared constraints; `label(name)`
    names the field as the user wrote it (e.g. --max-new-tokens, or retrieval.lengths)."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if value is None or not {"choices", "at_least", "between"} & set(f.metadata):
            continue
        for item in value if isinstance(value, tuple) else (value,):
            if "choices" in f.metadata and item not in f.metadata["choices"]:
                raise InputError(f"{label(f.name)} must be one of {', '.join(map(str, f.metadata['choices']))}, got "
                                 f"{item!r}")
            if "at_least" in f.metadata and item < f.metadata["at_least"]:
                raise InputError(f"{label(f.name)} must be at least {f.metadata['at_least']}, got {item}")
            if "between" in f.metadata and not f.metadata["between"][0] <= item <= f.metadata["between"][1]:
                low, high = f.metadata["between"]
                raise InputError(f"{label(f.name)} must lie in [{low}, {high}], got {item}")


def option_label(name: str) -> str:
    """A settings field as its command-line option: max_new_tokens -> --max-new-tokens."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class ScanSettings:
    """How a scan (and each scan of a sweep) runs: one typed object, from options, a config file or scan.json."""

    seed: int = constrained(0, help="seed of every probe that draws at random")
    max_context: int = constrained(4096, at_least=1, help="longest prompt any probe may build, in tokens")
    device: str = constrained("cpu", help="auto (CUDA, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    dtype: Optional[str] = constrained(None, help="float32, float16 or bfloat16, read straight into it (default: "
                                                  "float32)")
    device_map: Optional[str] = constrained(None, help="accelerate device map for models bigger than one device: "
                                                       "auto, or a JSON object {module: device}")
    quick: bool = constrained(False, help="each probe's quick profile: fewer, shorter prompts")
    engine: str = constrained("local", choices=ENGINES, help="local or ray")
    address: Optional[str] = constrained(None, help="Ray cluster: auto or HOST:PORT (default: a local cluster)")
    workers: int = constrained(2, at_least=1, help="Ray workers, each loading the model once")
    threads_per_worker: int = constrained(1, at_least=1, help="CPU threads (num_cpus) per Ray worker")
    threads: Optional[int] = constrained(None, at_least=1, help="torch threads of a local scan (default: torch's); a "
                                                                "table is bit-identical across engines at equal "
                                                                "threads per process")

    def __post_init__(self):
        from headlab.loading import check_device, check_dtype

        check_constraints(self, option_label)
        check_device(self.device)
        check_dtype(self.dtype)

    @classmethod
    def from_values(cls, values: dict, where: str = "settings") -> "ScanSettings":
        """Settings from TOML / JSON / option values, each checked against its field's type."""
        return cls(**{key: check_value(where, cls, key, value) for key, value in values.items()})


SCAN_SETTINGS = tuple(f.name for f in dataclasses.fields(ScanSettings))
