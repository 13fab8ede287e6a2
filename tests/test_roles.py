"""Function-vector, successor and copy-suppression heads: planted heads rank first, deliberately wrong variants do
not, and the OV eigenvalues equal a direct float64 eigendecomposition of the full token x token circuit."""

import numpy as np
import pytest
import torch
from headlab.probes import copy_suppression, function_vector, successor
from planted import blank
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.model import HeadModel
from headlab.tiny import SPECIAL_TOKENS, byte_tokenizer

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
COPY, SUCCESSOR, PREDECESSOR, NEGATIVE = (1, 0), (1, 1), (1, 3), (1, 2)


def ov_model(seed: int = 0) -> HeadModel:
    """A 2-layer attention-only Llama on bytes: layer 0 and the MLPs are zero, so a token's residual after block 0 is
    its embedding (random unit vectors, read out by lm_head). Layer 1's heads attend uniformly (zero q and k) and
    their OV circuits map letter t to: t itself (L1H0), t + 1 (L1H1, the successor head), minus t (L1H2, a
    copy-suppression head), t - 1 (L1H3)."""
    tokenizer = byte_tokenizer()
    vocab, d_model, d_head, n_heads = len(tokenizer), 128, 32, 4
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=d_head,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    identity = torch.randn(vocab, d_model, generator=generator)
    identity = identity / identity.norm(dim=-1, keepdim=True)
    ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in LETTERS]
    with torch.no_grad():
        blank(model)
        model.model.embed_tokens.weight.copy_(identity)
        model.lm_head.weight.copy_(identity)
        attn = model.model.layers[1].self_attn
        reads = identity[ids]  # [26, d_model]: the value of head h reads letter identities
        for head, (shift, sign) in {0: (0, 1), 1: (1, 1), 2: (0, -1), 3: (-1, 1)}.items():
            rows = slice(head * d_head, head * d_head + len(ids))
            attn.v_proj.weight[rows] = reads
            writes = torch.stack([identity[ids[(i + shift) % len(ids)]] for i in range(len(ids))])  # [26, d_model]
            attn.o_proj.weight[:, rows] = sign * writes.T * 4.0
    return HeadModel("planted-ov", model, tokenizer, hf_name="planted-ov")


@pytest.fixture(scope="module")
def planted():
    return ov_model()


def write_sequences(tmp_path):
    import json

    path = tmp_path / "sequences.json"
    path.write_text(json.dumps({"sequences": {"first": LETTERS[:13], "second": LETTERS[13:], "all": LETTERS}}))
    return str(path)


def test_the_planted_successor_head_ranks_first_and_the_shuffled_control_is_near_chance(planted, tmp_path):
    scores = successor.scan(planted, data=write_sequences(tmp_path), progress=False)
    assert scores.heads(1) == [SUCCESSOR]
    row = scores.frame.set_index("name").loc["L1H1"]
    # every pair but the wrap-around is exact; 1 / 13 is chance for the shuffled sequences, 0.25 leaves room for a
    # few shuffled pairs that happen to be consecutive letters
    assert row["score"] == 1.0 and row["shuffled"] < 0.25


def test_the_wrong_step_ranks_the_predecessor_head_instead(planted):
    x = successor.effective_embeddings(planted, torch.tensor([planted.token_ids(c)[0] for c in LETTERS]))
    logits = successor.ov_logits(planted, x, torch.tensor([planted.token_ids(c)[0] for c in LETTERS]))
    wrong = successor.succession_hits(logits, step=-1)
    right = successor.succession_hits(logits, step=1)
    assert right.argmax() == SUCCESSOR[0] * 4 + SUCCESSOR[1]
    assert wrong.argmax() == PREDECESSOR[0] * 4 + PREDECESSOR[1] and wrong[SUCCESSOR] == 0


