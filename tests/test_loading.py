"""Models a researcher brings: a transformers model already in memory (dispatched with a device map included) and a
TransformerLens bridge give what the same weights loaded by headlab give; folders load straight into the asked dtype
with the numbers of the fp32 load converted; `--device auto` picks CUDA, else MPS, else the CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import headlab
from headlab import InputError
from headlab.cli import app
from headlab.loading import check_device
from headlab.probes import detectors

TEXT = "The researcher brought a model of her own, loaded it, and asked which heads copy."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """tiny-llama saved as a Hugging Face folder (safetensors and its tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama-folder")
    model = headlab.load_model("tiny-llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    return headlab.load_model(folder)


def same_answers(model, reference):
    """Logits, kernel statistics, the hook path's attention patterns and a probe's table equal the reference's bit for
    bit (the same weights and the same attention implementations on the same device: no tolerance)."""
    tokens = reference.to_tokens(TEXT)
    assert torch.equal(model.logits(tokens), reference.logits(tokens))
    patterns = (m.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))[1]
                for m in (model, reference))
    cache, expected = patterns
    assert len(expected.keys()) == reference.n_layers
    assert all(torch.equal(cache[name], expected[name]) for name in expected.keys())
    stats, expected = (m.attention_stats(tokens, want=("lse", "top1", "colsum")) for m in (model, reference))
    for layer in expected:
        assert torch.equal(stats[layer].lse, expected[layer].lse)
        assert torch.equal(stats[layer].colsum, expected[layer].colsum)
    assert detectors.scan(model, quick=True, progress=False).frame.equals(
        detectors.scan(reference, quick=True, progress=False).frame)


def test_a_transformers_model_in_memory(folder, reference):
    hf = AutoModelForCausalLM.from_pretrained(folder)
    model = headlab.load_model(hf)  # its tokenizer comes from the folder it was loaded from
    assert model.hf is hf and model.name == str(folder) and model.load_info.source == "in memory"
    assert headlab.load_model(hf, tokenizer=AutoTokenizer.from_pretrained(folder), name="mine").name == "mine"
    same_answers(model, reference)
    with model.ablate_heads(["L1H2"]), reference.ablate_heads(["L1H2"]):
        tokens = reference.to_tokens(TEXT)
        assert torch.equal(model.logits(tokens), reference.logits(tokens))


def test_a_model_built_in_memory_is_named_by_its_class():
    built = headlab.load_model("tiny-llama")
    model = headlab.load_model(type(built.hf)(built.hf.config), tokenizer=built.tokenizer)
    assert model.name == "LlamaForCausalLM"


def test_a_dispatched_model_with_layers_on_disk(folder, reference, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    hf = AutoModelForCausalLM.from_pretrained(folder, device_map=device_map, offload_folder=str(tmp_path))
    assert {p.device.type for p in hf.model.layers[0].parameters()} == {"meta"}  # accelerate streams it in
    same_answers(headlab.load_model(hf), reference)


def test_a_transformer_lens_bridge(folder, reference):
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=AutoModelForCausalLM.from_pretrained(folder),
                                                 tokenizer=tokenizer, device="cpu")
    tokens = reference.to_tokens(TEXT)
    with torch.no_grad():
        before = bridge(tokens)
    model = headlab.load_model(bridge)
    assert model.bridge is bridge and model.tokenizer is bridge.tokenizer  # the hook path is the user's own bridge
    assert model.hf.config._attn_implementation == "sdpa"  # .hf is unwrapped: transformers' own modules
    assert not any(type(m).__module__.startswith("transformer_lens") for m in model.hf.modules())
    same_answers(model, reference)
    with torch.no_grad():
        assert torch.equal(bridge(tokens), before)  # the user's bridge still answers as it did
    assert torch.equal(headlab.HeadModel("direct", bridge).logits(tokens), reference.logits(tokens))


