"""Weight-only scores: the planted copying and previous-token heads rank first, the d_head x d_head shortcut equals a
direct eigenvalue computation of the full vocab x vocab OV circuit in float64, and wrong variants fail."""

import pytest
import torch
from headlab.probes import weight_scores as ws
from planted import INDUCTION_HEAD, PREVIOUS_TOKEN_HEAD, induction_model

import headlab
from headlab.capture import AttentionEdit, editing
from headlab.model import HeadModel
from headlab.tiny import tiny_family


@pytest.fixture(scope="module")
def planted():
    return induction_model()


def test_planted_copying_and_previous_token_heads_rank_first(planted):
    table = ws.scan(planted, progress=False)
    assert table.heads(1) == [INDUCTION_HEAD]  # its OV circuit writes the token back where the unembedding reads it
    assert table.matrix()[INDUCTION_HEAD] == pytest.approx(1.0, abs=1e-9)
    assert table.heads(1, by="previous_token") == [PREVIOUS_TOKEN_HEAD]
    assert table.matrix("previous_token")[PREVIOUS_TOKEN_HEAD] > 0.5
    assert set(table.meta["roles"]) == {"ov-copying", "qk-previous-token"}


def test_a_suppressing_head_scores_minus_one(planted):
    model = induction_model()
    with torch.no_grad():
        model.hf.model.layers[1].self_attn.o_proj.weight.neg_()  # wrong sign: the head lowers the attended token
    table = ws.scan(model, progress=False)
    assert table.heads(1) != [INDUCTION_HEAD]
    assert table.matrix()[INDUCTION_HEAD] == pytest.approx(-1.0, abs=1e-9)


def test_the_kernel_rotated_the_wrong_way_misses_the_previous_token_head(planted):
    q, k = ws.mean_qk(planted, 0, torch.arange(4, 200))
    rotary = ws.rotary_of(planted, 0, torch.arange(64))
    right = ws.positional_kernel(q, k, rotary, 1.0).softmax(-1)
    wrong = ws.positional_kernel(q, k, rotary, 1.0, sign=-1).softmax(-1)  # keys placed after the query
    assert right[PREVIOUS_TOKEN_HEAD[1]].argmax() == 1
    assert wrong[PREVIOUS_TOKEN_HEAD[1]].argmax() != 1


@torch.no_grad()
def attention_logits_of_one_token(model, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer 0 of a prompt of one token repeated n times (every position reads the same residual, so q and k before
    RoPE are the same everywhere): (q, k) [head, d_head] before RoPE as mean_qk reads them, and the logits q . k the
    family's own attention call computes for the query at n-1 and the key at n-1-t, [head, t] (unscaled)."""
    q, k = ws.mean_qk(model, 0, torch.tensor([5]))
    seen = {}

    def keep(q_rot, k_rot, v, out, stats, problem):
        seen.update(q=q_rot[0].double(), k=k_rot[0].double())  # [h, n, d], after RoPE
        return out

    with editing(model, {0: AttentionEdit(keep)}):
        model.hf.base_model(input_ids=torch.full((1, n), 5), use_cache=False)
    k_rot = seen["k"].repeat_interleave(model.n_heads // model.n_kv_heads, 0)
    return q, k, torch.einsum("hd,hnd->hn", seen["q"][:, n - 1], k_rot.flip(1))


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "phi", "stablelm", "gpt_neox", "gpt_oss",
                                        "gptj", "olmo2", "nemotron", "glm", "ernie4_5", "apertus", "exaone4", "olmo3",
                                        "cohere", "cohere2", "glm4", "vaultgemma"])
def test_the_positional_kernel_is_the_familys_own_attention_logit(model_type):
    """The probe's kernel for the q and k at one token equals the logits the family's attention computes between
    positions n-1 and n-1-t: partial rotary (the rest of each head passes), gpt-oss's halves with one angle per
    pair, GPT-J's interleaved pairs and (sin, cos) order."""
    model = HeadModel(f"tiny-{model_type}", *tiny_family(model_type))
    n = 12
    q, k, logits = attention_logits_of_one_token(model, n)
    kernel = ws.positional_kernel(q, k, ws.rotary_of(model, 0, torch.arange(n)), 1.0)
    # float32 attention against the float64 kernel: |logit| ~ 1, a few float32 ulps of d_head products
    torch.testing.assert_close(kernel, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["phi", "gpt_neox", "gptj"])
