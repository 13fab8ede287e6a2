"""Real pretrained models from their PyPI packages (cached after the first load)."""

import pydoc_data.topics

import pytest
import torch
from headlab.probes import detectors
from tolerances import assert_within, depth_bound
from transformer_lens.head_detector import detect_head

pytestmark = pytest.mark.real

TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."


def _haystack(model, n_tokens):
    text = " ".join(pydoc_data.topics.topics.values())
    return model.to_tokens(text[: 8 * n_tokens])[:, :n_tokens]


def test_smollm2_loads_with_its_geometry_and_bos(smollm2):
    assert smollm2.geometry == {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "d_head": 64, "n_ctx": 8192,
                                "is_causal": True}
    assert smollm2.tokenizer.bos_token == "<|im_start|>"
    tokens = smollm2.to_tokens("Hello")
    assert tokens[0, 0].item() == smollm2.bos_token_id and (tokens == smollm2.bos_token_id).sum() == 1
    assert torch.equal(smollm2.bridge.to_tokens("Hello"), tokens)


def test_smollm2_logits_parity(smollm2):
    from transformers import AutoModelForCausalLM

    from headlab.registry import REAL_MODELS

    spec = REAL_MODELS["smollm2-135m"]
    source = spec.locate_source(spec)
    plain = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    tokens = smollm2.to_tokens(TEXT)
    with torch.no_grad():
        reference = plain(input_ids=tokens).logits
        bridge = smollm2.bridge(tokens)
    hf = smollm2.logits(tokens)
    assert torch.equal(hf, reference)  # the cached safetensors copy is the dequantized GGUF, the same path
    bound = depth_bound(smollm2.n_layers, reference.abs().max())
    assert_within(bridge, reference, bound)  # eager vs SDPA
    with smollm2.scale_heads({"L29H0": 0.9}), torch.no_grad():  # a wrong variant: one head of the last layer off
        wrong = smollm2.bridge(tokens)
    with pytest.raises(AssertionError):
        assert_within(wrong, reference, bound)


def test_smollm2_has_an_induction_head(smollm2):
    scores = detectors.scan(smollm2, seq_len=50, n_prompts=8, seed=0, progress=False)
    best = scores.top(1).iloc[0]
    assert best["score"] > 0.8, scores.top(5)
    assert scores.top(1, by="previous_token").iloc[0]["previous_token"] > 0.8


def test_smollm2_detectors_equal_detect_head(smollm2):
    ours = detectors.detector_scores(smollm2, smollm2.to_tokens(TEXT), progress=False)
    for kind, name in [("induction", "induction_head"), ("previous_token", "previous_token_head"),
                       ("duplicate_token", "duplicate_token_head")]:
        assert (ours[kind] - detect_head(smollm2.bridge, TEXT, name)).abs().max() < 1e-6
        wrong = detect_head(smollm2.bridge, TEXT, name, exclude_bos=True)  # a wrong variant: the BOS column left out
        assert (ours[kind] - wrong).abs().max() > 1e-6


def test_smollm2_ablation_agrees_on_both_paths(smollm2):
    tokens = smollm2.to_tokens(TEXT)
    before = smollm2.logits(tokens)
    with smollm2.ablate_heads(["L18H6", "L17H3"], mode="uniform"):
        hf = smollm2.logits(tokens)
        with torch.no_grad():
            bridge = smollm2.bridge(tokens)
    with smollm2.ablate_heads(["L18H6", "L17H4"], mode="uniform"):  # a wrong variant: another head ablated
        wrong = smollm2.logits(tokens)
    bound = depth_bound(smollm2.n_layers, hf.abs().max())
    assert_within(hf, bridge, bound)
    with pytest.raises(AssertionError):
        assert_within(wrong, bridge, bound)
    assert (hf - before).abs().max() > 0.1
    assert torch.equal(smollm2.logits(tokens), before)


def test_gemma3_parity_past_the_sliding_window(gemma3):
    assert gemma3.geometry["n_kv_heads"] == 1 and gemma3.sliding_window(0) == 512 and gemma3.sliding_window(5) is None
    tokens = _haystack(gemma3, 600)  # longer than the 512-token window of the local layers
    assert tokens[0, 0].item() == gemma3.bos_token_id and (tokens[0] == gemma3.bos_token_id).sum() == 1
    hf = gemma3.logits(tokens)
    with torch.no_grad():
        bridge = gemma3.bridge(tokens)
    bound = depth_bound(gemma3.n_layers, hf.abs().max())
    assert_within(hf, bridge, bound)
    with gemma3.ablate_heads(["L0H1", "L5H2"], mode="uniform"):
        ablated_hf = gemma3.logits(tokens)
        with torch.no_grad():
            ablated_bridge = gemma3.bridge(tokens)
    assert_within(ablated_hf, ablated_bridge, bound)
    window, gemma3.hf.config.sliding_window = gemma3.hf.config.sliding_window, 10**6
    try:  # a wrong variant: the sliding window missing (a plain causal mask on the local layers)
        unwindowed = gemma3.logits(tokens)
    finally:
        gemma3.hf.config.sliding_window = window
    with pytest.raises(AssertionError):
        assert_within(unwindowed, bridge, bound)


def test_gemma3_detectors(gemma3):
    scores = detectors.scan(gemma3, seq_len=30, n_prompts=4, progress=False)
    assert len(scores) == 18 * 4
    ours = detectors.detector_scores(gemma3, gemma3.to_tokens(TEXT), progress=False)
    assert (ours["induction"] - detect_head(gemma3.bridge, TEXT, "induction_head")).abs().max() < 1e-6
    wrong = detect_head(gemma3.bridge, TEXT, "induction_head", exclude_bos=True)  # a wrong variant: no BOS column
    assert (ours["induction"] - wrong).abs().max() > 1e-6


def test_minilm_is_a_bidirectional_encoder():
    import headlab

    model = headlab.load_model("minilm-l6")
    assert model.geometry == {"n_layers": 6, "n_heads": 12, "n_kv_heads": 12, "d_head": 32, "n_ctx": 512,
                              "is_causal": False}
    tokens = model.to_tokens("attention flows both ways")
    assert tokens[0, 0].item() == model.tokenizer.cls_token_id and tokens[0, -1].item() == model.tokenizer.sep_token_id
    _, cache = model.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert pattern.triu(1).sum() > 1.0  # queries look ahead
