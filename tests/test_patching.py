"""Patching: parity with transformer_lens.patching, planted heads, exact decompositions, first-order checks, bad input."""

import pandas as pd
import pytest
import torch
from headlab.probes import patching as P
from headlab.probes.patching import methods
from planted import INDUCTION_HEAD, PREVIOUS_TOKEN_HEAD, induction_model
from tolerances import assert_within, depth_bound
from transformer_lens import patching as tl

import headlab
from headlab.errors import InputError, NoSignalError
from headlab.tiny import FAMILY_CONFIGS, tiny_family

TL_FUNCTIONS = [  # (ours: component, over) -> TransformerLens' function
    ("resid_pre", None, tl.get_act_patch_resid_pre),
    ("resid_mid", None, tl.get_act_patch_resid_mid),
    ("attn_out", None, tl.get_act_patch_attn_out),
    ("mlp_out", None, tl.get_act_patch_mlp_out),
    ("z", None, tl.get_act_patch_attn_head_out_by_pos),
    ("q", None, tl.get_act_patch_attn_head_q_by_pos),
    ("k", None, tl.get_act_patch_attn_head_k_by_pos),
    ("v", None, tl.get_act_patch_attn_head_v_by_pos),
    ("pattern", None, tl.get_act_patch_attn_head_pattern_by_pos),
    ("pattern", ("head", "dest", "src"), tl.get_act_patch_attn_head_pattern_dest_src_pos),
    ("z", ("head",), tl.get_act_patch_attn_head_out_all_pos),
    ("q", ("head",), tl.get_act_patch_attn_head_q_all_pos),
    ("k", ("head",), tl.get_act_patch_attn_head_k_all_pos),
    ("v", ("head",), tl.get_act_patch_attn_head_v_all_pos),
    ("pattern", ("head",), tl.get_act_patch_attn_head_pattern_all_pos),
]


def pair(model, short=False):
    clean = ["The cat sat on the mat", "A dog ran in the park!"]
    corrupted = ["The bat sat on the hat", "A cow ran in the yard!"]
    if short:
        clean, corrupted = ["cat on mat"], ["bat on hat"]
    metric = P.logit_diff(torch.tensor([10, 20][:len(clean)]), torch.tensor([30, 40][:len(clean)]))
    return model.to_tokens(clean), model.to_tokens(corrupted), metric


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("component,over,reference", TL_FUNCTIONS)
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_activation_patching_equals_transformer_lens(name, component, over, reference, direction, request):
    model = request.getfixturevalue(name)
    clean, corrupted, metric = pair(model, short=component == "pattern" and over is not None and "src" in over)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    _, source_cache = model.bridge.run_with_cache(source)
    expected = reference(model.bridge, base, source_cache, metric)
    ours = P.activation_patch(model, clean, corrupted, component, over=over, metric=metric, direction=direction,
                              progress=False)
    assert ours.values.shape == expected.shape
    torch.testing.assert_close(ours.values, expected, atol=1e-5, rtol=0)
    assert ours.axes == (("head", "dest", "src") if over and "src" in over else ours.axes)


def test_memory_budget_only_changes_the_chunking(tiny_gemma3):
    clean, corrupted, metric = pair(tiny_gemma3)
    big = P.activation_patch(tiny_gemma3, clean, corrupted, "z", metric=metric, progress=False)
    small = P.activation_patch(tiny_gemma3, clean, corrupted, "z", metric=metric, memory_budget=1, progress=False)
    assert small.meta["chunk"] == 1 < big.meta["chunk"]
    torch.testing.assert_close(small.values, big.values, atol=1e-6, rtol=0)


def test_normalised_is_zero_at_corrupted_and_one_at_clean(tiny_llama):
    clean, corrupted = tiny_llama.to_tokens("The cat sat on the mat"), tiny_llama.to_tokens("The cat sat on the hat")
    metric = P.logit_diff(torch.tensor([10]), torch.tensor([30]))
    result = P.activation_patch(tiny_llama, clean, corrupted, "resid_pre", metric=metric, progress=False)
    with torch.no_grad():
        assert result.clean == pytest.approx(float(metric(tiny_llama.bridge(clean))), abs=1e-6)
        assert result.corrupted == pytest.approx(float(metric(tiny_llama.bridge(corrupted))), abs=1e-6)
    differs = int((clean != corrupted)[0].nonzero()[0])
    normalised = result.normalised[0]  # layer 0: the embedding of one position
    assert normalised[differs] == pytest.approx(1.0, abs=1e-5)  # the only differing token: the clean run
    same = [p for p in range(clean.shape[1]) if p != differs]
    assert normalised[same].abs().max() < 1e-5  # identical tokens: the corrupted run


