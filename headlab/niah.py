"""The needle-in-a-haystack (NIAH) task: made-up facts hidden in long prose, the question about each, and prompts
whose answer span is exact by construction (token ids joined piece by piece, never searched for).

    task = niah_task(needles=4, lengths=(1024, 2048), depths=(0.1, 0.5, 0.9))   # pydoc haystack, seeded
    prompt = build_prompt(model, task, task.tests()[0])                           # ids, answer span, needle, document
    rouge1_recall("4817", response)                                               # the answer's ROUGE-1 recall

Used by the retrieval probe (Wu et al.), the vision probe's document span and the KV-cache policies' evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from jaxtyping import Int

from headlab.data import dataset_path, haystack_text, read_jsonl
from headlab.errors import InputError

INTRO = "Read the document below, then answer the question that follows it.\n\n"
QUESTION = "\n\nQuestion: {question} Answer in one short sentence."
ANSWER_CUE = "\nAnswer:"


@dataclass(frozen=True)
class Needle:
    """A made-up fact: `fact` holds `{answer}` once; `question` asks for the answer."""

    id: str
    fact: str
    question: str
    answer: str

    def __post_init__(self):
        if self.fact.count("{answer}") != 1 or not self.answer.strip():
            raise InputError(f"needle {self.id!r}: the fact must contain '{{answer}}' once and the answer must "
                             "not be empty")


@dataclass(frozen=True)
class NiahTest:
    """One prompt of the grid: a needle at `depth` (0 = start, 1 = end) of a `length`-token prompt whose
    haystack starts `offset` of the way into the haystack text's spare tokens."""

    needle: Needle
    length: int
    depth: float
    offset: float

    @property
    def key(self) -> str:
        return f"{self.needle.id}@{self.length}:{self.depth:.2f}"


@dataclass
class NiahTask:
    """A seeded grid of NIAH tests: every needle at every length and depth."""

    needles: list[Needle]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    haystack: str
    seed: int = 0
    chat_template: bool = True
    haystack_name: str = "pydoc_data.topics"
    intro: str = INTRO
    question_template: str = QUESTION
    answer_cue: str = ANSWER_CUE

    def tests(self) -> list[NiahTest]:
        rng = np.random.default_rng(self.seed)
        return [NiahTest(needle, int(length), float(depth), float(rng.random()))
                for needle in self.needles for length in self.lengths for depth in self.depths]

    def describe(self) -> dict:
        return {"needles": [n.id for n in self.needles], "lengths": list(self.lengths), "depths": list(self.depths),
                "seed": self.seed, "chat_template": self.chat_template, "haystack": self.haystack_name,
                "haystack_chars": len(self.haystack), "intro": self.intro, "question_template": self.question_template,
                "answer_cue": self.answer_cue}


def load_needles(path: str | Path | None = None) -> list[Needle]:
    """Needles from a JSONL file with fields id, fact, question, answer (default: headlab's own)."""
    records = read_jsonl(path or dataset_path("needles.jsonl"), required=("id", "fact", "question", "answer"))
    return [Needle(str(r["id"]), r["fact"], r["question"], str(r["answer"])) for r in records]


def niah_task(*, needles: int | list[Needle] | str | Path | None = None, lengths=(1024, 2048, 3072),
              depths=(0.1, 0.5, 0.9), haystack: str | Path | None = None, seed: int = 0,
              chat_template: bool = True, intro: str = INTRO, question_template: str = QUESTION,
              answer_cue: str = ANSWER_CUE) -> NiahTask:
    """A NIAH grid. needles: a number (that many of headlab's needles, seeded choice), a list, or a JSONL path.
    haystack: a text file (default: Python's pydoc_data.topics). The prompt is [template start] intro, haystack
    with the needle, question_template.format(question=...), then the chat template's generation prompt, or
    `answer_cue` for a model without a chat template."""
    if "{question}" not in question_template:
        raise InputError("question_template must contain '{question}'")
    if isinstance(needles, (str, Path)):
        chosen = load_needles(needles)
    elif isinstance(needles, list):
        chosen = needles
    else:
        available = load_needles()
        count = len(available) if needles is None else int(needles)
        if not 1 <= count <= len(available):
            raise InputError(f"asked for {count} needles; headlab has {len(available)} (or pass your own JSONL)")
        order = np.random.default_rng(seed).permutation(len(available))[:count]
        chosen = [available[i] for i in sorted(order)]
    if not chosen or not lengths or not depths:
        raise InputError("a NIAH task needs at least one needle, one length and one depth")
    if any(not 0.0 <= float(d) <= 1.0 for d in depths):
        raise InputError(f"depths must lie in [0, 1], got {list(depths)}")
    return NiahTask(chosen, tuple(int(n) for n in lengths), tuple(float(d) for d in depths),
                    haystack_text(haystack), seed, chat_template,
                    "pydoc_data.topics" if haystack is None else str(haystack), intro, question_template, answer_cue)


# ---- prompts ----------------------------------------------------------------------------------------------

@dataclass
class NiahPrompt:
    """Token ids of one test's prompt and where the answer sits in them: ids[answer[0]:answer[1]];
    `document` is the haystack with the needle in it (between the template's intro and the question)."""

    ids: Int[torch.Tensor, "pos"]
    answer: tuple[int, int]
    needle: tuple[int, int]
    document: tuple[int, int]


