"""Select-and-copy heads: QK-score and attention score for multiple-choice QA (Tulchinskii et al. 2024,
"Listening to the Wise Few").

A model may know the answer to a multiple-choice question yet emit the wrong letter. Score each option, in one head,
by the query-key product between the final prompt token and the token that ends that option's line (variant: the
option's letter); the head predicts the option with the highest score. q and k are taken before the rotary embedding
(variant: after; for Gemma3 "before" means after its q/k norm, the vectors RoPE rotates); query head h reads KV head
h // group; the product is raw (no scaling). The attention score is the attention weight on those keys.

    items = load_mcqa("mcqa_stated.jsonl")
    table = scan(model, items)              # HeadScores: per-head validation accuracy; meta: test accuracies
    table.meta["test"]                      # baseline (letter logits) vs best head (QK and attention score)
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from headlab.kernels import expand_kv, visible_keys
from jaxtyping import Float, Int

from headlab.capture import AttentionEdit, editing
from headlab.errors import InputError, UnsupportedModelError
from headlab.hooks import attach, per_head
from headlab.hooks import name as hook_name
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.progress import progress_bar
from headlab.scores import HeadScores, head_name
from headlab.tasks import LETTERS, MCQAItem, load_mcqa, mcqa_item
from headlab.uncertainty import intervals, method

EXTRA_OPTIONS = ("None of the above", "I don't know")
KEYS = ("newline", "letter")
ROPE = ("pre", "post")


@dataclass(frozen=True)
class Template:
    """How an item becomes a prompt: question, then one line per option (starting with its letter), then the end."""

    question: str = "Question: {question}\n"
    option: str = "{letter}. {option}"
    end: str = "Answer:"
    extra: tuple[str, ...] = ()  # options appended to every item, e.g. EXTRA_OPTIONS

    def __post_init__(self):
        if "{question}" not in self.question:
            raise InputError("the template's question part needs '{question}'")
        if not self.option.startswith("{letter}") or "{option}" not in self.option:
            raise InputError("the template has no place for options: its option line must start with '{letter}' "
                             "and contain '{option}'")


@dataclass
class MCQAPrompt:
    """Token ids of one item's prompt and the key positions of its options (the query is the last token)."""

    ids: list[int]
    newline: list[int]
    letter: list[int]
    options: tuple[str, ...]
    answer: int


def build_prompt(model, item: MCQAItem, template: Template = Template(), where: str = "item") -> MCQAPrompt:
    """Join the token ids of the pieces, so each option's letter and line-ending newline have exact positions."""
    options = tuple(item.options) + tuple(template.extra)
    if len(options) < 2:
        raise InputError(f"{where} has fewer than two options")
    if len(options) > len(LETTERS):
        raise InputError(f"{where} has {len(options)} options; at most {len(LETTERS)} fit the letters")
    ids = model.bos_ids + model.token_ids(template.question.format(question=item.question))
    newline, letter = [], []
    for i, option in enumerate(options):
        letter_ids = model.token_ids(LETTERS[i])
        rest = model.token_ids(template.option.format(letter="", option=option))
        end = model.token_ids("\n")
        if not letter_ids or not end:
            raise InputError(f"{where}: cannot locate the tokens that end option {LETTERS[i]} for {model.name}")
        ids += letter_ids
        letter.append(len(ids) - 1)
        ids += rest + end
        newline.append(len(ids) - 1)
    ids += model.token_ids(template.end)
    return MCQAPrompt(ids, newline, letter, options, item.answer)


def letter_token_ids(model, n: int) -> list[int]:
    """The token the model would emit for each option letter after "Answer:": " A", " B", ... (or "A", "B", ...
    where the spaced forms do not start with distinct tokens)."""
    for prefix in (" ", ""):
        ids = [model.token_ids(prefix + LETTERS[i])[0] for i in range(n)]
        if len(set(ids)) == n:
            return ids
    raise UnsupportedModelError(f"{model.name}'s tokenizer does not give the option letters distinct tokens")