def test_rope_over_the_whole_head_misses_a_partial_rotary_familys_logits(model_type, monkeypatch):
    """The wrong variant: rotate_half over every feature of a head whose RoPE covers only part of it (the family's
    angles tiled to fill the head)."""
    model = HeadModel(f"tiny-{model_type}", *tiny_family(model_type))
    n = 12
    q, k, logits = attention_logits_of_one_token(model, n)
    arch, module = type(model.architecture), model.architecture.rotary_embedding()
    tiles = model.d_head // model.architecture.rotary_dims

    class WholeHead(torch.nn.Module):
        def forward(self, x, position_ids):
            return tuple(t.repeat(1, 1, tiles) for t in module(x, position_ids))

    monkeypatch.setattr(arch, "rotary_dims", property(lambda self: self.d_head))
    monkeypatch.setattr(arch, "rotary_layout", "halves")
    monkeypatch.setattr(arch, "rotary_embedding", lambda self: WholeHead())
    kernel = ws.positional_kernel(q, k, ws.rotary_of(model, 0, torch.arange(n)), 1.0)
    assert not torch.allclose(kernel, logits, atol=1e-3, rtol=1e-3)


def gain(norm) -> torch.Tensor | float:
    return 1.0 if norm is None or getattr(norm, "weight", None) is None else norm.weight.double()


NORM_KINDS = {"tiny-llama": ("rms", "rms"), "tiny-olmo": ("layer", "layer"), "tiny-olmo2": (None, "rms")}  # in, final


@torch.no_grad()
def direct_ov(model, layer: int, head: int) -> torch.Tensor:
    """The full [vocab, vocab] OV circuit in float64, written out: the embeddings as the input norm normalises them
    (centred first by a LayerNorm, as they are without an input norm, OLMo 2) times its weight, W_V and W_O of the
    head, a post-attention norm's weight, the final norm (centring where it is a LayerNorm) and its weight, the
    unembedding."""
    arch, dh = model.architecture, model.d_head
    x = model.hf.get_input_embeddings().weight.double()
    kind_in, kind_out = NORM_KINDS[model.name]
    norm_in, norm_out = getattr(arch.layers()[layer], "input_layernorm", None), arch.decoder().norm
    if kind_in == "layer":
        x = x - x.mean(-1, keepdim=True)
    if kind_in is not None:
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12) * gain(norm_in)
    kv = head // (model.n_heads // model.n_kv_heads)
    w_v = arch.v(layer).module.weight.double()[kv * dh:(kv + 1) * dh].T  # [d, dh]
    w_o = arch.o(layer).weight.double()[:, head * dh:(head + 1) * dh].T  # [dh, d]
    written = x @ w_v @ w_o  # [vocab, d]
    if kind_out == "layer":
        written = written - written.mean(-1, keepdim=True)
    written = written * gain(arch.post_attention_norm(layer)) * gain(norm_out)
    return written @ model.hf.get_output_embeddings().weight.double().T


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-olmo", "tiny-olmo2"])
def test_copying_score_equals_the_direct_eigenvalues_in_float64(name):
    """Llama (RMS norms), OLMo (LayerNorms without weights: centring, gain one) and OLMo 2 (no input norm, an RMS norm
    after attention)."""
    model = headlab.load_model(name) if name == "tiny-llama" else HeadModel(name, *tiny_family(name[5:]))
    table = ws.scan(model, progress=False)
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            full = torch.linalg.eigvals(direct_ov(model, layer, head))  # vocab eigenvalues, all but d_head ~ 0
            nonzero = full[full.abs().argsort(descending=True)[:model.d_head]]
            # float64 eigenvalues of a rank-d_head matrix: the ~vocab - d_head spurious ones are ~1e-12 of the rest
            assert table.matrix()[layer, head] == pytest.approx(float(ws.copying_score(full)), abs=1e-9)
            assert table.matrix("positive_share")[layer, head] == pytest.approx(
                float(ws.positive_share(nonzero)), abs=1e-9)
    arch, dh = model.architecture, model.d_head
    w_vo = (arch.v(0).module.weight.detach().double()[:dh].T @ arch.o(0).weight.detach().double()[:, :dh].T)  # no W_E, no W_U
    wrong = ws.copying_score(torch.linalg.eigvals(w_vo))  # a wrong eigenvalue set
    assert float(wrong) != pytest.approx(table.matrix()[0, 0], abs=1e-3)


def test_an_encoder_is_refused():
    with pytest.raises(headlab.UnsupportedModelError):
        ws.scan(headlab.load_model("tiny-bert"), progress=False)
