"""The patching probe: which heads carry a behaviour, by activation patching (denoising and noising), attribution
patching and DLA of each head, in units of `layers_per_unit` layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.errors import InputError
from headlab.probe import Probe, Unit, iter_partials
from headlab.probes.patching.methods import PatchResult, activation_patch, attribution_patch, direct_logit_attribution
from headlab.probes.patching.tasks import IOI_NAMES, PatchingTask, ioi_task, mcqa_task
from headlab.scores import HeadScores
from headlab.settings import constrained
from headlab.stats import agreement
from headlab.uncertainty import intervals, method
from headlab.tasks import load_mcqa


@dataclass(frozen=True)
class Params:
    """task: "ioi" (TransformerLens' IOI dataset: n prompts of one template; corruption "swap" or "names"),
    "mcqa" (items' right option swapped with another), or your own pair {"name", "clean", "corrupted", "answer",
    "wrong"} of equal-length token-id rows. memory_budget: bytes one patched forward may use."""

    task: str | dict = "ioi"
    n: int = 16
    seed: int = 0
    template: int = 0
    corruption: str = constrained("swap", choices=("swap", "names"))
    names: tuple[str, ...] = IOI_NAMES
    items: str = "mcqa_stated.jsonl"
    memory_budget: int = 2**30
    layers_per_unit: int = 6  # layers patched by one unit (each unit runs the clean and corrupted passes once)


class Patching(Probe):
    name = "patching"
    description = "which heads carry a behaviour: activation and attribution patching of each head's output, DLA"
    paper = "Wang et al. 2022 (IOI, path patching); Nanda 2023, Syed et al. 2023 (attribution patching)"
    Params = Params
    order = 60
    quick = {"n": 4}
    needs_decoder = "compares next-token logits"
    min_context = 32
    columns = {
        "score": "activation patching: the share of the clean - corrupted metric gap restored by patching the head's "
                 "clean output (z, all positions) into the corrupted run",
        "noising": "the share lost when the head's corrupted output is patched into the clean run",
        "attribution": "attribution patching's first-order estimate of the patching score",
        "dla": "direct logit attribution: the head's direct contribution to the logit difference (final norm scale "
               "from the run)",
    }

    signed = ("score", "noising", "attribution", "dla")

    def threshold(self, scores):
        """Patching the head restores a tenth of the clean - corrupted gap."""
        return 0.1

    def validity(self, meta):
        pairs = meta["task_info"].get("n_pairs", meta.get("uncertainty", {}).get("n"))
        clean, corrupted, accuracy = meta["clean_metric"], meta["corrupted_metric"], meta["accuracy"]
        warning = (f"the model fails the task on the clean prompts (clean logit difference {clean:.2f}, accuracy "
                   f"{accuracy:.2f} on {pairs} pairs): the scores say which heads carry the answer it gives, not a "
                   "circuit that solves the task" if clean <= 0 or accuracy < 0.5 else None)
        return {"rests_on": f"{pairs} prompt pairs ({meta['task']})",
                "baseline": f"clean logit difference {clean:.2f}, corrupted {corrupted:.2f}, clean accuracy "
                            f"{accuracy:.2f}", "warning": warning}

    def check_params(self, params):
        if not (isinstance(params.task, dict) or params.task in ("ioi", "mcqa")):
            raise InputError(f"task must be 'ioi', 'mcqa' or a clean/corrupted pair, got {params.task!r}")
        return params

    def task(self, model, params) -> PatchingTask:
        if isinstance(params.task, dict):
            pair = params.task
            return PatchingTask(str(pair.get("name", "custom")), torch.tensor(pair["clean"]),
                                torch.tensor(pair["corrupted"]), torch.tensor(pair["answer"]),
                                torch.tensor(pair["wrong"]), dict(pair.get("info", {})))
        if params.task == "mcqa":
            return mcqa_task(model, load_mcqa(params.items)[:params.n], seed=params.seed)
        return ioi_task(model, n=params.n, seed=params.seed, template=params.template, corruption=params.corruption,
                        names=params.names)

    def plan(self, model, params):
        step = max(1, params.layers_per_unit)
        return ([Unit(f"layers-{first:04d}", {"layers": list(range(first, min(first + step, model.n_layers)))})
                 for first in range(0, model.n_layers, step)] + [Unit("whole-attribution"), Unit("whole-dla")])

    def run(self, model, params, unit):
        task = self.task(model, params)
        if unit.key == "whole-attribution":
            attribution = attribution_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric)
            return {"effect": attribution.effect, "accuracy": task.accuracy(model),
                    "delta_pairs": attribution.meta["per_prompt_delta"]}
        if unit.key == "whole-dla":
            pairs = [direct_logit_attribution(model, task.clean[i:i + 1], task.answer[i:i + 1], task.wrong[i:i + 1])
                     ["heads"] for i in range(len(task.answer))]  # per prompt, for the interval
            return {"heads": direct_logit_attribution(model, task.clean, task.answer, task.wrong)["heads"],
                    "pairs": torch.stack(pairs)}
        layers = unit.data["layers"]
        common = dict(metric=task.metric, over=("head",), layers=layers, progress=False,
                      memory_budget=params.memory_budget)
        denoise = activation_patch(model, task.clean, task.corrupted, "z", **common)
        noise = activation_patch(model, task.clean, task.corrupted, "z", direction="noise", **common)
        return {"layers": layers, "denoise": denoise.values[layers], "noise": noise.values[layers],
                "clean": denoise.clean, "corrupted": denoise.corrupted,
                "denoise_pairs": denoise.meta["per_prompt"][layers], "noise_pairs": noise.meta["per_prompt"][layers],
                "clean_pairs": denoise.meta["clean_per_prompt"], "corrupted_pairs": denoise.meta["corrupted_per_prompt"]}

    def merge(self, model, params, partials):
        rows: dict[str, dict[int, list]] = {"denoise": {}, "noise": {}, "denoise_pairs": {}, "noise_pairs": {}}
        metrics = None
        for key, partial in iter_partials(partials):
            if key.startswith("layers-"):
                metrics = metrics or (partial["clean"], partial["corrupted"], partial["clean_pairs"],
                                      partial["corrupted_pairs"])
                for name in rows:
                    rows[name].update(zip(partial["layers"], partial[name]))
        clean, corrupted, clean_pairs, corrupted_pairs = metrics

        def effect(direction):
            values = torch.tensor([rows[direction][layer] for layer in range(model.n_layers)], dtype=torch.float32)
            return PatchResult("z", ("head",), values, clean, corrupted, direction).effect

        denoise, noise = effect("denoise"), effect("noise")
        attribution = torch.tensor(partials["whole-attribution"]["effect"], dtype=torch.float32)
        dla = torch.tensor(partials["whole-dla"]["heads"], dtype=torch.float32)
        task = self.task(model, params)
        meta = self.meta(model, params, task=task.name, task_info=task.info, clean_metric=clean,
                         corrupted_metric=corrupted, accuracy=partials["whole-attribution"]["accuracy"],
                         attribution_vs_activation=agreement(attribution, denoise),
                         uncertainty=method("prompt pairs (effects: ratio of sums over the pairs' clean - corrupted "
                                            "gaps)", len(clean_pairs)))
        return HeadScores.from_matrix(denoise.numpy(), meta, noising=noise.numpy(), attribution=attribution.numpy(),
                                      dla=dla.numpy(), **self.pair_intervals(model, partials, rows, clean_pairs,
                                                                        corrupted_pairs))

    def pair_intervals(self, model, partials, rows, clean_pairs, corrupted_pairs) -> dict:
        """Each column's interval over the prompt pairs: an effect is sum(change) / sum(clean - corrupted gap)."""
        def pairs(direction):  # [pairs, layer, head]
            return torch.tensor([rows[direction][layer] for layer in range(model.n_layers)],
                                dtype=torch.float64).permute(2, 0, 1)

        clean_pairs = torch.tensor(clean_pairs, dtype=torch.float64)[:, None, None]
        corrupted_pairs = torch.tensor(corrupted_pairs, dtype=torch.float64)[:, None, None]
        gap = (clean_pairs - corrupted_pairs).flatten()
        samples = {"score": pairs("denoise_pairs") - corrupted_pairs, "noising": clean_pairs - pairs("noise_pairs"),
                   "attribution": torch.tensor(partials["whole-attribution"]["delta_pairs"],
                                               dtype=torch.float64).permute(2, 0, 1),
                   "dla": torch.tensor(partials["whole-dla"]["pairs"], dtype=torch.float64)}
        return intervals(samples, weights={"score": gap, "noising": gap, "attribution": gap})


PROBE = Patching()


def scan(model, task: PatchingTask | None = None, *, progress: bool = True, journal=None, quick: bool = False,
         **params) -> HeadScores:
    """Per head: `score` = denoising effect of patching its output (z) at all positions (fraction of the clean -
    corrupted metric gap it restores), `noising` (fraction lost when the corrupted z is patched into the clean run),
    `attribution` (attribution patching's estimate of `score`) and `dla` (direct logit attribution to the logit
    difference on the clean prompts). Task: IOI by default, or a PatchingTask of yours. See Params."""
    if task is not None:
        params["task"] = {"name": task.name, "clean": task.clean.tolist(), "corrupted": task.corrupted.tolist(),
                          "answer": task.answer.tolist(), "wrong": task.wrong.tolist(), "info": task.info}
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