@torch.no_grad()
def qk_scores(model, prompts: list[MCQAPrompt], *, batch_size: int = 16, progress: bool = False) -> dict:
    """Every head's scores of every option: {"pre_newline", "post_newline", "pre_letter", "post_letter",
    "attn_newline", "attn_letter": [L, H, items, options]} and "letters" [items, options] (the logit of each
    option's letter, " A", " B", ..., after the prompt: the baseline). Items of a batch share one forward
    (right-padded: causal attention keeps the padding out of every real token)."""
    if not model.is_causal:
        raise UnsupportedModelError(f"QK-scores read the last prompt token of a decoder; {model.name} is an encoder")
    n_options = {len(p.options) for p in prompts}
    if len(n_options) != 1:
        raise InputError(f"all items must have the same number of options, got {sorted(n_options)}")
    letter_ids = letter_token_ids(model, n_options.pop())
    out: dict[str, list] = {name: [] for name in
                            ("pre_newline", "post_newline", "pre_letter", "post_letter", "attn_newline", "attn_letter",
                             "letters")}
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for batch in progress_bar(batches, "QK-scores", disable=not progress):
        for name, value in _batch_scores(model, batch, letter_ids).items():
            out[name].append(value)
    return {name: torch.cat(values, dim=-2 if name != "letters" else 0) for name, values in out.items()}


def _batch_scores(model, batch: list[MCQAPrompt], letter_ids: list[int]) -> dict:
    n = max(len(p.ids) for p in batch)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    tokens = torch.tensor([p.ids + [pad] * (n - len(p.ids)) for p in batch], device=model.device)
    rows = torch.arange(len(batch))
    last = torch.tensor([len(p.ids) - 1 for p in batch])
    keys = {"newline": torch.tensor([p.newline for p in batch]), "letter": torch.tensor([p.letter for p in batch])}
    pre: dict[int, dict] = {layer: {} for layer in range(model.n_layers)}
    post: dict[int, dict] = {}

    def option_products(q_last, k_all, positions):
        """q_last [b, h, d]; k_all [b, kv, n, d] -> raw products [b, h, options] with the key at positions."""
        k_opt = expand_kv(k_all[rows[:, None], :, positions].transpose(1, 2), model.n_heads)  # [b, h, options, d]
        return torch.einsum("bhd,bhod->bho", q_last.float(), k_opt.float())

    def record_post(layer):
        def apply(q, k, v, attn_out, stats, problem):
            q_last = q[rows, :, last]  # [b, h, d]
            lse = stats.lse[rows, :, last]  # [b, h]
            post[layer] = {}
            for key, positions in keys.items():
                raw = option_products(q_last, k, positions)
                visible = torch.stack([visible_keys(last[i:i + 1], positions[i], problem.causal, problem.window)[0]
                                       for i in range(len(batch))])
                post[layer][key] = (raw, torch.exp(problem.logits(raw) - lse[..., None]) * visible[:, None, :])
            return attn_out
        return apply

    def record_pre(layer, which, site):
        def keep(activation, point):  # the vectors RoPE rotates, kept as [b, n, heads, d]
            pre[layer][which] = per_head(model, site, activation)
        return keep

    sites = ("q_normed", "k_normed") if model.architecture.has_qk_norm else ("q", "k")
    hooks = [(hook_name(site, layer), record_pre(layer, which, site)) for layer in range(model.n_layers)
             for site, which in zip(sites, "qk")]
    with ExitStack() as stack:
        stack.enter_context(attach(model, hooks, tree="hf"))
        stack.enter_context(editing(model, {layer: AttentionEdit(record_post(layer), want=("lse",))
                                            for layer in range(model.n_layers)}))
        hidden = model.hf.base_model(input_ids=tokens).last_hidden_state[rows, last]
    letters = hidden @ model.hf.get_output_embeddings().weight[letter_ids].T
    result = {"letters": letters.float()}
    for key in KEYS:
        pre_scores = []
        for layer in range(model.n_layers):
            q_last = pre[layer]["q"][rows, last]  # [b, h, d]
            pre_scores.append(option_products(q_last, pre[layer]["k"].transpose(1, 2), keys[key]))
        by_layer = {"pre": pre_scores, "post": [post[layer][key][0] for layer in range(model.n_layers)],
                    "attn": [post[layer][key][1] for layer in range(model.n_layers)]}
        for name, values in by_layer.items():
            result[f"{name}_{key}"] = torch.stack(values).transpose(1, 2)  # [L, b, h, o] -> [L, h, b, o]
    return result


# ---- evaluation ---------------------------------------------------------------------------------------------

def head_accuracy(scores: Float[torch.Tensor, "L H items options"], answers: torch.Tensor) -> torch.Tensor:
    """[L, H] accuracy of each head's argmax option."""
    return pick_accuracy(scores.argmax(-1), answers)