def test_the_planted_copy_suppression_head_ranks_first_on_both_scores(planted):
    text = "the cat sat on the mat and the cat ate the rat near a vat of fat"
    scores = copy_suppression.scan(planted, texts=[text], progress=False)
    assert scores.heads(1) == [NEGATIVE]
    assert scores.heads(1, by="ov_negative_copying") == [NEGATIVE]
    row = scores.frame.set_index("name")
    # eigenvalues of -I on the letters: all negative up to the letters' small overlaps with the other tokens
    assert row.loc["L1H2", "ov_negative_copying"] > 0.99 and row.loc["L1H0", "ov_negative_copying"] < -0.99
    assert row.loc["L1H2", "score"] > 0 > row.loc["L1H0", "score"]


def test_reading_the_future_tokens_loses_the_planted_head(planted):
    tokens = planted.to_tokens("".join(LETTERS))  # every letter once: what comes later was never seen before
    right = copy_suppression.context_suppression(planted, tokens)
    wrong = copy_suppression.context_suppression(planted, tokens, future=True)
    assert right[NEGATIVE] == right.max() and right[NEGATIVE] > 0.1
    assert wrong[NEGATIVE] < right[NEGATIVE] / 2  # a wrong position reads tokens the head never saw


def test_singular_values_are_the_wrong_eigenvalue_set(planted):
    tokens = torch.tensor([planted.token_ids(c)[0] for c in LETTERS])
    right = copy_suppression.negative_copying(copy_suppression.ov_eigenvalues(planted, tokens))
    x = successor.effective_embeddings(planted, tokens)
    circuit = successor.ov_logits(planted, x, tokens).double()
    singular = torch.linalg.svdvals(circuit).to(torch.complex128)
    wrong = copy_suppression.negative_copying(singular)
    assert right[NEGATIVE] > 0.99
    assert wrong[NEGATIVE] == pytest.approx(-1.0) and wrong[COPY] == pytest.approx(-1.0)  # the sign is gone


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gemma3"])
def test_ov_eigenvalues_equal_the_full_circuits_in_float64(model_name):
    import headlab

    model = headlab.load_model(model_name)
    tokens = torch.arange(40, 120)
    ours = copy_suppression.negative_copying(copy_suppression.ov_eigenvalues(model, tokens))
    x = successor.effective_embeddings(model, tokens).double()
    reference = torch.zeros(model.n_layers, model.n_heads, dtype=torch.float64)
    W_U = successor.unembedding(model).double()[:, tokens]
    for layer in range(model.n_layers):
        source = successor.ov_source(model, layer, x.float()).double()
        readout = successor.ov_readout(model, layer).double()
        for head in range(model.n_heads):
            full = (source[head] @ readout[head] @ W_U).numpy()  # [80, 80]: sources x targets
            eig = np.linalg.eigvals(full)
            reference[layer, head] = -eig.sum().real / np.abs(eig).sum()
    # the full matrix has 80 - d_head (numerically) zero eigenvalues whose float64 noise adds to sum |lambda|
    assert torch.allclose(ours, reference, atol=1e-8)


# ---- a planted function-vector head ---------------------------------------------------------------------------------

TASK_INPUTS = [f"x{i}" for i in range(8)]
TASK_OUTPUTS = [f"y{i}" for i in range(8)]
FV_HEAD, MATCH_HEAD = (1, 1), (0, 0)