def _template(model, task: NiahTask) -> tuple[str, str]:
    """The text before and after the user's message: the chat template with its generation prompt, or for a
    model without one (a base model) nothing before and the task's answer cue after."""
    template = getattr(model.tokenizer, "chat_template", None)
    if not (task.chat_template and template):
        return "", task.answer_cue
    marker = "\x00HEADLAB\x00"
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                               add_generation_prompt=True)
    before, after = text.split(marker)
    return before, after


@lru_cache(maxsize=4)
def _haystack_ids(tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n], sentence_end [n] bool: the token ends a sentence, so a needle may follow it)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    ends = [bool(re.search(r"[.!?]\W*$", tokenizer.convert_tokens_to_string([p]))) for p in pieces]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(ends)


def build_prompt(model, task: NiahTask, test: NiahTest) -> NiahPrompt:
    """Join the token ids of the pieces: [BOS] template intro, haystack, needle (before answer, answer, after),
    haystack, question, template end. The answer span is exact by construction, never searched for."""
    if test.length > model.n_ctx:
        raise InputError(f"a {test.length}-token prompt exceeds {model.name}'s context of {model.n_ctx}")
    before, after = _template(model, task)
    head = model.token_ids(before + task.intro)
    if not before:  # a chat template starts with its own BOS
        head = model.bos_ids + head
    fact_before, fact_after = test.needle.fact.split("{answer}")
    space = " " if fact_before.endswith(" ") else ""  # a word's leading space belongs to its token
    needle_parts = [model.token_ids(" " + fact_before.rstrip(" ")), model.token_ids(space + test.needle.answer),
                    model.token_ids(fact_after + " ")]
    tail = model.token_ids(task.question_template.format(question=test.needle.question) + after)
    hay, sentence_end = _haystack_ids(model.tokenizer, task.haystack)
    n_hay = test.length - len(head) - len(tail) - sum(map(len, needle_parts))
    if n_hay < 1:
        raise InputError(f"a {test.length}-token prompt leaves no room for haystack around needle "
                         f"{test.needle.id!r}; use a longer length")
    if n_hay > len(hay):
        raise InputError(f"the haystack has {len(hay)} tokens, a {test.length}-token prompt needs {n_hay}; "
                         "give a longer haystack text")
    start = int(test.offset * (len(hay) - n_hay))
    window, ends = hay[start:start + n_hay], sentence_end[start:start + n_hay]
    cut = round(test.depth * n_hay)
    sentence_cuts = torch.nonzero(ends[:cut]).flatten()
    if test.depth > 0 and len(sentence_cuts):
        cut = int(sentence_cuts[-1]) + 1  # after the last sentence end at or before the depth
    parts = [head, window[:cut].tolist(), *needle_parts, window[cut:].tolist(), tail]
    ids = [i for part in parts for i in part]
    needle_start = len(head) + cut
    answer_start = needle_start + len(needle_parts[0])
    answer = (answer_start, answer_start + len(needle_parts[1]))
    needle = (needle_start, needle_start + sum(map(len, needle_parts)))
    if not answer[1] > answer[0] or ids[answer[0]:answer[1]] != needle_parts[1]:
        raise InputError(f"could not locate the answer of needle {test.needle.id!r} in its prompt")
    return NiahPrompt(torch.tensor(ids, dtype=torch.long), answer, needle, (len(head), len(ids) - len(tail)))



# ---- answers ------------------------------------------------------------------------------------------------

def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall: the fraction of the reference's words (lowercase alphanumeric runs, with multiplicity)
    found in the response, as rouge-score computes it without stemming."""
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    if not ref:
        raise InputError(f"the reference {reference!r} has no words to recall")
    got: dict[str, int] = {}
    for word in re.findall(r"[a-z0-9]+", response.lower()):
        got[word] = got.get(word, 0) + 1
    hit = 0
    for word in ref:
        if got.get(word, 0) > 0:
            got[word] -= 1
            hit += 1
    return hit / len(ref)


def stop_token_ids(model) -> set[int]:
    """EOS ids of the tokenizer and the generation config (end-of-turn tokens of chat models)."""
    ids = {model.tokenizer.eos_token_id}
    configured = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {int(i) for i in ids if i is not None}


MAX_NEW_TOKENS = 50  # the longest answer, in tokens
RETRIEVED_RECALL = 0.5  # a test counts as retrieved when the answer's ROUGE-1 recall exceeds this


def greedy_answer(model, step: Callable[[int], torch.Tensor], first_token: int, *,
                  max_new_tokens: int = MAX_NEW_TOKENS, on_token: Callable[[int, int], None] | None = None
                  ) -> list[int]:
    """The NIAH answer rule: greedy decoding that feeds `first_token` (the prompt's last token; the rest is the
    prefill), then each token it chose; `step(token)` returns the next logits [vocab] and `on_token(i, token)` sees
    each choice. Stops at an EOS / end-of-turn id, at a token that holds a newline, or after `max_new_tokens`."""
    stops, generated, token = stop_token_ids(model), [], first_token
    for index in range(max_new_tokens):
        token = int(step(token).argmax())
        generated.append(token)
        if on_token is not None:
            on_token(index, token)
        if token in stops or "\n" in model.tokenizer.decode(generated[-1:]):
            break
    return generated


def answer_text(model, generated: list[int]) -> str:
    """The decoded answer, stripped, as recall is computed on it."""
    return model.tokenizer.decode(generated, skip_special_tokens=True).strip()