def induction_pair(model):
    text = "qwertyuiopasdfgh"
    clean = model.to_tokens(text + text[:6])
    corrupted = model.to_tokens("zxcvbnmlkjQWERTY" + text[:6])
    answer = model.to_tokens(text[6], prepend_bos=False)[0]
    wrong = model.to_tokens("Q", prepend_bos=False)[0]
    return clean, corrupted, P.logit_diff(answer, wrong)


def test_planted_induction_head_carries_the_effect():
    model = induction_model()
    clean, corrupted, metric = induction_pair(model)
    result = P.activation_patch(model, clean, corrupted, "z", metric=metric, progress=False)
    effect = result.normalised
    layer, head = INDUCTION_HEAD
    assert effect[layer, -1, head] == pytest.approx(1.0, abs=1e-4)  # its output at the last position restores it
    assert int(effect.flatten().argmax()) == (layer * effect.shape[1] + effect.shape[1] - 1) * effect.shape[2] + head
    zero = [h for h in range(4) if (1, h) != INDUCTION_HEAD]
    assert effect[1][:, zero].abs().max() < 1e-6  # heads with zero weights do nothing
    assert effect[0][:, 1:].abs().max() < 1e-6
    heads = P.activation_patch(model, clean, corrupted, "z", over=("head",), metric=metric, progress=False)
    top = heads.effect.flatten().argsort(descending=True)[:2].tolist()
    assert {divmod(i, 4) for i in top} == {INDUCTION_HEAD, PREVIOUS_TOKEN_HEAD}


def test_path_patching_equals_transformer_lens_direct_path():
    model = induction_model()  # 4 KV heads: q, k and v paths all defined in TransformerLens
    clean, corrupted, metric = induction_pair(model)
    _, clean_cache = model.bridge.run_with_cache(clean)
    _, corrupted_cache = model.bridge.run_with_cache(corrupted)
    for component in "qkv":
        expected = tl.get_act_patch_direct_path(model.bridge, corrupted, clean_cache, corrupted_cache, metric,
                                                0, 0, component=component, verbose=False)
        ours = P.path_patch(model, clean, corrupted, ["L0H0"], component=component, metric=metric, progress=False)
        assert torch.isnan(ours.values[0]).all()
        torch.testing.assert_close(ours.values[1], expected[1], atol=1e-5, rtol=0)
    # the previous-token head reaches the induction head through its keys only (K-composition); alone, that path
    # moves attention to the right position of the corrupted text, whose token differs: a partial effect
    effect = {c: P.path_patch(model, clean, corrupted, ["L0H0"], component=c, metric=metric,
                              progress=False).normalised[1] for c in "qkv"}
    others = [h for h in range(4) if h != INDUCTION_HEAD[1]]
    assert effect["k"][INDUCTION_HEAD[1]] > 0.05 and effect["k"][others].abs().max() < 1e-6
    assert effect["q"].abs().max() < 1e-6 and effect["v"].abs().max() < 1e-6


def test_path_patching_q_equals_transformer_lens_on_gqa(tiny_llama):
    clean, corrupted, metric = pair(tiny_llama)
    _, clean_cache = tiny_llama.bridge.run_with_cache(clean)
    _, corrupted_cache = tiny_llama.bridge.run_with_cache(corrupted)
    expected = tl.get_act_patch_direct_path(tiny_llama.bridge, corrupted, clean_cache, corrupted_cache, metric,
                                            0, 1, component="q", verbose=False)
    ours = P.path_patch(tiny_llama, clean, corrupted, ["L0H1"], component="q", metric=metric, progress=False)
    torch.testing.assert_close(ours.values[1], expected[1], atol=1e-5, rtol=0)
    assert P.path_patch(tiny_llama, clean, corrupted, ["L0H1"], component="k", metric=metric,
                        progress=False).values.shape == (2, tiny_llama.n_kv_heads)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_head_writes_sum_to_the_attention_output(name, request):
    model = request.getfixturevalue(name)
    tokens, _, _ = pair(model)
    _, cache = model.bridge.run_with_cache(tokens)
    for layer in range(model.n_layers):
        torch.testing.assert_close(P.head_writes(model, cache, layer).sum(2), cache[f"blocks.{layer}.hook_attn_out"],
                                   atol=1e-5, rtol=1e-5)


