"""Models bigger than one device: with part of the layers offloaded to disk by accelerate (a device map), the capture
path's statistics, interventions and patching give what the plain model gives."""

import pytest
import torch
from headlab.probes import patching as P

import headlab


def device_map(model, offloaded: set[int]) -> dict:
    """A Llama's modules by name: the decoder layers in `offloaded` on disk, everything else on the CPU."""
    out = {"lm_head": "cpu"}
    for name, _ in model.hf.model.named_children():
        if name != "layers":
            out[f"model.{name}"] = "cpu"
    for layer in range(model.n_layers):
        out[f"model.layers.{layer}"] = "disk" if layer in offloaded else "cpu"
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama folder",
                                  pytest.param("smollm2-135m", marks=pytest.mark.real)])
def test_offloaded_layers_change_no_number(name, tmp_path):
    if name == "tiny-llama folder":  # read by from_pretrained, as a registry model's cached weights are
        name = tmp_path / "folder"
        built = headlab.load_model("tiny-llama")
        built.hf.save_pretrained(name)
        built.tokenizer.save_pretrained(name)
    plain = headlab.load_model(name)
    offloaded = set(range(0, plain.n_layers, 2))
    offload_dir = tmp_path / "offload"
    model = headlab.load_model(name, device_map=device_map(plain, offloaded), offload_dir=offload_dir)
    assert {p.device.type for p in model.hf.model.layers[0].parameters()} == {"meta"}  # really on disk
    if name == "tiny-llama":  # built in memory: its offloaded weights are written to the offload folder
        assert any(offload_dir.iterdir())
    else:  # read from the safetensors file at each forward, never copied
        assert not offload_dir.exists() or not any(offload_dir.iterdir())
    tokens = plain.to_tokens("The offloaded layers are streamed in from the disk at every forward.")
    torch.testing.assert_close(model.logits(tokens), plain.logits(tokens), atol=0, rtol=0)
    stats, reference = (m.attention_stats(tokens, want=("lse", "top1", "colsum")) for m in (model, plain))
    for layer in stats:
        assert torch.equal(stats[layer].lse, reference[layer].lse) and torch.equal(stats[layer].colsum,
                                                                                   reference[layer].colsum)
    with model.ablate_heads(["L1H1"]), plain.ablate_heads(["L1H1"]):
        assert torch.equal(model.logits(tokens), plain.logits(tokens))
    clean, corrupted = tokens, tokens.clone()
    corrupted[0, 3] = tokens[0, 4]
    metric = P.logit_diff(torch.tensor([tokens[0, -1]]), torch.tensor([tokens[0, 2]]))
    ours, theirs = (P.activation_patch(m, clean, corrupted, "z", over=("head",), metric=metric, progress=False,
                                       layers=[0, 1]) for m in (model, plain))
    assert torch.equal(ours.values[[0, 1]], theirs.values[[0, 1]])  # the patched layers (the others hold NaN)
