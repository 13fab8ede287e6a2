"""The coverage matrix: every supported model type, as a tiny random model built from its transformers config class,
(a) loads from a safetensors folder and from memory, (b) gives the same logits through headlab's attention seam, Hugging
Face eager attention and the TransformerLens bridge, (c) has kernel statistics equal to the fp64 statistics of its own
eager attention probabilities, (d) comes back bit for bit from ablation and scaling, (e) runs every probe's small
profile or is refused in one sentence, (f) on five families, ranks a planted head first.

Each cell's outcome is written to tests/coverage_matrix.json; `make matrix` renders it into the README, and the last
test checks the README shows what that file says."""

from __future__ import annotations

import json

import pytest
import torch
from coverage_matrix import CAPABILITIES, RESULTS, RESULTS_FILE, readme_table, render, write_results

import headlab
from headlab import hooks
from headlab.capture import AttentionEdit, editing, recording
from headlab.errors import NoSignalError, UnsupportedModelError
from headlab.model import HeadModel
from headlab.probes import get_probe
from headlab.tiny import FAMILY_CONFIGS, tiny_family

pytestmark = pytest.mark.slow

FAMILIES = list(FAMILY_CONFIGS)
PLANTED = ("gpt_oss", "gpt_neox", "phi3", "mixtral", "gptj")
NOT_YET: dict = {}  # (model type, capability) -> reason, for a known gap (strict xfail)
PAIR = {"name": "tiny pair", "clean": [[0, 70, 71, 72, 73, 74]], "corrupted": [[0, 70, 75, 72, 73, 74]],
        "answer": [80], "wrong": [81]}
ITEMS = tuple({"question": f"Question {i}?", "options": ["x", "y", "z"], "answer": i % 3} for i in range(4))
PROBE_PARAMS = {  # the quick profiles, made smaller still: a tiny model has nothing to find, only paths to run
    "detectors": {"seq_len": 6, "n_prompts": 2},
    "sinks": {"n_texts": 1, "n_tokens": 32, "min_queries": 4},
    "flow": {"texts": ("a short sentence through every head",)},
    "qk": {"items": ITEMS, "batch_size": 4},
    "patching": {"task": PAIR},
    "retrieval": {"lengths": (256,), "depths": (0.5,), "needles": 1, "max_new_tokens": 2},
    "function_vector": {"tasks": ("antonym",), "n_shots": 2, "n_mean": 2, "n_corrupted": 1},
    "successor": {},
    "copy_suppression": {"n_texts": 1, "n_tokens": 32, "max_tokens": 16},
    "query_retrieval": {"groups": 1, "n_passages": 3, "passage_tokens": 16},
    "weight_scores": {"n_tokens": 64, "distances": 8},
    "vision": {"n": 1, "needles": 1, "depths": (0.5,), "document_length": 256, "max_new_tokens": 2},
}
# fp32, two layers, logits of order 1: SDPA, the kernel's online softmax, eager attention and the bridge's own attention
# sum in different orders, which moves a logit by a few ulps (< 1e-6 seen on every family); a wrong layout, a missing
# window or softcap moves them by more than 1e-2 (tests/test_architectures.py plants such variants).
LOGITS_ATOL = 1e-4
# the kernel's fp32 statistics vs fp64 ones of fp32 eager probabilities: each probability carries ~1e-7 relative error,
# a sum over <= 40 keys or queries ~1e-6.
STATS_ATOL = 1e-5


def in_memory(model_type: str, hf, tokenizer) -> HeadModel:
    """A model already in memory, brought to headlab as a user brings theirs."""
    return headlab.load_model(hf, tokenizer=tokenizer, name=f"tiny-{model_type}")


def families(capability: str | None = None) -> list:
    """The model types, a known gap of `capability` marked strict xfail (it flips to a failure once closed)."""
    return [pytest.param(t, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[(t, capability)]))
            if (t, capability) in NOT_YET else t for t in FAMILIES]