def test_a_given_tokenizer_is_used_and_the_folders_is_not_read(folder, reference, tmp_path, monkeypatch):
    """A folder of weights without tokenizer files loads with `tokenizer=`; with one, no tokenizer is read at all."""
    weights_only = tmp_path / "weights-only"
    reference.hf.save_pretrained(weights_only)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = headlab.load_model(weights_only, tokenizer=tokenizer)
    assert model.tokenizer is tokenizer
    same_answers(model, reference)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: pytest.fail("a tokenizer was read"))
    assert headlab.load_model(folder, tokenizer=tokenizer).tokenizer is tokenizer


def test_a_folder_loads_straight_into_the_dtype_with_the_numbers_of_a_conversion(folder, reference):
    """Reading fp32 safetensors into bf16 rounds each weight as converting the fp32 model does: the same numbers."""
    model = headlab.load_model(folder, dtype="bfloat16")
    converted = {k: v.to(torch.bfloat16) for k, v in reference.hf.state_dict().items()}
    loaded = model.hf.state_dict()
    assert model.dtype == torch.bfloat16 and loaded.keys() == converted.keys()
    assert all(torch.equal(loaded[k], converted[k]) for k in loaded)


def test_a_folder_is_read_in_the_dtype_not_converted_after(folder, monkeypatch):
    """No model is built in fp32 and then converted: `Module.to` is never called on the way (a model built in memory,
    a tiny one, is converted after, which the spy sees)."""
    calls = []
    to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: calls.append(args) or to(self, *args,
                                                                                                      **kwargs))
    assert headlab.load_model(folder, dtype="bfloat16").dtype == torch.bfloat16 and calls == []
    headlab.load_model("tiny-llama", dtype="bfloat16")
    assert calls == [(torch.bfloat16,)]


def test_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert check_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("auto") == torch.device("mps") == check_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device("auto") == torch.device("cuda")


def test_device_auto_in_the_cli(tmp_path):
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("auto picks an accelerator here")
    out = tmp_path / "scan"
    result = CliRunner().invoke(app, ["scan", "tiny-llama", "--device", "auto", "--probes", "detectors", "--quick",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "scan.json").read_text())
    assert summary["settings"]["device"] == "auto" and summary["machine"]["device"] == "cpu"


def test_scan_from_python_writes_what_the_command_writes(folder, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["scan", str(folder), "--probes", "detectors,sinks", "--quick", "--out",
                                 str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    results = headlab.scan(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "python",
                           probes=["detectors", "sinks"], quick=True)
    assert list(results) == ["detectors", "sinks"]
    assert (tmp_path / "python" / "heads.csv").read_bytes() == (tmp_path / "cli" / "heads.csv").read_bytes()
    with pytest.raises(InputError, match="applies only to a model loaded by name"):
        headlab.scan(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "ray", engine="ray")


@pytest.mark.real
def test_smollm2_in_memory_gives_the_registry_scan(tmp_path):
    """SmolLM2 loaded by the user with transformers from the cached folder: the heads.csv of two probes equals, byte
    for byte, that of `load_model("smollm2-135m")` (the full quick scan was compared once, by hand)."""
    registry = headlab.load_model("smollm2-135m")
    folder = registry.load_info.source
    mine = AutoModelForCausalLM.from_pretrained(folder)
    headlab.scan(registry, tmp_path / "registry", probes="detectors,sinks", quick=True)
    headlab.scan(headlab.load_model(mine, tokenizer=AutoTokenizer.from_pretrained(folder)), tmp_path / "mine",
                 probes="detectors,sinks", quick=True)
    assert (tmp_path / "mine" / "heads.csv").read_bytes() == (tmp_path / "registry" / "heads.csv").read_bytes()


@pytest.mark.real
def test_a_first_load_dequantizes_once_then_reads_the_cache_in_the_dtype(tmp_path, monkeypatch, smollm2):
    """With an empty cache the GGUF is dequantized, cached, and read back in the asked dtype: the weights of the fp32
    model converted, bit for bit; the next load reads the cache."""
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp_path))
    first = headlab.load_model("smollm2-135m", dtype="bfloat16")
    assert not first.load_info.cached and first.dtype == torch.bfloat16
    converted = {k: v.to(torch.bfloat16) for k, v in smollm2.hf.state_dict().items()}
    assert all(torch.equal(v, converted[k]) for k, v in first.hf.state_dict().items())
    assert headlab.load_model("smollm2-135m").load_info.cached
