"""headlab probes: one module per method, each defining PROBE (a headlab.probe.Probe descriptor) and a one-line
`scan(model, ...) -> HeadScores`; and the registry that finds them (and probes defined outside headlab).

    from headlab.probes import probes, get_probe
    probes()                     # {"detectors": <probe detectors: ...>, "flow": ..., ...}
    get_probe("retrieval").describe_params()
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from headlab.errors import InputError
from headlab.probe import Probe

_REGISTERED: dict[str, Probe] = {}
_OWN: dict[str, Probe] | None = None
PLUGINS_ENV = "HEADLAB_PROBES"  # comma-separated modules that define PROBE (or probes registered on import)


def register(probe: Probe) -> Probe:
    """Make a probe defined outside headlab (a module of yours) known to the CLI, the report and the engines."""
    if not isinstance(probe, Probe):
        raise InputError(f"register() takes a Probe instance, got {type(probe).__name__}")
    _REGISTERED[probe.name] = probe
    return probe


def probes() -> dict[str, Probe]:
    """Every probe: headlab's own (the PROBE of each module in headlab.probes), then the ones registered by
    `register`, by the modules named in $HEADLAB_PROBES, and by installed packages' "headlab.probes" entry points."""
    global _OWN
    if _OWN is None:  # headlab's own modules and installed plugins: found once per process
        _OWN = {}
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            probe = getattr(importlib.import_module(f"{__name__}.{info.name}"), "PROBE", None)
            if isinstance(probe, Probe):  # a module, or a package (patching) that defines PROBE
                _OWN[probe.name] = probe
        from importlib.metadata import entry_points

        for entry in entry_points(group="headlab.probes"):
            register(entry.load())
    named = {}  # the modules $HEADLAB_PROBES names now: read at each call, so unsetting it drops them
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        probe = _plugin_probe(module)
        if probe is not None:
            named[probe.name] = probe
    everything = {**_OWN, **_REGISTERED, **named}
    return dict(sorted(everything.items(), key=lambda item: (item[1].order, item[0])))


def _plugin_probe(module: str) -> Probe | None:
    """The PROBE of a module named in $HEADLAB_PROBES (None when it only registers probes on import)."""
    try:
        loaded = importlib.import_module(module)
    except ImportError as error:
        raise InputError(f"cannot import the probe module {module!r} named in ${PLUGINS_ENV}: {error}") from None
    probe = getattr(loaded, "PROBE", None)
    return probe if isinstance(probe, Probe) else None


def get_probe(name: str) -> Probe:
    """A probe by name; InputError lists the names."""
    known = probes()
    if name not in known:
        raise InputError(f"unknown probe {name!r}; choose from {', '.join(known)}")
    return known[name]