def permuted(items: list[MCQAItem], shift: int) -> list[MCQAItem]:
    """Options rotated by `shift` (a cyclic permutation); the answer index follows its option."""
    out = []
    for item in items:
        k = len(item.options)
        options = tuple(item.options[(i - shift) % k] for i in range(k))
        out.append(MCQAItem(item.question, options, (item.answer + shift) % k))
    return out


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """items: a MCQA set of headlab's (mcqa_stated.jsonl, mcqa_arithmetic.jsonl, mcqa_facts.jsonl), a JSONL path
    ({"question", "options" or "choices", "answer"}) or such records; limit: the first N items only. key: the key
    position of each option ("newline" ends its line, "letter" is its letter); rope: products "pre" or "post" RoPE.
    validation: the share of items (seeded) on which each head's accuracy is measured and the best head chosen; the
    rest is the test split. permutations: also score every cyclic order of the options."""

    items: str | tuple[dict, ...] = "mcqa_stated.jsonl"
    limit: int | None = None
    question_template: str = Template.question
    option_template: str = Template.option
    end_template: str = Template.end
    extra_options: tuple[str, ...] = ()
    key: str = "newline"
    rope: str = "pre"
    validation: float = 0.5
    seed: int = 0
    permutations: bool = True
    batch_size: int = 16