def gap(model_type: str, capability: str) -> str | None:
    """Record a known gap's cell before its check runs (and fails, as its strict xfail requires)."""
    reason = NOT_YET.get((model_type, capability))
    if reason:
        record(model_type, capability, f"not yet: {reason}")
    return reason


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    model_type = request.param
    hf, tokenizer = tiny_family(model_type)
    folder = tmp_path_factory.mktemp(model_type)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = headlab.load_model(str(folder))
    tokens = model.to_tokens("the quick brown fox jumps over the lazy dog, twice")
    return model_type, model, in_memory(model_type, hf, tokenizer), tokens


@pytest.fixture(scope="module", autouse=True)
def results_file():
    yield
    write_results(RESULTS)


def record(model_type: str, capability: str, outcome: str = "yes") -> None:
    RESULTS.setdefault(model_type, {})[capability] = outcome


@pytest.mark.parametrize("family", families(), indirect=True)
def test_loads_from_a_folder_and_from_memory(family):
    model_type, model, memory, tokens = family
    assert model.architecture.model_types == memory.architecture.model_types
    assert torch.equal(model.logits(tokens), memory.logits(tokens))  # the same weights, read back bit for bit
    record(model_type, "load")


def eager_logits_and_probs(model, tokens):
    """Logits and per-layer attention probabilities [b, h, n, n] of the family's own eager attention."""
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.hf(input_ids=tokens, output_attentions=True)
    finally:
        model.hf.set_attn_implementation(previous)
    return out.logits, [a.double() for a in out.attentions]


def check_logits(model, tokens):
    eager, _ = eager_logits_and_probs(model, tokens)
    with recording(model):
        seam = model.logits(tokens)
    with torch.no_grad():
        bridge = model.bridge(tokens)
    torch.testing.assert_close(bridge, eager, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(seam, eager, atol=LOGITS_ATOL, rtol=0)
    assert bridge_copies(model) == COPIED.get(model.config.model_type, set())


# The bridge shares every parameter's storage with .hf (views of a fused projection included: GPT-2, Phi-3) except
# GPT-NeoX's q/k/v, which TransformerLens splits out of the per-head interleaved query_key_value into copies.
COPIED = {"gpt_neox": {"attention.q", "attention.k", "attention.v"}}


def bridge_copies(model) -> set[str]:
    """The bridge's modules (by their path inside a layer) whose parameters are not .hf's own."""
    shared = {p.untyped_storage().data_ptr() for p in model.hf.parameters()}
    out = set()
    for name, parameter in model.bridge.named_parameters():
        if parameter.untyped_storage().data_ptr() not in shared:
            parts = [part for part in name.split(".") if part != "_original_component"]
            layer = next(i for i, part in enumerate(parts) if part.isdigit())
            out.add(".".join(parts[layer + 1:-1]))
    return out


@pytest.mark.parametrize("family", families("logits"), indirect=True)
def test_seam_logits_equal_eager_and_bridge(family):
    model_type, model, _, tokens = family
    known_gap = gap(model_type, "logits")
    check_logits(model, tokens)
    if not known_gap:
        record(model_type, "logits")


ALL_STATS = ("lse", "top1", "entropy", "span_mass", "colsum")  # top1 brings top1_prob
SPANS = {"first": (0, 1), "middle": (4, 12)}


def check_stats(model, tokens):
    """The kernel's statistics of every layer against the family's eager probabilities p (fp64): p = exp(logit - lse)
    on the visible keys (the logits from the q and k the attention function received, scaled and capped as the
    kernel's problem says), and entropy (a learned sink's weight, 1 - sum p, counted as one more outcome), top-1,
    span mass and column sums of p."""
    _, probs = eager_logits_and_probs(model, tokens)
    seen = {}

    def keep(layer):
        def apply(q, k, v, out, stats, problem):
            seen[layer] = (q, k, stats, problem)
            return out
        return apply

    edits = {layer: AttentionEdit(keep(layer)) for layer in range(model.n_layers)}
    with recording(model, spans=SPANS, want=ALL_STATS) as recorder, editing(model, edits):
        model.hf.base_model(input_ids=tokens, use_cache=False)  # one kernel call per layer serves both
    for layer, p in enumerate(probs):
        q, k, stats, problem = seen[layer]
        assert stats is recorder.stats[layer]
        raw = q.double() @ headlab.kernels.expand_kv(k, q.shape[1]).double().transpose(-1, -2)
        from_lse = torch.exp(problem.logits(raw) - stats.lse.double()[..., None]) * (p > 0)
        torch.testing.assert_close(from_lse, p, atol=STATS_ATOL, rtol=0)
        sink = (1 - p.sum(-1)).clamp_min(0)  # a learned sink's weight (gpt-oss); ~1e-7 of rounding elsewhere
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) - sink * sink.clamp_min(1e-300).log()
        torch.testing.assert_close(stats.entropy.double(), entropy, atol=STATS_ATOL, rtol=0)
        torch.testing.assert_close(stats.top1_prob.double(), p.max(-1).values, atol=STATS_ATOL, rtol=0)
        top2 = p.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4  # a near tie may go either way in fp32
        assert torch.equal(stats.top1[clear], p.argmax(-1)[clear])
        for i, (start, end) in enumerate(SPANS.values()):
            torch.testing.assert_close(stats.span_mass[..., i].double(), p[..., start:end].sum(-1), atol=STATS_ATOL,
                                       rtol=0)
        torch.testing.assert_close(stats.colsum.double(), p.sum(-2), atol=STATS_ATOL * p.shape[-1], rtol=0)


