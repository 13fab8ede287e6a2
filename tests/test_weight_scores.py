"""Weight-only scores: the planted copying and previous-token heads rank first, the d_head x d_head shortcut equals a
direct eigenvalue computation of the full vocab x vocab OV circuit in float64, and wrong variants fail."""

import pytest
import torch
from headlab.probes import weight_scores as ws
from planted import INDUCTION_HEAD, PREVIOUS_TOKEN_HEAD, induction_model

import headlab


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
    cos, sin = ws.rotary_cos_sin(planted, 0, torch.arange(64))
    right = ws.positional_kernel(q, k, cos, sin, 1.0).softmax(-1)
    wrong = ws.positional_kernel(q, k, cos, sin, 1.0, sign=-1).softmax(-1)  # keys placed after the query
    assert right[PREVIOUS_TOKEN_HEAD[1]].argmax() == 1
    assert wrong[PREVIOUS_TOKEN_HEAD[1]].argmax() != 1


@torch.no_grad()
def direct_ov(model, layer: int, head: int) -> torch.Tensor:
    """The full [vocab, vocab] OV circuit in float64, written out: normalised embeddings through the input norm's
    scale, W_V and W_O of the head, the final norm's scale, the unembedding."""
    arch, dh = model.architecture, model.d_head
    embed = model.hf.get_input_embeddings().weight.double()
    x = embed / embed.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12) * ws.input_norm(model, layer).weight.double()
    kv = head // (model.n_heads // model.n_kv_heads)
    w_v = arch.v(layer).module.weight.double()[kv * dh:(kv + 1) * dh].T  # [d, dh]
    w_o = arch.o(layer).weight.double()[:, head * dh:(head + 1) * dh].T  # [dh, d]
    unembed = model.hf.get_output_embeddings().weight.double() * ws.final_norm(model).weight.double()
    return x @ w_v @ w_o @ unembed.T


def test_copying_score_equals_the_direct_eigenvalues_in_float64():
    model = headlab.load_model("tiny-llama")
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
