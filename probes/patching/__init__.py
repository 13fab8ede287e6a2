"""Circuit patching on the hook path: activation patching, path patching, attribution patching (nodes and edges,
EAP) and direct logit attribution, batched.

Activation patching runs a *base* input with one activation replaced by its value on a *source* input and measures a
scalar metric of the logits. Denoising patches clean into corrupted (base = corrupted), noising corrupted into clean.
Results are `values` (the raw metric, as `transformer_lens.patching` returns it) and `normalised`
(0 = corrupted, 1 = clean). Many patches run as one batch, and a patch at layer L starts from the base run's
residual entering L: blocks below L are never recomputed (`BlockReplay`).

    task = ioi_task(model, n=16)
    z = activation_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric)
    z.normalised                                  # [layer, head]
    attribution_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric)
    path_patch(model, task.clean, task.corrupted, senders=[(9, 6)], component="q", metric=task.metric)
    direct_logit_attribution(model, task.clean, task.answer, task.wrong)
    scan(model, task)                             # HeadScores: patching, attribution, DLA per head

A package: `tasks` (clean / corrupted pairs and their metric), `replay` (the engine that resumes a base run from any
block), `methods` (the patching methods and DLA) and `probe` (the patching probe).
"""

from headlab.probes.patching.methods import (
    COMPONENTS,
    DEFAULT_OVER,
    PatchResult,
    activation_patch,
    attribution_patch,
    direct_logit_attribution,
    edge_attribution,
    head_writes,
    norm_gain,
    path_patch,
    split_qkv_input,
    write_names,
)
from headlab.probes.patching.probe import PROBE, Params, Patching, scan
from headlab.probes.patching.replay import BlockReplay
from headlab.probes.patching.tasks import IOI_NAMES, Metric, PatchingTask, ioi_task, logit_diff, mcqa_task
from headlab.scores import head_name, parse_head  # noqa: F401 - part of this package's API (notebooks, studies)
from headlab.stats import agreement  # noqa: F401 - part of this package's API (notebooks, studies)

__all__ = ["COMPONENTS", "DEFAULT_OVER", "IOI_NAMES", "PROBE", "BlockReplay", "Metric", "Params", "PatchResult",
           "Patching", "PatchingTask", "activation_patch", "attribution_patch", "direct_logit_attribution",
           "edge_attribution", "head_writes", "ioi_task", "logit_diff", "mcqa_task", "norm_gain", "path_patch", "scan",
           "split_qkv_input", "write_names"]