def _finite_difference(model, tokens, metric, name, direction, eps=0.05):
    """d metric / d t of the run with direction * t added at hook `name` (central difference)."""
    def at(t):
        with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(name, lambda x, hook: x + t * direction)]):
            return float(metric(model.bridge(tokens)))
    return (at(eps) - at(-eps)) / (2 * eps)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_attribution_patching_is_the_first_order_term(name, request):
    model = request.getfixturevalue(name)
    clean, corrupted, metric = pair(model)
    attr = P.attribution_patch(model, clean, corrupted, "z", over=("pos", "head"), metric=metric)
    _, clean_cache = model.bridge.run_with_cache(clean)
    _, corrupted_cache = model.bridge.run_with_cache(corrupted)
    site = "blocks.1.attn.hook_z"
    for pos, head in [(3, 0), (clean.shape[1] - 1, 2)]:
        direction = torch.zeros_like(clean_cache[site])
        direction[:, pos, head] = clean_cache[site][:, pos, head] - corrupted_cache[site][:, pos, head]
        expected = _finite_difference(model, corrupted, metric, site, direction)
        assert attr.values[1, pos, head] - attr.corrupted == pytest.approx(expected, rel=1e-2, abs=1e-5)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_edge_attribution_is_the_first_order_path_effect(name, request):
    model = request.getfixturevalue(name)
    clean, corrupted, metric = pair(model)
    edges = P.edge_attribution(model, clean, corrupted, metric=metric)
    _, clean_cache = model.bridge.run_with_cache(clean)
    _, corrupted_cache = model.bridge.run_with_cache(corrupted)
    with torch.no_grad():
        scale = float(metric(model.bridge(clean))) - float(metric(model.bridge(corrupted)))
    delta = P.head_writes(model, clean_cache, 0)[:, :, 1] - P.head_writes(model, corrupted_cache, 0)[:, :, 1]
    with P.split_qkv_input(model):
        for component, receiver in [("q", 2), ("k", 0), ("v", model.n_kv_heads - 1)]:
            name = f"blocks.1.attn.hook_{component}_input"
            width = model.n_heads if component == "q" else model.n_kv_heads
            direction = torch.zeros(*delta.shape[:2], width, delta.shape[-1])
            direction[:, :, receiver] = delta
            expected = _finite_difference(model, corrupted, metric, name, direction) / scale
            assert float(edges[component][0, 1, 1, receiver]) == pytest.approx(expected, rel=1e-2, abs=1e-5)
    assert (edges["q"][1, :, 0] == 0).all()  # no edge backwards


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gemma3"])
def test_direct_logit_attribution_adds_up_to_the_logit_difference(name, request):
    model = request.getfixturevalue(name)
    tokens, _, _ = pair(model)
    parts = P.direct_logit_attribution(model, tokens, torch.tensor([10, 20]), torch.tensor([30, 40]))
    assert parts["heads"].shape == (model.n_layers, model.n_heads)
    assert float(parts["total"]) == pytest.approx(float(parts["logit"]), abs=1e-4)
    with torch.no_grad():
        logits = model.bridge(tokens)[:, -1]
    assert float(parts["logit"]) == pytest.approx(float((logits[[0, 1], [10, 20]] - logits[[0, 1], [30, 40]]).mean()),
                                                  abs=1e-5)


