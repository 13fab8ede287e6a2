"""Query-focused retrieval heads (QRHead; Zhang et al., EMNLP 2025, "Query-Focused Retrieval Heads Improve
Long-Context Reasoning and Re-ranking").

A prompt lists several passages, then a question that one of them answers. A head's query-focused retrieval score
for that question is the attention mass from the question's tokens to the relevant (gold) passage — summed over the
passage's keys, averaged over the question's tokens — minus the mass the same head puts there from a content-free
question ("N/A"), the paper's calibration; the probe's score is its mean over the questions that select heads.
The selected heads double as a training-free re-ranker (QRRetriever): a passage's score is the calibrated mass
summed over the heads, and the probe evaluates its top heads, random heads and all heads on held-out questions
whose passages never took part in the selection.

    table = scan(model)                       # pydoc sections: a question per section, asked among 10 passages
    table.meta["reranker"]                    # held-out top-1 accuracy: top heads, random heads, all heads

Each group of passages is prefilled once; its questions (and the null question) then run as one short batch over that
KV cache, and only the questions' attention rows are rebuilt (no N x N).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch
from headlab.kernels import expand_kv, visible_keys
from jaxtyping import Float, Int

from headlab.capture import AttentionEdit, editing
from headlab.data import haystack_text, read_jsonl
from headlab.errors import InputError
from headlab.probe import Probe, Role, Unit, iter_partials
from headlab.scores import HeadScores, head_name
from headlab.uncertainty import intervals, method

INTRO = "Here are some passages:\n\n"
MARKER = "[{index}]"
SEPARATOR = "\n\n"
ASK = "Please find the passage relevant to the following question.\nQuestion:"
QUESTION = "Which passage is about {title}?"
NULL_QUERY = "N/A"
QR_THRESHOLD = 0.1
GENERIC = {"the", "and", "for", "statement", "statements", "object", "objects", "overview", "examples", "example",
           "clause", "methods", "types", "type", "other", "special", "with"}


@dataclass(frozen=True)
class Passage:
    """A passage and the question it answers."""

    id: str
    text: str
    question: str


def pydoc_passages(min_words: int = 30) -> list[Passage]:
    """One passage per section of Python's pydoc topics (a heading underlined with *, =, - or ~): the section's prose
    without its heading, whitespace collapsed; the question asks which passage is about the heading. Kept: the first
    section of each heading whose body names at least one of the heading's own words (other than generic ones like
    "statement"), with at least `min_words` words."""
    lines = haystack_text().split("\n")
    starts = [i - 1 for i in range(1, len(lines))
              if re.fullmatch(r"([*=\-~^])\1{2,}", lines[i].strip()) and lines[i - 1].strip()]
    passages, seen = [], set()
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        title = lines[start].strip()
        body = " ".join(" ".join(lines[start + 2:end]).split())
        words = {w for w in re.findall(r"[a-z_]{3,}", title.lower()) if w not in GENERIC}
        if title in seen or len(body.split()) < min_words or not words & set(re.findall(r"[a-z_]{3,}", body.lower())):
            continue
        seen.add(title)
        passages.append(Passage(f"pydoc:{title}", body, QUESTION.format(title=title)))
    return passages


def load_passages(source) -> list[Passage]:
    """Passages from a JSONL path or records ({"id", "text", "question"}); None: the pydoc sections."""
    if source is None:
        return pydoc_passages()
    records = read_jsonl(source, required=("id", "text", "question")) if isinstance(source, str) else list(source)
    passages = [Passage(str(r["id"]), str(r["text"]), str(r["question"])) for r in records]
    if len({p.id for p in passages}) != len(passages):
        raise InputError("passage ids must be unique")
    return passages


@dataclass(frozen=True)
class Group:
    """Passages shown together in one prompt (in this order) and the questions asked over them (indices)."""

    split: str  # "select" (chooses heads) or "heldout" (evaluates them)
    passages: tuple[Passage, ...]


def groups(passages: list[Passage], *, n_passages: int, heldout: float, seed: int,
           max_groups: int | None = None) -> list[Group]:
    """Shuffle (seeded), cut into a selection half and a held-out half (passages never shared), and chunk each half
    into groups of `n_passages` (a short tail is dropped); at most `max_groups` per half."""
    order = np.random.default_rng(seed).permutation(len(passages))
    cut = round((1 - heldout) * len(passages))
    out = []
    for split, part in (("select", order[:cut]), ("heldout", order[cut:])):
        chunks = [part[i:i + n_passages] for i in range(0, len(part) - n_passages + 1, n_passages)]
        if not chunks:
            raise InputError(f"the {split} half has {len(part)} passages, fewer than the {n_passages} of one prompt")
        out += [Group(split, tuple(passages[i] for i in chunk)) for chunk in chunks[:max_groups]]
    return out


@dataclass
class GroupPrompt:
    """Token ids of a group's prompt up to the question, and each passage's key span in them."""

    ids: list[int]
    spans: list[tuple[int, int]]


def build_prompt(model, group: Group, passage_tokens: int) -> GroupPrompt:
    """[BOS] intro, "[i] passage" and a blank line for each passage (cut to `passage_tokens` tokens), the ask; spans exact by
    construction (ids joined piece by piece)."""
    ids = model.bos_ids + model.token_ids(INTRO)
    spans = []
    for i, passage in enumerate(group.passages):
        ids += model.token_ids(MARKER.format(index=i + 1))
        text = model.token_ids(" " + passage.text)[:passage_tokens]
        spans.append((len(ids), len(ids) + len(text)))
        ids += text + model.token_ids(SEPARATOR)
    return GroupPrompt(ids + model.token_ids(ASK), spans)


@torch.no_grad()
def query_masses(model, prompt: GroupPrompt, queries: list[str], *, backend: str = "auto"
                 ) -> Float[torch.Tensor, "query layer head passage"]:
    """Each query's mean attention per token on each passage, for every head. The group's prompt is prefilled once;
    the queries (" " + text each, right-padded) then run as one batch over that cache repeated, and each layer's
    attention rows of the real query tokens are rebuilt from q, k and the kernel's log-sum-exp. A layer that keeps
    fewer keys (a sliding window) is read at its own offset: the keys it dropped get no attention."""
    ids = torch.tensor([prompt.ids], device=model.device)
    cache = model.hf.base_model(input_ids=ids, use_cache=True).cache
    tokens = [model.token_ids(" " + query) for query in queries]
    width = max(map(len, tokens))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batch = torch.tensor([t + [pad] * (width - len(t)) for t in tokens], device=model.device)
    real = torch.tensor([[i < len(t) for i in range(width)] for t in tokens], device=model.device)  # [query, pos]
    n_keys = len(prompt.ids) + width
    q_pos = torch.arange(len(prompt.ids), n_keys, device=model.device)
    masses: dict[int, torch.Tensor] = {}

    def record(layer):
        def apply(q, k, v, out, stats, problem):
            k_pos = torch.arange(n_keys - k.shape[2], n_keys, device=q.device)
            raw = torch.einsum("bhqd,bhkd->bhqk", q.float(), expand_kv(k, q.shape[1]).float())
            probs = torch.exp(problem.logits(raw) - stats.lse[..., None])
            probs = probs * visible_keys(q_pos, k_pos, problem.causal, problem.window) * real[:, None, :, None]
            per_key = torch.zeros(*probs.shape[:2], n_keys, dtype=torch.float64, device=q.device)
            per_key[..., n_keys - k.shape[2]:] = probs.sum(2).double()  # [query, head, key]: summed over its rows
            masses[layer] = torch.stack([per_key[..., a:b].sum(-1) for a, b in prompt.spans], -1).cpu()
            return out
        return apply

    cache.batch_repeat_interleave(len(queries))
    edits = {layer: AttentionEdit(record(layer), want=("lse",)) for layer in range(model.n_layers)}
    with editing(model, edits):
        model.hf.base_model(input_ids=batch, cache=cache, use_cache=True)
    lengths = real.sum(1).double().cpu()
    return torch.stack([masses[layer] for layer in range(model.n_layers)], 1) / lengths[:, None, None, None]


# ---- the re-ranker ------------------------------------------------------------------------------------------

def rerank_accuracy(calibrated: Float[torch.Tensor, "query layer head passage"], gold: Int[torch.Tensor, "query"],
                    heads: list[tuple[int, int]]) -> dict:
    """QRRetriever with `heads`: a passage's score is its calibrated mass summed over the heads; top-1 accuracy and
    mean reciprocal rank of the gold passage (ties rank the gold passage last)."""
    index = torch.tensor(heads, dtype=torch.long)
    scores = calibrated[:, index[:, 0], index[:, 1]].sum(1)  # [query, passage]
    gold_score = scores.gather(1, gold[:, None])
    rank = (scores >= gold_score).sum(1)  # 1 = the gold passage alone on top
    return {"accuracy": float((rank == 1).double().mean()), "mrr": float((1.0 / rank).double().mean())}


# ---- the probe ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """passages: a JSONL path ({"id", "text", "question"}) or such records; None: one passage per section of Python's
    pydoc topics, its question "Which passage is about <heading>?". A prompt shows `n_passages` passages (each cut to
    `passage_tokens` tokens) and asks each one's question in turn. heldout: the share of passages (seeded) kept
    apart to evaluate the re-ranker; the rest select the heads. groups: at most this many prompts per half (None:
    all). top_heads: the re-ranker's heads (the paper's 16); random_draws: random sets of as many heads."""

    passages: str | tuple[dict, ...] | None = None
    n_passages: int = 10
    passage_tokens: int = 64
    heldout: float = 0.5
    groups: int | None = None
    top_heads: int = 16
    random_draws: int = 20
    null_query: str = NULL_QUERY
    seed: int = 0
    backend: str = "auto"


class QueryRetrieval(Probe):
    name = "query_retrieval"
    description = "query-focused retrieval heads: which heads attend from a question to the passage that answers it"
    paper = ("Zhang et al. 2025, Query-Focused Retrieval Heads Improve Long-Context Reasoning and Re-ranking "
             "(QRHead, EMNLP)")
    Params = Params
    order = 25
    quick = {"groups": 2, "passage_tokens": 48}
    needs_decoder = "reads attention from a question to the passages before it"
    min_context = 128
    columns = {
        "score": "query-focused retrieval score (QRHead): attention mass from the question's tokens to the passage "
                 "that answers it, minus that from a content-free question, mean over the selection questions",
        "accuracy": "how often the head alone ranks the right passage first (calibrated mass; selection questions)",
        "heldout_score": "the score on the held-out questions (passages never used to select heads)",
        "heldout_accuracy": "the head's own top-1 accuracy on the held-out questions",
    }
    signed = ("score", "heldout_score")
    roles = {"query-retrieval": Role()}  # cut at threshold()

    def threshold(self, scores):
        """A tenth of the question's attention on the right passage beyond a content-free question's."""
        return QR_THRESHOLD

    def validity(self, meta):
        reranker = meta["reranker"]
        return {"rests_on": f"{meta['n_select']} selection questions and {meta['n_heldout']} held-out questions "
                            f"(passages never shared between them), {meta['params']['n_passages']} passages per prompt",
                "baseline": f"the same head's attention from a content-free question ({meta['params']['null_query']!r});"
                            f" the re-ranker against {meta['params']['random_draws']} draws of random heads and "
                            f"chance {reranker['chance']:.2f}",
                "warning": (f"the top heads re-rank the held-out passages no better than chance "
                            f"({reranker['top']['accuracy']:.2f})") if reranker["top"]["accuracy"] <= reranker["chance"]
                else None}

    def check_params(self, params):
        if params.n_passages < 2 or params.passage_tokens < 1 or params.top_heads < 1 or params.random_draws < 0:
            raise InputError("query_retrieval needs n_passages >= 2, passage_tokens >= 1, top_heads >= 1 and "
                             "random_draws >= 0")
        if not 0 < params.heldout < 1 or (params.groups is not None and params.groups < 1):
            raise InputError(f"heldout must lie in (0, 1) and groups be at least 1, got {params.heldout}, "
                             f"{params.groups}")
        self.groups(params)
        return params

    def fit_context(self, params, model, max_context):
        limit = min(max_context, model.n_ctx)
        overhead = 48 + 8 * params.n_passages  # intro, passage markers, the ask and a question
        fitted = min(params.passage_tokens, (limit - overhead) // params.n_passages)
        if fitted < 8:
            raise InputError(f"{params.n_passages} passages do not fit in {limit} tokens; lower n_passages")
        return replace(params, passage_tokens=fitted)

    def groups(self, params) -> list[Group]:
        return groups(load_passages(params.passages), n_passages=params.n_passages, heldout=params.heldout,
                      seed=params.seed, max_groups=params.groups)

    def plan(self, model, params):
        return [Unit(f"{group.split}-{i:04d}", {"index": i}) for i, group in enumerate(self.groups(params))]

    def run(self, model, params, unit):
        group = self.groups(params)[unit.data["index"]]
        prompt = build_prompt(model, group, params.passage_tokens)
        masses = query_masses(model, prompt, [p.question for p in group.passages] + [params.null_query],
                              backend=params.backend)
        return {"split": group.split, "questions": masses[:-1], "null": masses[-1],
                "ids": [p.id for p in group.passages], "n_tokens": len(prompt.ids)}

    def merge(self, model, params, partials):
        calibrated = {"select": [], "heldout": []}
        ids = {"select": [], "heldout": []}
        for _, partial in iter_partials(partials):
            questions = torch.tensor(partial["questions"], dtype=torch.float64)
            calibrated[partial["split"]].append(questions - torch.tensor(partial["null"], dtype=torch.float64))
            ids[partial["split"]] += partial["ids"]
        columns = {}
        for split in ("select", "heldout"):
            masses = torch.cat(calibrated[split])  # [question, layer, head, passage]; gold = the question's own
            gold = torch.arange(masses.shape[0]) % params.n_passages
            own = masses.gather(-1, gold[:, None, None, None].expand(*masses.shape[:-1], 1))[..., 0]
            hit = (masses.argmax(-1) == gold[:, None, None]).double()
            columns[split] = (own.mean(0), hit.mean(0), masses, gold, own, hit)
        score, accuracy, _, _, own, hit = columns["select"]
        bounds = intervals({"score": own, "accuracy": hit, "heldout_score": columns["heldout"][4],
                            "heldout_accuracy": columns["heldout"][5]})  # per question: [question, layer, head]
        table = HeadScores.from_matrix(score, None, accuracy=accuracy, heldout_score=columns["heldout"][0],
                                       heldout_accuracy=columns["heldout"][1], **bounds)
        heldout, gold = columns["heldout"][2], columns["heldout"][3]
        meta = self.meta(model, params, n_select=len(ids["select"]), n_heldout=len(ids["heldout"]),
                         select_passages=ids["select"], heldout_passages=ids["heldout"],
                         reranker=self.reranker(model, params, table, heldout, gold),
                         uncertainty=method("questions (selection half; held-out half for heldout_*)",
                                            len(ids["select"])))
        return HeadScores(table.frame, meta)

    def reranker(self, model, params, table, heldout, gold) -> dict:
        """Held-out top-1 accuracy and MRR of the re-ranker with the top heads, with random heads (as many, seeded
        draws) and with all heads; chance is one over the passages."""
        n_heads = model.n_layers * model.n_heads
        k = min(params.top_heads, n_heads)
        top = table.heads(k)
        everyone = [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]
        rng = np.random.default_rng(params.seed)
        draws = [rerank_accuracy(heldout, gold, [everyone[i] for i in rng.choice(n_heads, size=k, replace=False)])
                 for _ in range(params.random_draws)]
        return {"k": k, "heads": [head_name(*h) for h in top], "chance": 1 / params.n_passages,
                "top": rerank_accuracy(heldout, gold, top), "all": rerank_accuracy(heldout, gold, everyone),
                "random": {"accuracy": [d["accuracy"] for d in draws], "mrr": [d["mrr"] for d in draws],
                           "mean_accuracy": float(np.mean([d["accuracy"] for d in draws])) if draws else None,
                           "mean_mrr": float(np.mean([d["mrr"] for d in draws])) if draws else None},
                "n_questions": int(len(gold))}


PROBE = QueryRetrieval()


def scan(model, *, progress: bool = True, journal=None, quick: bool = False, **params) -> HeadScores:
    """Query-focused retrieval score of every head (selection questions) with its held-out twin; meta["reranker"]
    holds the re-ranker's held-out accuracy with the top heads, random heads and all heads. See Params."""
    return PROBE.scan(model, progress=progress, journal=journal, quick=quick, **params)
