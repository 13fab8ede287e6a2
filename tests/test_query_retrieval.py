"""Query-focused retrieval heads: a planted head ranks first and its re-ranker wins on held-out questions, the
masses equal the hook path's attention patterns, and selection and held-out passages never meet."""

import pytest
import torch
from headlab.probes import query_retrieval as qr
from planted import QUERY_HEAD, letter_passages, query_retrieval_model

import headlab
from headlab.hooks import attention_patterns

PARAMS = {"passages": letter_passages(), "n_passages": 5, "random_draws": 10, "top_heads": 1}


@pytest.fixture(scope="module")
def planted():
    return query_retrieval_model()


def test_planted_query_head_ranks_first_and_reranks_held_out_questions(planted):
    table = qr.scan(planted, progress=False, **PARAMS)
    assert table.heads(1) == [QUERY_HEAD]
    assert table.matrix("heldout_accuracy")[QUERY_HEAD] == 1.0
    reranker = table.meta["reranker"]
    assert reranker["heads"] == ["L1H1"] and reranker["top"]["accuracy"] == 1.0
    assert reranker["random"]["mean_accuracy"] < 0.6  # 7 of 8 heads carry no query signal: near chance (0.2)
    assert "query-retrieval" in table.meta["roles"]


def test_a_head_wired_against_the_question_does_not_rank_first():
    table = qr.scan(query_retrieval_model(sign=-1.0), progress=False, **PARAMS)
    assert table.heads(1) != [QUERY_HEAD]
    assert table.matrix()[QUERY_HEAD] < 0


def test_spans_shifted_by_one_passage_lose_the_planted_head(planted):
    group = qr.PROBE.groups(qr.PROBE.params(**PARAMS))[0]
    prompt = qr.build_prompt(planted, group, 64)
    right = qr.query_masses(planted, prompt, [p.question for p in group.passages])
    wrong = qr.query_masses(planted, qr.GroupPrompt(prompt.ids, prompt.spans[1:] + prompt.spans[:1]),
                            [p.question for p in group.passages])
    gold = torch.arange(5)
    assert (right[:, QUERY_HEAD[0], QUERY_HEAD[1]].argmax(-1) == gold).all()
    assert not (wrong[:, QUERY_HEAD[0], QUERY_HEAD[1]].argmax(-1) == gold).any()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])  # tiny-gemma3: sliding windows of 8 keys
def test_masses_equal_the_hook_paths_attention_patterns(name):
    model = headlab.load_model(name)
    group = qr.PROBE.groups(qr.PROBE.params(n_passages=4))[0]
    prompt = qr.build_prompt(model, group, 12)
    queries = [p.question for p in group.passages] + ["N/A"]
    got = qr.query_masses(model, prompt, queries)  # batched over a shared prefix cache
    for i, query in enumerate(queries):
        ids = torch.tensor([prompt.ids + model.token_ids(" " + query)])
        rows = attention_patterns(model, ids)[0].double()[:, :, len(prompt.ids):]
        expected = torch.stack([rows[..., a:b].sum(-1) for a, b in prompt.spans], -1).mean(2)
        # fp32 attention on two paths (kernel rows rebuilt from the LSE vs the bridge's softmax): measured <= 5e-8
        assert torch.allclose(got[i], expected, atol=1e-6)
        assert not torch.allclose(got[i], torch.roll(expected, 1, -1), atol=1e-6)


def test_selection_and_held_out_passages_never_meet():
    groups = qr.PROBE.groups(qr.PROBE.params())
    select = {p.id for g in groups if g.split == "select" for p in g.passages}
    heldout = {p.id for g in groups if g.split == "heldout" for p in g.passages}
    assert select and heldout and not select & heldout
    assert len(qr.pydoc_passages()) > 100


def test_bad_parameters_get_one_sentence():
    with pytest.raises(headlab.InputError, match="heldout must lie"):
        qr.PROBE.params(heldout=1.0)
    with pytest.raises(headlab.InputError, match="fewer than the 50"):
        qr.PROBE.params(n_passages=50, passages=letter_passages())
