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
from jaxtyping import Float

from headlab.capture import AttentionEdit, editing
from headlab.errors import InputError
from headlab.kernels import visible_keys
from headlab.progress import progress_bar
from headlab.scores import HeadScores, head_name, versions
from headlab.tasks import LETTERS, MCQAItem, load_mcqa

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
    ids = ([model.bos_token_id] if model.bos_token_id is not None else []) + model.token_ids(
        template.question.format(question=item.question))
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


def _pre_rope_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """Per layer, the modules whose outputs are q and k right before RoPE (q_norm / k_norm where the model has them)."""
    layers = [m for m in model.hf.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if len(layers) != model.n_layers:
        raise InputError(f"{model.name}: found {len(layers)} attention modules with q_proj/k_proj, expected "
                         f"{model.n_layers}; QK-scores need a decoder with separate q and k projections")
    return [((m.q_norm, m.k_norm) if hasattr(m, "q_norm") else (m.q_proj, m.k_proj)) for m in layers]


def letter_token_ids(model, n: int) -> list[int]:
    """The token the model would emit for each option letter after "Answer:": " A", " B", ... (or "A", "B", ...
    where the spaced forms do not start with distinct tokens)."""
    for prefix in (" ", ""):
        ids = [model.token_ids(prefix + LETTERS[i])[0] for i in range(n)]
        if len(set(ids)) == n:
            return ids
    raise InputError(f"{model.name}'s tokenizer does not give the option letters distinct tokens")


@torch.no_grad()
def qk_scores(model, prompts: list[MCQAPrompt], *, batch_size: int = 16, progress: bool = False) -> dict:
    """Every head's scores of every option: {"pre_newline", "post_newline", "pre_letter", "post_letter",
    "attn_newline", "attn_letter": [L, H, items, options]} and "letters" [items, options] (the logit of each
    option's letter, " A", " B", ..., after the prompt: the baseline). Items of a batch share one forward
    (right-padded: causal attention keeps the padding out of every real token)."""
    if not model.is_causal:
        raise InputError("QK-scores read the last prompt token of a decoder; encoders are not supported")
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
    group = model.n_heads // model.n_kv_heads
    pre: dict[int, dict] = {layer: {} for layer in range(model.n_layers)}
    post: dict[int, dict] = {}

    def option_products(q_last, k_all, positions):
        """q_last [b, h, d]; k_all [b, kv, n, d] -> raw products [b, h, options] with the key at positions."""
        k_opt = k_all[rows[:, None], :, positions].transpose(1, 2)  # [b, kv, options, d]
        k_opt = k_opt.repeat_interleave(group, dim=1)
        return torch.einsum("bhd,bhod->bho", q_last.float(), k_opt.float())

    def record_post(layer):
        def apply(q, k, v, attn_out, stats, geometry):
            q_last = q[rows, :, last]  # [b, h, d]
            scale = geometry["scale"] if geometry["scale"] is not None else q.shape[-1] ** -0.5
            lse = stats.lse[rows, :, last]  # [b, h]
            post[layer] = {}
            for key, positions in keys.items():
                raw = option_products(q_last, k, positions)
                logits = raw * scale
                if geometry["softcap"] is not None:
                    logits = torch.tanh(logits / geometry["softcap"]) * geometry["softcap"]
                visible = torch.stack([visible_keys(last[i:i + 1], positions[i], geometry["causal"],
                                                    geometry["window"])[0] for i in range(len(batch))])
                post[layer][key] = (raw, torch.exp(logits - lse[..., None]) * visible[:, None, :])
            return attn_out
        return apply

    def record_pre(layer, which):
        def hook(module, args, output):
            if output.ndim == 4:  # q_norm / k_norm run on [b, heads, n, d] (Gemma3)
                output = output.transpose(1, 2)
            pre[layer][which] = output.reshape(output.shape[0], output.shape[1], -1, model.d_head)  # [b, n, heads, d]
        return hook

    with ExitStack() as stack:
        for layer, (q_module, k_module) in enumerate(_pre_rope_modules(model)):
            stack.callback(q_module.register_forward_hook(record_pre(layer, "q")).remove)
            stack.callback(k_module.register_forward_hook(record_pre(layer, "k")).remove)
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
    return (scores.argmax(-1) == answers).double().mean(-1)


def _prompts(model, items, template) -> list[MCQAPrompt]:
    return [build_prompt(model, item, template, f"item {i + 1}") for i, item in enumerate(items)]


def permuted(items: list[MCQAItem], shift: int) -> list[MCQAItem]:
    """Options rotated by `shift` (a cyclic permutation); the answer index follows its option."""
    out = []
    for item in items:
        k = len(item.options)
        options = tuple(item.options[(i - shift) % k] for i in range(k))
        out.append(MCQAItem(item.question, options, (item.answer + shift) % k))
    return out


def scan(model, items: list[MCQAItem] | str, *, template: Template = Template(), key: str = "newline",
         rope: str = "pre", validation: float = 0.5, seed: int = 0, permutations: bool = True,
         batch_size: int = 16, progress: bool = True) -> HeadScores:
    """Per-head QK-score accuracy on a validation split (score) and attention-score accuracy (attn_accuracy);
    the best validation head of each is evaluated on the test split against the letter-logit baseline
    (meta["test"]); with `permutations`, every cyclic order of the options is scored too (meta["permutations"])."""
    if key not in KEYS or rope not in ROPE:
        raise InputError(f"key must be one of {KEYS} and rope one of {ROPE}, got {key!r}, {rope!r}")
    items = load_mcqa(items) if isinstance(items, str) else list(items)
    if len(items) < 4:
        raise InputError(f"need at least 4 items for a validation and a test split, got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    cut = max(1, min(len(items) - 1, round(validation * len(items))))
    val, test = order[:cut], order[cut:]
    scores = qk_scores(model, _prompts(model, items, template), batch_size=batch_size, progress=progress)
    answers = torch.tensor([item.answer for item in items])
    qk, attn = scores[f"{rope}_{key}"], scores[f"attn_{key}"]
    qk_val, attn_val = head_accuracy(qk[:, :, val], answers[val]), head_accuracy(attn[:, :, val], answers[val])
    best_qk = divmod(int(qk_val.flatten().argmax()), model.n_heads)
    best_attn = divmod(int(attn_val.flatten().argmax()), model.n_heads)
    baseline = scores["letters"].argmax(-1)
    test_meta = {
        "n_validation": len(val), "n_test": len(test),
        "baseline": float((baseline[test] == answers[test]).double().mean()),
        "qk_head": head_name(*best_qk), "qk": float(head_accuracy(qk[best_qk][None, None][:, :, test],
                                                                   answers[test])),
        "attn_head": head_name(*best_attn), "attn": float(head_accuracy(attn[best_attn][None, None][:, :, test],
                                                                         answers[test])),
        "chance": float(np.mean([1 / (len(item.options) + len(template.extra)) for item in items])),
    }
    meta = {"probe": "qk_score", "model": model.name, "method": "Tulchinskii et al. 2024, QK-score",
            "key": key, "rope": rope, "template": vars(template), "seed": seed, "n_items": len(items),
            "test": test_meta, "versions": versions()}
    if permutations:
        meta["permutations"] = permutation_robustness(model, items, template, best_qk, best_attn, key, rope,
                                                      batch_size)
    return HeadScores.from_matrix(qk_val, meta, attn_accuracy=attn_val,
                                  test_accuracy=head_accuracy(qk[:, :, test], answers[test]),
                                  test_attn_accuracy=head_accuracy(attn[:, :, test], answers[test]))


def permutation_robustness(model, items, template, qk_head, attn_head, key="newline", rope="pre",
                           batch_size: int = 16) -> dict:
    """Accuracy under every cyclic permutation of the options and answer agreement: the fraction of items whose
    chosen option (its text) is the same under all of them; for the baseline and the two heads."""
    n_options = len(items[0].options)
    chosen = {"baseline": [], "qk": [], "attn": []}
    accuracy = {"baseline": [], "qk": [], "attn": []}
    for shift in range(n_options):
        shifted = permuted(items, shift)
        scores = qk_scores(model, _prompts(model, shifted, template), batch_size=batch_size)
        answers = torch.tensor([item.answer for item in shifted])
        picks = {"baseline": scores["letters"].argmax(-1), "qk": scores[f"{rope}_{key}"][qk_head].argmax(-1),
                 "attn": scores[f"attn_{key}"][attn_head].argmax(-1)}
        for name, pick in picks.items():
            accuracy[name].append(float((pick == answers).double().mean()))
            chosen[name].append([item.options[int(p)] if int(p) < len(item.options) else "<extra>"
                                 for item, p in zip(shifted, pick)])
    agreement = {name: float(np.mean([len(set(column)) == 1 for column in zip(*picks_by_shift)]))
                 for name, picks_by_shift in chosen.items()}
    return {"accuracy": accuracy, "agreement": agreement}