class QKScore(Probe):
    name = "qk"
    description = "select-and-copy heads: which heads' query-key products pick the right option of a multiple-choice item"
    paper = "Tulchinskii et al. 2024, Listening to the Wise Few: Select-and-Copy Attention Heads for Multiple-Choice QA"
    Params = Params
    order = 40
    quick = {"limit": 40, "permutations": False}
    needs_decoder = "reads the last token's query"
    min_context = 64
    columns = {
        "score": "QK-score accuracy (Tulchinskii et al.): how often the head's query-key product from the last token "
                 "picks the right option's line end in multiple-choice questions (validation split)",
        "attn_accuracy": "the same with the attention weight instead of the raw product (validation split)",
        "test_accuracy": "QK-score accuracy on the test split",
        "test_attn_accuracy": "attention-score accuracy on the test split",
    }
    roles = {"select-and-copy": Role()}

    def threshold(self, scores):
        """Twice chance accuracy on the validation split (chance: one over the options)."""
        return min(1.0, 2 * scores.meta["test"]["chance"])

    def validity(self, meta):
        test = meta["test"]
        warning = (f"the model's own answer (letter logits) is at chance on the test split ({test['baseline']:.2f}, "
                   f"chance {test['chance']:.2f})" if test["baseline"] <= test["chance"] else None)
        return {"rests_on": f"{test['n_validation']} validation and {test['n_test']} test items",
                "baseline": f"letter logits {test['baseline']:.2f} on the test split, chance {test['chance']:.2f}; best "
                            f"head {test['qk_head']} {test['qk']:.2f}", "warning": warning}

    def check_params(self, params):
        if params.key not in KEYS or params.rope not in ROPE:
            raise InputError(f"key must be one of {KEYS} and rope one of {ROPE}, got {params.key!r}, {params.rope!r}")
        if len(self.items(params)) < 4:
            raise InputError(f"need at least 4 items for a validation and a test split, got {len(self.items(params))}")
        self.template(params)
        return params

    def items(self, params) -> list[MCQAItem]:
        items = (load_mcqa(params.items) if isinstance(params.items, str)
                 else [mcqa_item({k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}, f"item {i + 1}")
                       for i, record in enumerate(params.items)])
        return items[:params.limit] if params.limit is not None else items

    def template(self, params) -> Template:
        return Template(params.question_template, params.option_template, params.end_template, params.extra_options)

    def splits(self, params, n: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng(params.seed).permutation(n)
        cut = max(1, min(n - 1, round(params.validation * n)))
        return order[:cut], order[cut:]

    def plan(self, model, params):
        items = self.items(params)
        shifts = range(len(items[0].options)) if params.permutations else range(1)
        return [Unit(f"{shift:03d}-{start:06d}", {"shift": shift, "start": start,
                                                  "stop": min(len(items), start + params.batch_size)})
                for shift in shifts for start in range(0, len(items), params.batch_size)]

    def run(self, model, params, unit):
        start, stop = unit.data["start"], unit.data["stop"]
        items = permuted(self.items(params), unit.data["shift"])
        prompts = [build_prompt(model, item, self.template(params), f"item {i + 1}")
                   for i, item in enumerate(items) if start <= i < stop]
        scores = qk_scores(model, prompts, batch_size=params.batch_size)
        return {"qk": scores[f"{params.rope}_{params.key}"].argmax(-1), "attn": scores[f"attn_{params.key}"].argmax(-1),
                "letters": scores["letters"].argmax(-1)}

    def merge(self, model, params, partials):
        items = self.items(params)
        picks: dict[int, dict[str, list]] = {}
        for key, partial in iter_partials(partials):
            shift = picks.setdefault(int(key.split("-")[0]), {"qk": [], "attn": [], "letters": []})
            for name in shift:
                shift[name].append(torch.tensor(partial[name]))
        picks = {shift: {"qk": torch.cat(p["qk"], -1), "attn": torch.cat(p["attn"], -1),
                         "letters": torch.cat(p["letters"])} for shift, p in picks.items()}
        answers = torch.tensor([item.answer for item in items])
        val, test = self.splits(params, len(items))
        qk, attn = picks[0]["qk"], picks[0]["attn"]
        qk_val, attn_val = pick_accuracy(qk[:, :, val], answers[val]), pick_accuracy(attn[:, :, val], answers[val])
        best_qk = divmod(int(qk_val.flatten().argmax()), model.n_heads)
        best_attn = divmod(int(attn_val.flatten().argmax()), model.n_heads)
        test_meta = {
            "n_validation": len(val), "n_test": len(test),
            "baseline": float(pick_accuracy(picks[0]["letters"][test], answers[test])),
            "qk_head": head_name(*best_qk), "qk": float(pick_accuracy(qk[best_qk][test], answers[test])),
            "attn_head": head_name(*best_attn), "attn": float(pick_accuracy(attn[best_attn][test], answers[test])),
            "chance": float(np.mean([1 / (len(item.options) + len(params.extra_options)) for item in items])),
        }
        meta = self.meta(model, params, n_items=len(items), test=test_meta,
                         uncertainty=method("items (validation split; test split for test_*)", len(val)))
        if params.permutations:
            meta["permutations"] = permutation_robustness(items, picks, best_qk, best_attn)
        right = {"qk": (qk == answers).double().permute(2, 0, 1), "attn": (attn == answers).double().permute(2, 0, 1)}
        bounds = intervals({"score": right["qk"][val], "attn_accuracy": right["attn"][val],  # [items, L, H] each
                            "test_accuracy": right["qk"][test], "test_attn_accuracy": right["attn"][test]})
        return HeadScores.from_matrix(qk_val, meta, attn_accuracy=attn_val,
                                      test_accuracy=pick_accuracy(qk[:, :, test], answers[test]),
                                      test_attn_accuracy=pick_accuracy(attn[:, :, test], answers[test]), **bounds)


def pick_accuracy(picks: Int[torch.Tensor, "... items"], answers: Int[torch.Tensor, "items"]) -> torch.Tensor:
    """Accuracy of chosen options over the last axis (fp64)."""
    return (picks == answers).double().mean(-1)


def permutation_robustness(items: list[MCQAItem], picks: dict, qk_head, attn_head) -> dict:
    """Accuracy under every cyclic permutation of the options and answer agreement: the fraction of items whose
    chosen option (its text) is the same under all of them; for the baseline and the two heads."""
    chosen = {"baseline": [], "qk": [], "attn": []}
    accuracy = {"baseline": [], "qk": [], "attn": []}
    for shift in sorted(picks):
        shifted = permuted(items, shift)
        answers = torch.tensor([item.answer for item in shifted])
        by_name = {"baseline": picks[shift]["letters"], "qk": picks[shift]["qk"][qk_head],
                   "attn": picks[shift]["attn"][attn_head]}
        for name, pick in by_name.items():
            accuracy[name].append(float(pick_accuracy(pick, answers)))
            chosen[name].append([item.options[int(p)] if int(p) < len(item.options) else "<extra>"
                                 for item, p in zip(shifted, pick)])
    agreement = {name: float(np.mean([len(set(column)) == 1 for column in zip(*picks_by_shift)]))
                 for name, picks_by_shift in chosen.items()}
    return {"accuracy": accuracy, "agreement": agreement}


PROBE = QKScore()


def scan(model, items: list[MCQAItem] | str = "mcqa_stated.jsonl", *, template: Template | None = None,
         progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Per-head QK-score accuracy on a validation split (score) and attention-score accuracy (attn_accuracy);
    the best validation head of each is evaluated on the test split against the letter-logit baseline
    (meta["test"]); with `permutations`, every cyclic order of the options is scored too (meta["permutations"]).
    See Params."""
    if not isinstance(items, str):
        params["items"] = [{"question": i.question, "options": list(i.options), "answer": i.answer} for i in items]
    else:
        params["items"] = items
    if template is not None:
        params.update(question_template=template.question, option_template=template.option,
                      end_template=template.end, extra_options=list(template.extra))
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
