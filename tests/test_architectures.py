"""Architecture adapters and the hook vocabulary: every .hf site equals its .bridge twin on every family, an unknown
family is refused at load, GPT-2 (fused q/k/v) runs every path, and a user's own hooks survive every probe."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import headlab
from headlab import UnsupportedModelError, hooks
from headlab.model import HeadModel
from headlab.tiny import byte_tokenizer

FAMILIES = ["tiny-llama", "tiny-gemma3", "tiny-bert", "tiny-gpt2"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return headlab.load_model(request.param)


def test_every_hf_site_equals_its_bridge_twin(model):
    tokens = model.to_tokens("the same tensor on both trees")
    for site in hooks.HF_SITES:
        if site.endswith("_normed") and not model.architecture.has_qk_norm:
            continue
        points = [hooks.name(site, layer) for layer in range(model.n_layers)]
        on_hf = hooks.hf_activations(model, tokens, points)
        _, on_bridge = hooks.run_with_cache(model, tokens, points)
        for point in points:
            assert on_hf[point].shape == on_bridge[point].shape, point
            torch.testing.assert_close(on_hf[point], on_bridge[point], atol=1e-5, rtol=0)  # fp32, 2-3 layers


def test_writing_a_site_changes_both_trees_alike(model):
    tokens = model.to_tokens("a head silenced on both trees")

    def silence(z, point):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    point = hooks.name("z", model.n_layers - 1)
    with hooks.attach(model, [(point, silence)], tree="hf"):
        hf = model.logits(tokens)
    with hooks.attach(model, [(point, silence)], tree="bridge"), torch.no_grad():
        bridge = model.bridge(tokens)
    torch.testing.assert_close(hf, bridge, atol=1e-4, rtol=0)
    assert (hf - model.logits(tokens)).abs().max() > 1e-4  # the edit did something


def test_capture_and_interventions_on_gpt2():
    model = headlab.load_model("tiny-gpt2")
    tokens = model.to_tokens("a fused projection gives q, k and v")
    stats = model.attention_stats(tokens, want=("lse", "colsum"))
    _, cache = model.run_with_cache(tokens)
    for layer, layer_stats in stats.items():
        pattern = cache[hooks.name("pattern", layer)]
        torch.testing.assert_close(layer_stats.colsum, pattern.sum(-2), atol=1e-5, rtol=0)
    with model.ablate_heads(["L1H2"], mode="uniform"):
        hf = model.logits(tokens)
        with torch.no_grad():
            bridge = model.bridge(tokens)
    torch.testing.assert_close(hf, bridge, atol=1e-4, rtol=0)
    assert torch.equal(model.logits(tokens), model.logits(tokens))


def test_an_unknown_family_is_refused_at_load(tmp_path):
    config = GPTNeoXConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    neox = GPTNeoXForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*Llama.*Gemma3.*BERT.*GPT-2"):
        HeadModel("neox", neox, byte_tokenizer())
    neox.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        headlab.load_model(str(tmp_path))


def test_a_users_hooks_survive_every_probe():
    """A user's TransformerLens hook and torch hook on the points the probes use stay attached and keep firing."""
    from headlab.probes import detectors, flow, patching, qk_score, retrieval, sinks, vision

    from headlab.tasks import MCQAItem

    model = headlab.load_model("tiny-llama")
    calls = {"bridge": 0, "hf": 0}

    def count(tree):
        def hook(*args):
            calls[tree] += 1
        return hook

    point = model.bridge.blocks[0].attn.hook_pattern
    z_point = model.bridge.blocks[1].attn.hook_z
    scale_point = model.bridge.ln_final.hook_scale  # the point DLA's norm gain forces (it once removed every hook)
    handles = [point.add_hook(lambda pattern, hook: count("bridge")()), z_point.add_hook(lambda z, hook: None),
               scale_point.add_hook(lambda scale, hook: None)]
    torch_handle = model.architecture.o(1).register_forward_pre_hook(lambda module, args: count("hf")())
    items = [MCQAItem(f"Question {i}?", ("yes", "no", "maybe"), i % 3) for i in range(4)]
    runs = {
        "detectors": lambda: detectors.scan(model, seq_len=5, n_prompts=2, progress=False),
        "sinks": lambda: sinks.scan(model, n_texts=1, n_tokens=32, min_queries=4, progress=False),
        "flow": lambda: flow.scan(model, n_texts=1, progress=False),
        "qk": lambda: qk_score.scan(model, items, permutations=False, progress=False),
        "patching": lambda: patching.activation_patch(model, model.to_tokens("ab cd"), model.to_tokens("ab ce"), "z",
                                                      answer=torch.tensor([5]), wrong=torch.tensor([6]),
                                                      progress=False),
        "vision": lambda: vision.vhd(model, vision.SpanPrompt(model.to_tokens("a long note here: key")[0], (1, 5))),
        "retrieval": lambda: _answer_one_needle(model, retrieval),
        "dla": lambda: patching.direct_logit_attribution(model, model.to_tokens("ab cd"), torch.tensor([5]),
                                                         torch.tensor([6])),
        "path patching": lambda: patching.path_patch(model, model.to_tokens("ab cd"), model.to_tokens("ab ce"),
                                                     ["L0H0"], component="q", answer=torch.tensor([5]),
                                                     wrong=torch.tensor([6]), progress=False),
        "ablate": lambda: _with_logits(model, model.ablate_heads(["L1H0"], mode="uniform")),
        "scale": lambda: _with_logits(model, model.scale_heads({"L0H1": 2.0})),
        "calibrate": lambda: _run_calibrated(model, sinks),
    }
    for name, run in runs.items():
        before = dict(calls)
        run()
        assert [point.fwd_hooks, z_point.fwd_hooks, scale_point.fwd_hooks] == [[h] for h in handles], name
        with torch.no_grad():
            model.bridge(model.to_tokens("still there?"))
        model.logits(model.to_tokens("still there?"))
        assert calls["bridge"] > before["bridge"] and calls["hf"] > before["hf"], name
    torch_handle.remove()


def _answer_one_needle(model, retrieval):
    needle = retrieval.Needle("k", "K is {answer}.", "K?", "7")  # byte tokens: a short needle in 200 of them
    task = retrieval.niah_task(needles=[needle], lengths=(200,), depths=(0.5,), intro="", question_template="{question}")
    return retrieval.answer_needle(model, retrieval.build_prompt(model, task, task.tests()[0]), max_new_tokens=3)


def _with_logits(model, intervention):
    with intervention:
        model.logits(model.to_tokens("an intervention on both trees"))
        with torch.no_grad():
            model.bridge(model.to_tokens("an intervention on both trees"))


def _run_calibrated(model, sinks):
    with sinks.calibrate(model, ["L0H1"], min_queries=2):
        model.logits(model.to_tokens("calibrated on both trees"))
        with torch.no_grad():
            model.bridge(model.to_tokens("calibrated on both trees"))
