"""Interventions against explicit recomputations on the bridge's hook points."""

import pytest
import torch

from headlab import HeadIndexError, InputError

HEADS = [(0, 1), (1, 2)]
TEXT = "a sequence longer than the sliding window of eight tokens"


def _visible(model, layer, n):
    """[n, n] bool: which keys each query can see in `layer`."""
    if not model.is_causal:
        return torch.ones(n, n, dtype=torch.bool)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = k <= q
    window = model.sliding_window(layer)
    return visible & (q - k < window) if window else visible


def _bridge_logits(model, tokens, hooks):
    with torch.no_grad():
        return model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)


def _pattern_hooks(model, heads, n):
    """Replace the listed heads' attention pattern by uniform attention over visible keys."""
    hooks = []
    for layer, head in heads:
        uniform = _visible(model, layer, n).float()
        uniform = uniform / uniform.sum(-1, keepdim=True)

        def hook(pattern, hook, head=head, uniform=uniform):
            pattern[:, head] = uniform
            return pattern
        hooks.append((f"blocks.{layer}.attn.hook_pattern", hook))
    return hooks


def _z_hooks(heads, value_of):
    hooks = []
    for layer, head in heads:
        def hook(z, hook, layer=layer, head=head):
            z[:, :, head] = value_of(layer, head, z)
            return z
        hooks.append((f"blocks.{layer}.attn.hook_z", hook))
    return hooks


def _uniform_value_hooks(model, heads, n):
    """z of the listed heads = (uniform pattern over visible keys) @ v, from the bridge's hook_v."""
    hooks, values = [], {}
    for layer, head in heads:
        uniform = _visible(model, layer, n).float()
        uniform = uniform / uniform.sum(-1, keepdim=True)

        def keep_v(v, hook, layer=layer):
            values[layer] = v.repeat_interleave(model.n_heads // model.n_kv_heads, dim=2)
            return v

        def set_z(z, hook, layer=layer, head=head, uniform=uniform):
            z[:, :, head] = torch.einsum("qk,bkd->bqd", uniform, values[layer][:, :, head])
            return z
        hooks += [(f"blocks.{layer}.attn.hook_v", keep_v), (f"blocks.{layer}.attn.hook_z", set_z)]
    return hooks


def test_uniform_ablation_equals_a_uniform_pattern(tiny):
    tokens = tiny.to_tokens(TEXT)
    expected = _bridge_logits(tiny, tokens, _uniform_value_hooks(tiny, HEADS, tokens.shape[1]))
    if tiny.is_causal:  # these bridges compute attention themselves, so a pattern edit takes effect
        by_pattern = _bridge_logits(tiny, tokens, _pattern_hooks(tiny, HEADS, tokens.shape[1]))
        assert (by_pattern - expected).abs().max() < 1e-4
    with tiny.ablate_heads(HEADS, mode="uniform"):
        hf, bridge = tiny.logits(tokens), _bridge_logits(tiny, tokens, [])
    assert (hf - expected).abs().max() < 1e-4
    assert (bridge - expected).abs().max() < 1e-4
    assert (hf - tiny.logits(tokens)).abs().max() > 1e-3  # the ablation did something


def test_zero_and_mean_ablation_equal_hook_z_edits(tiny_llama):
    model, tokens = tiny_llama, tiny_llama.to_tokens(TEXT)
    zero = _bridge_logits(model, tokens, _z_hooks(HEADS, lambda layer, head, z: 0.0))
    with model.ablate_heads(HEADS, mode="zero"):
        assert (model.logits(tokens) - zero).abs().max() < 1e-5
    mean = _bridge_logits(model, tokens, _z_hooks(HEADS, lambda layer, head, z: z[:, :, head].mean((0, 1))))
    with model.ablate_heads(HEADS, mode="mean"):
        assert (model.logits(tokens) - mean).abs().max() < 1e-5
    reference = model.to_tokens(["another text of some length", "and a second one, just as long"[:27]])
    _, cache = model.run_with_cache(reference)
    means = {layer: cache[f"blocks.{layer}.attn.hook_z"].mean((0, 1)) for layer, _ in HEADS}
    expected = _bridge_logits(model, tokens, _z_hooks(HEADS, lambda layer, head, z: means[layer][head]))
    with model.ablate_heads(HEADS, mode="mean", reference=reference):
        assert (model.logits(tokens) - expected).abs().max() < 1e-5


def test_scale_heads(tiny_gemma3):
    model, tokens = tiny_gemma3, tiny_gemma3.to_tokens(TEXT)
    expected = _bridge_logits(model, tokens, _z_hooks([(2, 3)], lambda layer, head, z: 2.5 * z[:, :, head]))
    with model.scale_heads({"L2H3": 2.5}):
        assert (model.logits(tokens) - expected).abs().max() < 1e-5
    with model.scale_heads({(0, 0): 0.0, (2, 1): 0.0}):
        scaled = model.logits(tokens)
    with model.ablate_heads([(0, 0), (2, 1)], mode="zero"):
        assert torch.equal(model.logits(tokens), scaled)


def test_leaving_the_block_restores_bit_for_bit(tiny):
    tokens = tiny.to_tokens(TEXT)
    before_hf, before_bridge = tiny.logits(tokens), _bridge_logits(tiny, tokens, [])
    weights = {k: v.clone() for k, v in tiny.hf.state_dict().items()}
    with pytest.raises(RuntimeError):
        with tiny.ablate_heads(HEADS, mode="uniform"), tiny.scale_heads({(0, 0): 3.0}):
            raise RuntimeError("leave early")
    for mode in ("uniform", "zero", "mean"):
        with tiny.ablate_heads(HEADS, mode=mode):
            tiny.logits(tokens)
    assert torch.equal(tiny.logits(tokens), before_hf)
    assert torch.equal(_bridge_logits(tiny, tokens, []), before_bridge)
    assert all(torch.equal(v, weights[k]) for k, v in tiny.hf.state_dict().items())


def test_bad_interventions(tiny_llama):
    with pytest.raises(InputError, match="uniform, zero, mean"):
        with tiny_llama.ablate_heads(HEADS, mode="half"):
            pass
    with pytest.raises(HeadIndexError, match="layers 0-1"):
        with tiny_llama.ablate_heads([(5, 0)]):
            pass
    with pytest.raises(InputError, match="dict"):
        with tiny_llama.scale_heads([(0, 0)]):
            pass
