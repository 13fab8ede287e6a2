"""The attention viewer: its data equal the bridge's patterns (short prompts) and the kernel's statistics equal the
patterns' argmax and column sums (long prompts); the page draws in headless Chromium without console messages."""

import json
import re

import numpy as np
import pytest
import torch
from test_report_render import chromium

import headlab
from headlab.hooks import attention_patterns
from headlab.viewer import LEVELS, attention_data, show_attention

TEXT = "When Mary and John went to the store, John gave a drink to"


def test_full_rows_are_the_bridge_patterns_quantised():
    model = headlab.load_model("tiny-llama")
    tokens = model.to_tokens(TEXT)
    data = attention_data(model, tokens, heads=["L1H2", (0, 3)])
    patterns = attention_patterns(model, tokens)[0]
    assert data["mode"] == "full" and data["heads"] == ["L1H2", "L0H3"] and len(data["tokens"]) == tokens.shape[1]
    for name, (layer, head) in (("L1H2", (1, 2)), ("L0H3", (0, 3))):
        rows = data["full"][name]
        assert [len(r) for r in rows] == list(range(1, tokens.shape[1] + 1))  # causal: keys 0..i
        expected = (patterns[layer, head].clamp(0, 1) * LEVELS).round()
        for i, row in enumerate(rows):
            assert torch.equal(torch.tensor(row, dtype=expected.dtype), expected[i, :i + 1])


def test_long_prompts_use_the_kernel_statistics_which_match_the_patterns():
    model = headlab.load_model("tiny-llama")
    tokens = model.to_tokens(TEXT)
    n = tokens.shape[1]
    data = attention_data(model, tokens, max_full=8)  # as if the prompt were long: no N x N
    assert data["mode"] == "stats" and "full" not in data and len(data["heads"]) == model.n_layers * model.n_heads
    patterns = attention_patterns(model, tokens)[0].double()
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            stats = data["stats"][f"L{layer}H{head}"]
            p = patterns[layer, head]
            top = p.max(-1).values
            chosen = p[torch.arange(n), torch.tensor(stats["top1"])]
            # the kernel's top-1 key is the pattern's argmax; ties and fp32 rounding of the two paths (1e-5 apart)
            # may pick another key of the same weight
            assert torch.all(top - chosen < 1e-5)
            received = p.sum(0) / torch.arange(n, 0, -1)
            expected = (received / received.max()).clamp(0, 1) * LEVELS
            assert np.abs(np.array(stats["received"]) - expected.numpy()).max() <= 1  # one level of 255 (rounding)


def test_a_wrong_head_is_refused_and_heads_default_to_all():
    model = headlab.load_model("tiny-llama")
    with pytest.raises(headlab.HeadIndexError):
        show_attention(model, TEXT, heads=["L9H0"])
    view = show_attention(model, TEXT)
    assert len(view.data["heads"]) == 8 and "hlAttentionView" in view._repr_html_() and "http" not in view.html


def test_image_tokens_are_found_on_a_vision_language_model():
    from headlab.probes.vision import shapes_prompts

    model = headlab.load_model("shapes-llava")
    prompt = shapes_prompts(model, 1)[0]
    data = attention_data(model, prompt.ids[None], heads=["L0H0"], pixel_values=prompt.pixel_values)
    assert data["image"] == list(prompt.span) and data["mode"] == "full"


@pytest.mark.browser
def test_the_viewer_draws_in_headless_chromium(tmp_path):
    model = headlab.load_model("tiny-llama")
    page = show_attention(model, TEXT, heads=["L1H2", "L0H1"]).save(tmp_path / "attention.html")
    dom = chromium("--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri(), cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    n = model.to_tokens(TEXT).shape[1]
    assert len(re.findall(r'<span class="hl-tok[^"]*"', dom.stdout)) == n
    assert dom.stdout.count('class="on"') == 1 and "L1H2 — query" in dom.stdout
    assert json.loads(re.search(r"hlAttentionView\(document.getElementById\('[^']+'\), (\{.*\})\);",
                                page.read_text()).group(1))["heads"] == ["L1H2", "L0H1"]
