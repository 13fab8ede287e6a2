"""Architecture adapters and the hook vocabulary: every .hf site equals its .bridge twin on every supported model type
(and a wrong fused layout or norm layout breaks that), pre-RoPE q/k are what the attention function rotates (partial
rotary included), a family headlab cannot read is refused at load with its reason and an unknown one naming the
supported types, a parallel family has no resid_mid, GPT-2 (fused q/k/v) runs every path, and a user's own hooks
survive every probe."""

import pytest
import torch

import headlab
from headlab import UnsupportedModelError, hooks
from headlab.capture import AttentionEdit, editing
from headlab.model import HeadModel
from headlab.tiny import FAMILY_CONFIGS, byte_tokenizer, tiny_family

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


def test_a_family_headlab_cannot_read_is_refused_at_load_with_its_reason(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3", vocab_size=260, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64, moe_intermediate_size=16,
                                  n_routed_experts=2, num_experts_per_tok=1, q_lora_rank=16, kv_lora_rank=16,
                                  max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    deepseek = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="deepseek_v3.*multi-head latent attention"):
        HeadModel("deepseek", deepseek, byte_tokenizer())
    deepseek.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="deepseek_v3"):
        headlab.load_model(str(tmp_path))


def test_stablelm_with_q_k_norms_is_refused():
    from transformers import StableLmConfig, StableLmForCausalLM

    config = StableLmConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64, qk_layernorm=True)
    with pytest.raises(UnsupportedModelError, match="qk_layernorm"):
        HeadModel("stablelm", StableLmForCausalLM(config), byte_tokenizer())


def test_post_norm_opt_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                       word_embed_proj_dim=32, do_layer_norm_before=False)
    with pytest.raises(UnsupportedModelError, match="post-norm OPT"):
        HeadModel("opt", OPTForCausalLM(config), byte_tokenizer())


def test_an_unknown_family_is_refused_naming_the_supported_ones():
    from transformers import CodeGenConfig, CodeGenForCausalLM

    codegen = CodeGenForCausalLM(CodeGenConfig(vocab_size=260, n_embd=32, n_layer=1, n_head=4, rotary_dim=4))
    with pytest.raises(UnsupportedModelError, match="'codegen' yet; it supports apertus, .*bert, .*gpt_neox, .*gpt_oss"):
        HeadModel("codegen", codegen, byte_tokenizer())


def test_a_family_whose_attention_bypasses_the_seam_is_refused_with_the_reason():
    """BLOOM computes attention (with ALiBi) inside its own module: headlab's seam would never see a head."""
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=260, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedModelError, match="cannot support the model type 'bloom': .*attention seam"):
        HeadModel("bloom", bloom, byte_tokenizer())


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_every_family_shows_the_bridge_the_same_q_k_v_and_z(model_type):
    """Every .hf site equals its .bridge twin on every family: fused layouts (GPT-2's Conv1D, GPT-NeoX per head,
    Phi-3 with KV widths) cut the right columns and q/k norms show the tensor the bridge shows."""
    model = HeadModel(f"tiny-{model_type}", *tiny_family(model_type))
    assert sites_differ(model) == []


def sites_differ(model) -> list[str]:
    tokens = model.to_tokens("the same tensor on both trees")
    sites = [s for s in hooks.HF_SITES if not s.endswith("_normed") or model.architecture.has_qk_norm]
    points = [hooks.name(site, layer) for site in sites for layer in range(model.n_layers)]
    on_hf = hooks.hf_activations(model, tokens, points)
    _, on_bridge = hooks.run_with_cache(model, tokens, points)
    return [p for p in points if on_hf[p].shape != on_bridge[p].shape
            or not torch.allclose(on_hf[p], on_bridge[p], atol=1e-5, rtol=0)]  # fp32, two layers


@pytest.mark.parametrize("model_type, wrong", [("phi3", "thirds"), ("gpt_neox", "concat"), ("qwen3", "heads_first")])
def test_a_wrong_layout_shows_other_tensors(model_type, wrong, monkeypatch):
    """The layouts matter: Phi-3 cut in three equal thirds (wrong under grouped queries), GPT-NeoX read as q | k | v,
    Qwen3's norm output read as heads first: each breaks the equality with the bridge."""
    model = HeadModel(f"tiny-{model_type}", *tiny_family(model_type))
    arch = type(model.architecture)
    if wrong == "thirds":
        width = model.config.hidden_size
        monkeypatch.setattr(arch, "_fused_columns", lambda self, index, fused: slice(index * width, (index + 1) * width))
    elif wrong == "concat":
        monkeypatch.setattr(arch, "fused_layout", "concat")
    else:
        monkeypatch.setattr(arch, "qk_norm", "heads_first")
    assert sites_differ(model) != []