@pytest.mark.parametrize("family", families("stats"), indirect=True)
def test_kernel_statistics_equal_the_eager_probabilities(family):
    model_type, model, _, tokens = family
    known_gap = gap(model_type, "stats")
    check_stats(model, tokens)
    if not known_gap:
        record(model_type, "stats")


@pytest.mark.parametrize("model_type, dropped", [("gemma2", "softcap"), ("mistral", "window")])
def test_a_problem_without_the_familys_softcap_or_window_fails_both_bounds(model_type, dropped, monkeypatch):
    """The bounds catch a family trap: the kernel given the call without Gemma 2's logit cap or Mistral's window."""
    import dataclasses

    from headlab.attention import Call

    model = in_memory(model_type, *tiny_family(model_type))
    tokens = model.to_tokens("the quick brown fox jumps over the lazy dog, twice")
    problem = Call.problem
    monkeypatch.setattr(Call, "problem", lambda call, **options: problem(
        dataclasses.replace(call, **{dropped: None}), **options))
    with pytest.raises(AssertionError):
        check_stats(model, tokens)
    with pytest.raises(AssertionError):
        check_logits(model, tokens)


@pytest.mark.parametrize("family", families(), indirect=True)
def test_ablation_and_scaling_restore_the_model_bit_for_bit(family):
    model_type, model, _, tokens = family
    before = model.logits(tokens)
    with torch.no_grad():
        bridge_before = model.bridge(tokens)
    for intervention in (model.ablate_heads(["L1H0"], mode="uniform"), model.scale_heads({"L0H1": 3.0})):
        with intervention:
            assert (model.logits(tokens) - before).abs().max() > 1e-6  # it did something
        assert torch.equal(model.logits(tokens), before)
        with torch.no_grad():
            assert torch.equal(model.bridge(tokens), bridge_before)
    record(model_type, "interventions")


