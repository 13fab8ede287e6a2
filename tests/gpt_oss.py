"""A tiny random gpt-oss (learned attention sinks, a sliding window on layer 0, a mixture-of-experts MLP) and the fp64
reference of its attention statistics from its own eager attention probabilities."""

from __future__ import annotations

import copy

import torch

import headlab
from headlab.tiny import byte_tokenizer

# Sink logits per layer and head: around the scores' scale and one far above (head 0 of layer 1 gives its sink most
# of every row), so that leaving them out moves every statistic.
SINKS = [[1.5, -2.0, 0.5, 3.0], [6.0, -1.0, 2.0, 0.0]]


def build_tiny_gpt_oss(folder) -> headlab.HeadModel:
    """Build, save (safetensors) and load through headlab a 2-layer gpt-oss with the byte tokenizer."""
    from transformers import GptOssConfig, GptOssForCausalLM

    tokenizer = byte_tokenizer()
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, initializer_range=0.2,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 8, "rope_theta": 150000.0},
        bos_token_id=0, eos_token_id=1, pad_token_id=2, architectures=["GptOssForCausalLM"])
    torch.manual_seed(0)
    hf = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer, sinks in zip(hf.model.layers, SINKS):
            layer.self_attn.sinks.copy_(torch.tensor(sinks))
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return headlab.load_model(str(folder))


def eager_reference(model, tokens, spans) -> dict[int, dict]:
    """Per layer, every statistic in fp64 from gpt-oss's eager attention probabilities (run in fp64): p [b h n n]
    over the keys (eager drops the sink's column), the sink's weight 1 - sum p, lse = sink - log(sink's weight),
    entropy over keys and sink, and the heads' outputs z = p v [b h n d] (the output projection's input)."""
    hf = copy.deepcopy(model.hf).double()
    hf.set_attn_implementation("eager")
    hf.set_experts_implementation("eager")  # the grouped matmul of the experts has no fp64
    z = {}

    def keep(layer):
        def hook(module, args):
            z[layer] = args[0].detach()
        return hook

    handles = [hf.model.layers[i].self_attn.o_proj.register_forward_pre_hook(keep(i)) for i in range(model.n_layers)]
    with torch.no_grad():
        attentions = hf(input_ids=tokens, output_attentions=True).attentions
    for handle in handles:
        handle.remove()
    out = {}
    for layer, p in enumerate(attentions):
        assert p.shape[-1] == tokens.shape[1]  # the sink's column is not in eager's probabilities
        sinks = hf.model.layers[layer].self_attn.sinks.detach().view(1, -1, 1)
        sink_prob = 1 - p.sum(-1)
        plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
        b, n = p.shape[0], p.shape[2]
        out[layer] = {
            "p": p, "sink_prob": sink_prob, "lse": sinks - sink_prob.log(),
            "entropy": -plogp - sink_prob * sink_prob.log(), "top1_prob": p.max(-1).values, "top1": p.argmax(-1),
            "span_mass": torch.stack([p[..., a:e].sum(-1) for a, e in spans], -1), "colsum": p.sum(-2),
            "out": z[layer].view(b, n, -1, model.d_head).transpose(1, 2)}
    return out