@pytest.mark.parametrize("model_type", ["gpt_neox", "gptj", "phi", "stablelm", "opt", "gpt2", "qwen3", "olmo2",
                                        "nemotron", "glm", "ernie4_5", "apertus", "exaone4", "olmo3", "gpt_bigcode",
                                        "cohere", "cohere2", "glm4", "vaultgemma", "gemma2"])
def test_pre_rope_q_and_k_are_what_the_attention_function_rotates(model_type):
    """The q and k the hooks show before RoPE (after the q/k norm where the family has one) are the attention
    function's q and k at position 0 (no rotation there) and, past the rotary dimensions of a partial rotary, at
    every position; the qk probe's pre and post products rest on this. OPT scales q before the attention call."""
    model = HeadModel(f"tiny-{model_type}", *tiny_family(model_type))
    tokens = model.to_tokens("rotary on part of each head")
    sites = ("q_normed", "k_normed") if model.architecture.has_qk_norm else ("q", "k")
    pre = {site: hooks.per_head(model, site, a) for site, a in
           zip(sites, hooks.hf_activations(model, tokens, [hooks.name(s, 0) for s in sites]).values())}
    seen = {}

    def keep(q, k, v, out, stats, problem):
        seen.update(q=q.transpose(1, 2), k=k.transpose(1, 2))  # [b, n, h, d]
        return out

    with editing(model, {0: AttentionEdit(keep)}), torch.no_grad():
        model.hf.base_model(input_ids=tokens, use_cache=False)
    rotary = _rotary_dims(model)
    for site, post in zip(sites, (seen["q"], seen["k"])):
        before = pre[site]
        factor = (post[:, 0] / before[:, 0]).flatten().median()  # 1, or OPT's q scaling
        torch.testing.assert_close(post[:, 0], factor * before[:, 0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(post[..., rotary:], factor * before[..., rotary:], atol=1e-6, rtol=1e-5)
        if rotary:  # RoPE did rotate the rest
            assert not torch.allclose(post[:, 1:, :, :rotary], factor * before[:, 1:, :, :rotary])


@pytest.mark.parametrize("model_type", ["gemma2", "vaultgemma", "gpt_oss"])
def test_layers_no_handler_covers_keep_the_familys_softcap_and_sinks(model_type):
    """With a handler on layer 0 only, layer 1 still caps its logits (Gemma 2, VaultGemma) or adds its learned sinks
    (gpt-oss): the logits equal the family's own eager attention (fp32, two layers: 1e-4, as the coverage matrix).
    transformers' SDPA takes neither, so dropping them there would move the logits by more (the cap bends scores of
    a few units here)."""
    model = HeadModel(f"tiny-{model_type}", *tiny_family(model_type))
    tokens = model.to_tokens("the quick brown fox jumps over the lazy dog, twice")
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model.hf(input_ids=tokens).logits
    model.hf.set_attn_implementation(previous)
    with editing(model, {0: AttentionEdit(lambda q, k, v, out, stats, problem: out)}), torch.no_grad():
        edited = model.hf(input_ids=tokens).logits
    torch.testing.assert_close(edited, eager, atol=1e-4, rtol=0)


def _rotary_dims(model) -> int:
    config, d = model.config, model.d_head
    if getattr(config, "rotary_dim", None):
        return config.rotary_dim
    fraction = getattr(config, "rotary_pct", None) or getattr(config, "partial_rotary_factor", None) \
        or (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    return int(d * fraction) if fraction else (0 if model.architecture.family in ("OPT", "GPT-2 / GPTBigCode") else d)


def test_a_parallel_family_has_no_resid_mid():
    from headlab.probes import patching

    model = HeadModel("tiny-gpt_neox", *tiny_family("gpt_neox"))
    with pytest.raises(UnsupportedModelError, match="no resid_mid: GPT-NeoX runs attention and the MLP in parallel"):
        patching.activation_patch(model, model.to_tokens("ab cd"), model.to_tokens("ab ce"), "resid_mid",
                                  answer=torch.tensor([5]), wrong=torch.tensor([6]), progress=False)


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