@pytest.mark.parametrize("family", families(), indirect=True)
@pytest.mark.parametrize("probe_name", list(PROBE_PARAMS))
def test_every_probe_runs_or_is_refused_in_one_sentence(family, probe_name, tmp_path):
    model_type, _, model, _ = family  # the in-memory one: its name, tiny-<type>, does not depend on a folder
    params = dict(PROBE_PARAMS[probe_name])
    if probe_name == "retrieval":
        from planted import copy_task_files

        params = {**copy_task_files(tmp_path), **params}
    try:
        table = get_probe(probe_name).scan(model, quick=True, progress=False, **params)
    except (UnsupportedModelError, NoSignalError) as error:
        sentence = str(error)
        assert sentence.count(". ") == 0 and "\n" not in sentence, sentence  # one sentence
        outcome = "refused" if isinstance(error, UnsupportedModelError) else "no signal"  # runs, finds nothing here
        record(model_type, probe_name, f"{outcome}: {sentence.replace(model.name, 'the model')}")
        return
    assert table.to_frame()[["layer", "head"]].drop_duplicates().shape[0] == model.n_layers * model.n_heads
    record(model_type, probe_name)


def plant_first_token_head(model, layer: int, head: int, strength: float = 1.0) -> None:
    """Weights under which `head` of `layer` attends to the first token (BOS) from every query: every token's embedding
    gets a constant direction c0 and BOS alone a direction c1; the head's query reads c0 and its key c1 on the head's
    last dimension (a slow or unrotated rotary dimension on every family, so the match holds at any distance)."""
    arch = model.architecture
    embed = model.hf.get_input_embeddings().weight
    c0, c1 = embed.shape[1] - 1, embed.shape[1] - 2
    d = model.d_head
    kv_head = head // (model.n_heads // model.n_kv_heads)
    with torch.no_grad():
        embed[:, c0] = 1.0
        embed[:, c1] = 0.0
        embed[model.bos_token_id, c1] = 1.0
        for projection, h, source in ((arch.q(layer), head, c0), (arch.k(layer), kv_head, c1)):
            unit = _output_units(projection)[h * d + d - 1]
            weight = projection.module.weight
            if type(projection.module).__name__ == "Conv1D":  # [in, out]
                weight[:, unit] = 0.0
                weight[source, unit] = 8.0 * strength
            else:
                weight[unit] = 0.0
                weight[unit, source] = 8.0 * strength


def _output_units(projection) -> torch.Tensor:
    """The projection module's output units that hold this tensor's [heads * d] values, in order."""
    width = projection.module.weight.shape[0 if type(projection.module).__name__ != "Conv1D" else 1]
    units = torch.arange(width)
    return units if projection.columns is None else units[projection.columns.cpu() if torch.is_tensor(
        projection.columns) else projection.columns]


@pytest.mark.parametrize("model_type", PLANTED)
def test_a_planted_first_token_head_ranks_first(model_type):
    hf, tokenizer = tiny_family(model_type)
    model = in_memory(model_type, hf, tokenizer)
    planted = (model.n_layers - 1, 0)  # the last layer attends to every key on every family here
    plant_first_token_head(model, *planted)
    texts = tuple(tuple([model.bos_token_id] + model.token_ids(f"a text about heads number {i} and more")[:30])
                  for i in range(2))
    table = get_probe("sinks").scan(model, progress=False, texts=texts, min_queries=4)
    assert table.heads(1, by="first_mass") == [planted], table.top(3, by="first_mass")
    record(model_type, "planted")


def test_a_wrong_planted_head_is_not_first():
    """The planted check can fail: a head planted with no strength is not ranked first."""
    hf, tokenizer = tiny_family("gpt_neox")
    model = in_memory("gpt_neox", hf, tokenizer)
    plant_first_token_head(model, 1, 0, strength=0.0)
    texts = ((model.bos_token_id, *model.token_ids("a text about heads and more of them")),)
    table = get_probe("sinks").scan(model, progress=False, texts=texts, min_queries=4)
    assert table.heads(1, by="first_mass") != [(1, 0)]


def test_the_readme_shows_the_last_results():
    """The README's matrix is what tests/coverage_matrix.json renders (`make matrix` writes it)."""
    assert readme_table() == render(json.loads(RESULTS_FILE.read_text()))
    assert set(CAPABILITIES) >= {"load", "logits", "stats", "interventions", "planted", *PROBE_PARAMS}