def word_tokenizer():
    """One token per word ("Q", ":", "A", x0..x7, y0..y7) after the tiny models' special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, "Q", ":", "A", *TASK_INPUTS, *TASK_OUTPUTS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def function_vector_model(sign: float = 1.0) -> HeadModel:
    """A 2-layer attention-only Llama (RoPE base 1e12: content-only attention) on whole words whose L1H1 carries the
    task x_i -> y_i in its output only when the prompt's demonstrations pair inputs with their own outputs.
    Residual: [bulk | const | one-hot token | match flag]; the bulk (read by nothing) fixes every position's RMS, so
    the norms scale all positions alike. L0H0 (the matcher): an output y_i attends to an earlier x_i if there is
    one, else to BOS; its value, "an input token", becomes the flag. L1H1 (the function-vector head): from the last
    position it attends to flagged positions against a BOS sink as strong as one of them, so its attention on them
    grows with how many demonstrations are paired right (3 of 3 on a clean prompt, 1 or 2 of 3 shuffled); its value
    (the flag) is written onto every task output's unembedding (`sign` -1: off them). Other heads are zero."""
    tokenizer = word_tokenizer()
    vocab = len(tokenizer)
    d_head, n_heads = 64, 4
    half = d_head // 2
    slow = torch.cat([torch.arange(half // 2, half), torch.arange(half // 2, half) + half])  # 32 barely-rotating dims
    bulk, const, flag = 0, 1, 2 + vocab
    d_model = -(-(3 + vocab) // n_heads) * n_heads
    unit = d_model ** 0.5 / 30.0  # a 1 after the norms (bulk 30 dominates each position's RMS)
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=d_head,
                         max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 1e12},
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval()
    ids = {word: tokenizer.convert_tokens_to_ids(word) for word in ["<bos>", *TASK_INPUTS, *TASK_OUTPUTS]}
    token = {word: 2 + i for word, i in ids.items()}  # the residual dimension of a word's one-hot
    logit = (8 * d_head) ** 0.5 / unit  # q and k weights whose product gives an attention logit of 8 per unit
    with torch.no_grad():
        blank(model)
        embed = model.model.embed_tokens.weight
        embed[:, bulk], embed[:, const] = 30.0, 1.0
        embed[:, 2:2 + vocab] = torch.eye(vocab)
        match = model.model.layers[0].self_attn
        for x, y in zip(TASK_INPUTS, TASK_OUTPUTS):  # q of y_i and k of x_i meet on one slow dimension: logit 24
            match.q_proj.weight[slow[ids[x]], token[y]] = logit * 3 ** 0.5
            match.k_proj.weight[slow[ids[x]], token[x]] = logit * 3 ** 0.5
            match.v_proj.weight[0, token[x]] = 1.0  # the value: "an input token" (0 at BOS)
        match.q_proj.weight[slow[-1], const] = logit * 1.5 ** 0.5  # every query's BOS sink: logit 12, below a match
        match.k_proj.weight[slow[-1], token["<bos>"]] = logit * 1.5 ** 0.5
        match.o_proj.weight[flag, 0] = 1.0 / unit
        fv = model.model.layers[1].self_attn
        start = FV_HEAD[1] * d_head
        fv.q_proj.weight[start + slow[0], const] = logit * 2 ** 0.5  # logit 16 on a flagged key
        fv.k_proj.weight[start + slow[0], flag] = logit * 2 ** 0.5
        fv.q_proj.weight[start + slow[1], const] = logit * 2 ** 0.5  # and 16 on BOS
        fv.k_proj.weight[start + slow[1], token["<bos>"]] = logit * 2 ** 0.5
        fv.v_proj.weight[start, flag] = 1.0
        for y in TASK_OUTPUTS:  # full attention on flags raises every output's logit by 4
            fv.o_proj.weight[token[y], start] = sign * 4.0 / unit ** 2
        model.lm_head.weight[:, 2:2 + vocab] = torch.eye(vocab)
    return HeadModel("planted-function-vector", model, tokenizer, hf_name="planted-function-vector")


def write_task(tmp_path) -> str:
    import json

    pairs = [[x, y] for x, y in zip(TASK_INPUTS, TASK_OUTPUTS)]
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"tasks": {"pair": {"select": pairs, "heldout": pairs}}}))
    return str(path)