@pytest.mark.parametrize("model_type", [t for t in FAMILY_CONFIGS if t != "bert"])
def test_direct_logit_attribution_adds_up_on_every_family(model_type, monkeypatch):
    """On every causal family the parts add up to the logit difference: RMS norms and LayerNorms, sandwich norms,
    parallel blocks, experts; Granite's and Cohere's constant logit multiplier; under Gemma 2's final softcap, the
    logit difference before the cap. Bound 1e-4 as above; a family with a multiplier or a cap, read without it,
    has parts that miss its logit by more."""
    hf, tokenizer = tiny_family(model_type)
    model = headlab.load_model(hf, tokenizer=tokenizer, name=f"tiny-{model_type}")
    tokens = model.to_tokens(["the quick brown fox jumps", "over the lazy dog, twice!"])
    answer, wrong = torch.tensor([10, 20]), torch.tensor([30, 40])
    with torch.no_grad():
        logits = model.hf(input_ids=tokens).logits[:, -1].double()
    cap = model.architecture.final_softcap
    if cap:
        logits = cap * torch.atanh(logits / cap)
    expected = float((logits[[0, 1], answer] - logits[[0, 1], wrong]).mean())
    parts = P.direct_logit_attribution(model, tokens, answer, wrong)
    assert float(parts["logit"]) == pytest.approx(expected, abs=1e-5)
    assert float(parts["total"]) == pytest.approx(expected, abs=1e-4)
    if model.architecture.logit_multiplier != 1 or cap:
        monkeypatch.setattr(type(model.architecture), "logit_multiplier", 1.0)
        monkeypatch.setattr(type(model.architecture), "final_softcap", None)
        unscaled = P.direct_logit_attribution(model, tokens, answer, wrong)
        assert abs(float(unscaled["total"]) - float(unscaled["logit"])) > 1e-3


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt2"])
def test_direct_logit_attribution_under_a_layernorm(model_type, monkeypatch):
    """Pythia's and GPT-2's final LayerNorm: each part centred and read out with the run's scale, the norm's bias read
    out once, add up to the logit difference. With a random gain and bias on the norm and embeddings off centre (as
    trained residual streams are), dropping either the centring or the bias misses it by far more than the bound
    (1e-4, as above: fp32 sums of order-one terms)."""
    hf, tokenizer = tiny_family(model_type)
    final = {"gpt_neox": lambda: hf.gpt_neox.final_layer_norm, "gpt2": lambda: hf.transformer.ln_f}[model_type]()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        final.weight.copy_(1 + torch.rand(final.weight.shape, generator=generator))
        final.bias.copy_(torch.randn(final.bias.shape, generator=generator))
        hf.get_input_embeddings().weight.add_(1.0)
    model = headlab.load_model(hf, tokenizer=tokenizer, name=f"tiny-{model_type}")
    tokens = model.to_tokens(["the quick brown fox jumps", "over the lazy dog, twice!"])
    answer, wrong = torch.tensor([10, 20]), torch.tensor([30, 40])
    parts = P.direct_logit_attribution(model, tokens, answer, wrong)
    with torch.no_grad():
        logits = model.hf(input_ids=tokens).logits[:, -1]
    expected = float((logits[[0, 1], answer] - logits[[0, 1], wrong]).mean())
    assert float(parts["logit"]) == pytest.approx(expected, abs=1e-5)
    assert float(parts["total"]) == pytest.approx(expected, abs=1e-4)
    assert abs(float(parts["bias"])) > 1e-2  # the norm's bias is read out, not lost
    with monkeypatch.context() as patch:
        patch.setattr(methods, "norm_kind", lambda cache, prefix: "rms")  # no centring
        assert abs(float(P.direct_logit_attribution(model, tokens, answer, wrong)["total"]) - expected) > 1e-2
    gain_only = methods.norm_affine(model, "ln_final")[0]
    monkeypatch.setattr(methods, "norm_affine", lambda model, prefix: (gain_only, torch.zeros_like(gain_only)))
    assert abs(float(P.direct_logit_attribution(model, tokens, answer, wrong)["total"]) - expected) > 1e-2


def test_direct_logit_attribution_of_the_planted_head():
    model = induction_model()
    clean, _, _ = induction_pair(model)
    answer = model.to_tokens("u", prepend_bos=False)[0]  # the token after "qwerty" in the first copy
    parts = P.direct_logit_attribution(model, clean, answer)
    layer, head = INDUCTION_HEAD
    assert int(parts["heads"].flatten().argmax()) == layer * 4 + head and parts["heads"][layer, head] > 0.5
    assert parts["heads"].flatten()[[0, 1, 2, 3, 4, 5, 7]].abs().max() < 1e-6  # the rest write nothing read out
    assert float(parts["total"]) == pytest.approx(float(parts["logit"]), abs=1e-4)


