"""Patching tasks: clean / corrupted token rows of equal length, the answer and wrong tokens, and the metric (the
logit difference) that patching moves."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int

from headlab.errors import InputError, UnsupportedModelError
from headlab.tasks import MCQAItem, mcqa_example, option_token_ids


Metric = Callable[[torch.Tensor], torch.Tensor]
IOI_NAMES = ("John", "Mary", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Paul", "Anna", "Mark", "Kate")


def logit_diff(answer: Int[torch.Tensor, "batch"], wrong: Int[torch.Tensor, "batch"], pos: int = -1) -> Metric:
    """Metric: mean over the batch of logit[answer] - logit[wrong] at `pos`."""
    answer, wrong = torch.as_tensor(answer), torch.as_tensor(wrong)

    def per_prompt(logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch"]:
        rows = torch.arange(len(answer))
        last = logits[:, pos]
        return last[rows, answer] - last[rows, wrong]

    def metric(logits: Float[torch.Tensor, "batch pos vocab"]) -> torch.Tensor:
        return per_prompt(logits).mean()

    metric.last_position_only = pos == -1
    metric.per_prompt = per_prompt  # the batch mean's terms: per-prompt values for confidence intervals
    return metric


@dataclass
class PatchingTask:
    """Clean and corrupted prompts of equal length; `answer` is right on clean, `wrong` on corrupted."""

    name: str
    clean: Int[torch.Tensor, "batch pos"]
    corrupted: Int[torch.Tensor, "batch pos"]
    answer: Int[torch.Tensor, "batch"]
    wrong: Int[torch.Tensor, "batch"]
    info: dict = field(default_factory=dict)

    @property
    def metric(self) -> Metric:
        return logit_diff(self.answer, self.wrong)

    def accuracy(self, model) -> float:
        """Fraction of clean prompts whose last-position logit ranks `answer` above `wrong`."""
        with torch.no_grad():
            last = model.bridge(self.clean)[:, -1]
        rows = torch.arange(len(self.answer))
        return float((last[rows, self.answer] > last[rows, self.wrong]).double().mean())


def ioi_task(model, n: int = 16, seed: int = 0, template: int = 0, corruption: str = "swap",
             names: Sequence[str] = IOI_NAMES) -> PatchingTask:
    """Indirect object identification (TransformerLens' `IOIDataset`, one template, n prompts from n // 2 name
    pairs in both orders): the clean prompt ends "... gave the milk to"; the metric is logit(indirect object) -
    logit(subject). Corrupted twin: `swap` exchanges the two names (its answer is the clean subject; with both
    orders in the batch, denoising and noising effects then coincide exactly), `names` replaces both by two other
    names (the IOI paper's ABC-style corruption: no information about either name is left). `names`: the pool
    (names that are not one token with and without a leading space are left out)."""
    from transformer_lens.evals import IOIDataset

    templates = IOIDataset.get_default_templates()
    if not 0 <= template < len(templates):
        raise InputError(f"template must be 0..{len(templates) - 1}, got {template}")
    if corruption not in ("swap", "names"):
        raise InputError(f"corruption must be 'swap' or 'names', got {corruption!r}")
    names = [name for name in names if len(model.token_ids(name)) == len(model.token_ids(" " + name)) == 1]
    if len(names) < (2 if corruption == "swap" else 4):
        raise UnsupportedModelError(f"too few of the IOI names are single tokens for {model.name}: {names}")
    data = IOIDataset(model.tokenizer, templates=[templates[template]], names=names, num_samples=n,
                      symmetric=True, seed=seed)
    rng = random.Random(seed)
    clean, corrupted, answer, wrong = [], [], [], []
    for first, second in zip(data.samples[0::2], data.samples[1::2]):
        a, b = option_token_ids(model, (first["IO"], first["S"]))
        # the dataset's text ends with the answer; the prompt stops before it
        one, two = first["text"][:-len(first["IO"])], second["text"][:-len(second["IO"])]
        clean += [one, two]
        if corruption == "swap":
            corrupted += [two, one]
        else:
            pair = {first["IO"].strip(), first["S"].strip()}
            others = rng.sample([name for name in names if name not in pair], 2)
            corrupted += [_rename(text, dict(zip(sorted(pair), others))) for text in (one, two)]
        answer += [a, b]
        wrong += [b, a]
    return _pair_task(model, f"ioi (template {template}, {corruption})", clean, corrupted, answer, wrong,
                      {"template": templates[template], "corruption": corruption, "seed": seed})


def _rename(text: str, names: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(map(re.escape, names)) + r")\b", lambda m: names[m.group(0)], text)


def mcqa_task(model, items: Sequence[MCQAItem], seed: int = 0) -> PatchingTask:
    """Multiple choice: the corrupted prompt swaps the right option with another one (seeded), so the right letter
    changes; `answer` is the clean letter, `wrong` the corrupted one. Items whose swap changes the token length are
    left out (counted in `info["dropped"]`)."""
    rng = random.Random(seed)
    clean, corrupted, answer, wrong, dropped = [], [], [], [], 0
    for item in items:
        other = rng.choice([i for i in range(len(item.options)) if i != item.answer])
        options = list(item.options)
        options[item.answer], options[other] = options[other], options[item.answer]
        a, b = mcqa_example(item), mcqa_example(MCQAItem(item.question, tuple(options), other))
        if len(model.to_tokens(a.prompt)[0]) != len(model.to_tokens(b.prompt)[0]):
            dropped += 1
            continue
        letters = option_token_ids(model, a.options)
        clean.append(a.prompt), corrupted.append(b.prompt)
        answer.append(letters[item.answer]), wrong.append(letters[other])
    return _pair_task(model, "mcqa", clean, corrupted, answer, wrong, {"dropped": dropped, "seed": seed})


def _pair_task(model, name, clean, corrupted, answer, wrong, info) -> PatchingTask:
    if not clean:
        raise InputError(f"the {name} task has no prompt pair of equal token length")
    lengths = [(len(model.to_tokens(a)[0]), len(model.to_tokens(b)[0])) for a, b in zip(clean, corrupted)]
    equal = [a for a, b in lengths if a == b]
    if not equal:
        raise InputError(f"the {name} task has no prompt pair of equal token length")
    keep = [i for i, (a, b) in enumerate(lengths) if a == b == max(set(equal), key=equal.count)]
    info = {**info, "n_pairs": len(keep), "left_out_other_lengths": len(clean) - len(keep)}
    return PatchingTask(name, model.to_tokens([clean[i] for i in keep]), model.to_tokens([corrupted[i] for i in keep]),
                        torch.tensor([answer[i] for i in keep]), torch.tensor([wrong[i] for i in keep]), info)