def test_the_planted_function_vector_head_ranks_first(tmp_path):
    model = function_vector_model()
    scores = function_vector.scan(model, tasks=("pair",), data=write_task(tmp_path), n_shots=3, n_mean=8,
                                  n_corrupted=8, progress=False)
    assert scores.heads(1) == [FV_HEAD]
    row = scores.frame.set_index("name")
    # the only other head with weights, the matcher, writes nothing at the last position (its query finds BOS, whose
    # value is 0) in either prompt, and the zero heads write nothing: their effects are exactly 0
    assert (row.drop("L1H1")["score"] == 0).all()
    # raising all 8 outputs alike, the head can lift P(answer) by less than 1/8 - P; its interval must exclude 0
    assert 0 < row.loc["L1H1", "score_lo"] <= row.loc["L1H1", "score"] < 1 / 8
    assert "function-vector" in scores.meta["roles"]


def test_the_wrong_sign_or_the_corrupted_mean_loses_the_planted_head(tmp_path):
    data = write_task(tmp_path)
    wrong_sign = function_vector.scan(function_vector_model(sign=-1.0), tasks=("pair",), data=data, n_shots=3,
                                      n_mean=8, n_corrupted=8, progress=False)
    assert wrong_sign.heads(1) != [FV_HEAD] and wrong_sign.frame.set_index("name").loc["L1H1", "score"] < 0
    model = function_vector_model()
    prompts = function_vector.icl_prompts("pair", 8, n_shots=3, seed=0, data=data, stream="corrupted")
    answers = [function_vector.answer_token(model, p.answer) for p in prompts]
    right_z, _ = function_vector.last_z(model, [p.text for p in prompts], answers)
    wrong_z, _ = function_vector.last_z(model, [p.corrupted for p in prompts], answers)  # the wrong prompts' mean
    effects = {}
    for name, means in (("clean", right_z.mean(0)), ("corrupted", wrong_z.mean(0))):
        total = 0.0
        for prompt, answer in zip(prompts, answers):
            base, patched = function_vector.patched_answer_probs(model, prompt.corrupted, answer, means, [FV_HEAD])
            total += float(patched[0]) - base
        effects[name] = total / len(prompts)
    # the mean of the shuffled prompts' own outputs restores far less than the clean mean (their flags are fewer)
    assert effects["clean"] > 0 and abs(effects["corrupted"]) < effects["clean"] / 2


def test_icl_prompts_keep_selection_and_heldout_pairs_apart():
    select = set(function_vector.icl_pairs("antonym", "select"))
    heldout = set(function_vector.icl_pairs("antonym", "heldout"))
    assert select and heldout and not select & heldout
    prompt = function_vector.icl_prompts("antonym", 1, n_shots=4, seed=0)[0]
    clean_labels = [line for line in prompt.text.splitlines() if line.startswith("A: ")]
    corrupted_labels = [line for line in prompt.corrupted.splitlines() if line.startswith("A: ")]
    assert sorted(clean_labels) == sorted(corrupted_labels) and all(
        a != b for a, b in zip(clean_labels, corrupted_labels))  # a derangement of the same outputs


def test_patched_probabilities_equal_a_full_forward_with_the_head_replaced():
    import headlab
    from headlab.hooks import attach
    from headlab.hooks import name as hook_name

    model = headlab.load_model("tiny-llama")
    prompt = function_vector.icl_prompts("antonym", 1, n_shots=3, seed=0)[0]
    answer = function_vector.answer_token(model, prompt.answer)
    means = torch.randn(model.n_layers, model.n_heads, model.d_head, generator=torch.Generator().manual_seed(0))
    heads = model.all_heads()
    base, patched = function_vector.patched_answer_probs(model, prompt.corrupted, answer, means, heads)
    for c, (layer, head) in enumerate(heads):
        def replace(z, point, head=head, layer=layer):
            z = z.clone()
            z[:, -1, head] = means[layer, head]
            return z
        with attach(model, [(hook_name("z", layer), replace)], tree="hf"):
            full = torch.softmax(model.logits(prompt.corrupted)[0, -1].float(), -1)[answer]
        # the copy extends a KV cache while the reference runs the whole prompt: fp32 sums in another order
        assert float(patched[c]) == pytest.approx(float(full), rel=1e-4, abs=1e-7)
    assert base == pytest.approx(float(torch.softmax(model.logits(prompt.corrupted)[0, -1].float(), -1)[answer]),
                                 rel=1e-4)