def test_bad_input_gets_one_clear_error(tiny_llama):
    clean, corrupted, metric = pair(tiny_llama)
    with pytest.raises(InputError, match="same shape"):
        P.activation_patch(tiny_llama, clean, corrupted[:, :-1], "z", metric=metric)
    with pytest.raises(InputError, match="scalar"):
        P.activation_patch(tiny_llama, clean, corrupted, "z", metric=lambda logits: logits[:, -1, 0])
    with pytest.raises(InputError, match="unknown component"):
        P.activation_patch(tiny_llama, clean, corrupted, "hook_zz", metric=metric)
    with pytest.raises(InputError, match="patched over"):
        P.activation_patch(tiny_llama, clean, corrupted, "resid_pre", over=("head",), metric=metric)
    with pytest.raises(InputError, match="direction"):
        P.activation_patch(tiny_llama, clean, corrupted, "z", metric=metric, direction="sideways")
    with pytest.raises(InputError, match="answer and wrong"):
        P.activation_patch(tiny_llama, clean, corrupted, "z")
    with pytest.raises(InputError, match="'q', 'k' or 'v'"):
        P.path_patch(tiny_llama, clean, corrupted, ["L0H0"], component="z", metric=metric)
    with pytest.raises(InputError, match="receivers"):
        P.path_patch(tiny_llama, clean, corrupted, ["L1H0"], receivers=["L0H1"], metric=metric)
    same = P.activation_patch(tiny_llama, clean, clean, "z", over=("head",), metric=metric, progress=False)
    with pytest.raises(NoSignalError, match="same metric"):
        same.normalised


@pytest.mark.real
def test_real_models_parity_and_tasks(smollm2, gemma3):
    for model in (smollm2, gemma3):
        task = P.ioi_task(model, n=4)
        assert task.clean.shape == task.corrupted.shape and task.info["n_pairs"] == 4
        assert (task.answer != task.wrong).all()
        _, clean_cache = model.bridge.run_with_cache(task.clean)
        layers = [0, model.n_layers // 2, model.n_layers - 1]
        index = pd.DataFrame([(l, h) for l in layers for h in range(model.n_heads)], columns=["layer", "head"])
        expected = tl.generic_activation_patch(model.bridge, task.corrupted, clean_cache, task.metric,
                                               tl.layer_head_vector_patch_setter, "z", index_df=index)
        ours = P.activation_patch(model, task.clean, task.corrupted, "z", over=("head",), metric=task.metric,
                                  layers=layers, progress=False)
        with torch.no_grad():  # the logit difference subtracts two logits: their size sets the rounding
            last = model.bridge(task.corrupted)[:, -1]
        scale = last.gather(1, torch.stack([task.answer, task.wrong], 1)).abs().max()
        bound = depth_bound(model.n_layers, scale)
        assert_within(ours.values[layers].flatten(), expected, bound)
        wrong_head = ours.values[layers].roll(1, dims=-1).flatten()  # each value compared with its neighbour's
        with pytest.raises(AssertionError):
            assert_within(wrong_head, expected, bound)
        parts = P.direct_logit_attribution(model, task.clean, task.answer, task.wrong)
        assert float(parts["total"]) == pytest.approx(float(parts["logit"]), abs=1e-3)
    from headlab.tasks import load_mcqa
    mcqa = P.mcqa_task(smollm2, load_mcqa("mcqa_stated.jsonl")[:8])
    assert mcqa.clean.shape == mcqa.corrupted.shape and (mcqa.answer != mcqa.wrong).all()


@pytest.mark.real
def test_ioi_names_corruption_replaces_both_names(smollm2):
    swap = P.ioi_task(smollm2, n=4)
    names = P.ioi_task(smollm2, n=4, corruption="names")
    assert torch.equal(swap.clean, names.clean) and torch.equal(swap.answer, names.answer)
    assert torch.equal(swap.corrupted[0], swap.clean[1])  # the swap is the twin prompt
    for clean, corrupted, answer, wrong in zip(names.clean, names.corrupted, names.answer, names.wrong):
        assert clean.shape == corrupted.shape
        clean_text, corrupted_text = smollm2.to_string(clean), smollm2.to_string(corrupted)
        for name in (smollm2.to_string(answer[None]).strip(), smollm2.to_string(wrong[None]).strip()):
            assert name in clean_text and name not in corrupted_text  # neither name is left
    with pytest.raises(InputError, match="corruption"):
        P.ioi_task(smollm2, corruption="abc")