@pytest.mark.real
@pytest.mark.slow
def test_the_five_role_probes_run_on_gemma3():
    """Quick profiles on Gemma3 (sliding-window layers, a post-attention norm, one KV head): every head scored, every
    interval around its score, every role line recorded (SmolLM2 runs them in the real quick-scan report test)."""
    import headlab
    from headlab.probes import get_probe

    model = headlab.load_model("gemma3-270m")
    for name in ("function_vector", "successor", "copy_suppression", "query_retrieval", "weight_scores"):
        probe = get_probe(name)
        table = probe.scan(model, quick=True, progress=False)
        frame = table.frame
        assert len(frame) == 72 and frame["score"].notna().all(), name
        if "score_lo" in frame:
            # the percentile bootstrap of a mean lies within its samples' range and, for these sample counts, around
            # the mean itself (a 1e-12 slack for the fp64 sums in another order)
            assert ((frame["score_lo"] <= frame["score"] + 1e-12) & (frame["score"] <= frame["score_hi"] + 1e-12)).all()
        assert table.meta["roles"] and table.meta["validity"]["rests_on"], name


def gain(norm) -> torch.Tensor | float:
    return 1.0 if getattr(norm, "weight", None) is None else norm.weight.detach().double()


def readout_error(model, layer: int) -> float:
    """How far a head's write z W_O, read through ov_readout and W_U, is from the family's norms written out (a
    post-attention norm's gain where it has one; the final norm's centring where it is a LayerNorm, and its gain),
    the norms' division by the RMS left out (a positive number per row) and the final norm's bias too (the same
    logits for every write)."""
    torch.manual_seed(0)
    z = torch.randn(model.n_heads, 6, model.d_head)
    readout = successor.ov_readout(model, layer)
    W_U, W_O = successor.unembedding(model), model.bridge.blocks[layer].attn.W_O.detach()
    final = model.architecture.decoder().get_submodule(
        "norm" if hasattr(model.architecture.decoder(), "norm") else "ln_f")
    post = model.architecture.post_attention_norm(layer)
    worst = 0.0
    for head in range(model.n_heads):
        write = z[head].double() @ W_O[head].double()  # [6, d_model]
        if post is not None:
            write = write * gain(post)  # its gain; its division by the RMS is a positive number per row
        centred = write - write.mean(-1, keepdim=True) if model.name in ("tiny-gpt2", "tiny-olmo") else write
        real = centred * gain(final) @ W_U.double()
        ours = z[head].double() @ readout[head].double() @ W_U.double()
        worst = max(worst, float(((ours - real).abs().max() / real.abs().max())))
    return worst


@pytest.mark.parametrize("family", ["gpt2", "olmo", "olmo2", "llama"])
def test_the_ov_readout_is_the_familys_norms_written_out(family, monkeypatch):
    """GPT-2's LayerNorm (centred, a gain and a bias), OLMo's LayerNorm without weight, OLMo 2's post-attention RMS
    norm and Llama's RMS norm: the readout's logits are those norms' written out, up to the RMS division. The wrong
    variant, GPT-2's readout without the centring, misses them."""
    from headlab.tiny import tiny_family

    model = HeadModel(f"tiny-{family}", *tiny_family(family))
    # the probe's float32 readout against the float64 reference: float32 rounding, ~1e-7 relative
    assert readout_error(model, 1) < 1e-5
    if family == "gpt2":
        monkeypatch.setattr(type(model.bridge.ln_final), "uses_rms_norm", True, raising=False)
        assert readout_error(model, 1) > 1e-2
