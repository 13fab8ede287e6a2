"""Hand-built models whose heads are known, for planted tests.

`induction_model()`: a 2-layer, attention-only Llama (MLPs zeroed) on the byte tokenizer where
  L0H0 is a previous-token head: constant q and k, with k rotated one RoPE step ahead of q on the
       fast rotary pairs, so q_i . k_j peaks at j = i - 1; its value copies the token into a "previous
       token" subspace of the residual stream;
  L1H2 is an induction head: q reads the current token, k reads the previous-token subspace, both on
       slow rotary pairs (RoPE base 1e12: rotation < 1e-4 rad over 100 positions), so the query
       attends to the key whose previous token equals its own token.
All other heads have zero weights (uniform attention, zero output).
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headlab.model import HeadModel
from headlab.tiny import byte_tokenizer

D_HEAD = 128
HALF = D_HEAD // 2
N_FAST = 16  # rotary pairs 0..15 carry the positional (previous-token) match
SLOW = slice(HALF // 2, HALF)  # rotary pairs 32..63 barely rotate: content match
D_CONTENT = HALF // 2  # token identity: 32 dims, on the slow pairs' first and second coordinates -> 64 q/k dims
PREVIOUS_TOKEN_HEAD = (0, 0)
INDUCTION_HEAD = (1, 2)


def blank(model: LlamaForCausalLM) -> None:
    """Every weight of a Llama zeroed and every norm's gain set to 1: an attention-only model with no head wired yet
    (call under torch.no_grad)."""
    for p in model.parameters():
        p.zero_()
    for norm in [model.model.norm] + [m for layer in model.model.layers
                                      for m in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.weight.fill_(1.0)


def induction_model(seed: int = 0) -> HeadModel:
    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    n_heads = 4
    # residual: [const (1) | token identity (2 * D_CONTENT) | previous token (2 * D_CONTENT)]
    d_token = 2 * D_CONTENT
    const, token, prev = 0, slice(1, 1 + d_token), slice(1 + d_token, 1 + 2 * d_token)
    d_model = -(-(1 + 2 * d_token) // n_heads) * n_heads  # padded up to a multiple of n_heads
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=D_HEAD,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 1e12},
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    identity = torch.randn(vocab, d_token, generator=generator)
    identity = identity / identity.norm(dim=-1, keepdim=True)
    inv_freq = 1e12 ** (-torch.arange(0, D_HEAD, 2).double() / D_HEAD)
    with torch.no_grad():
        blank(model)
        embed = model.model.embed_tokens.weight
        embed[:, const] = 1.0
        embed[:, token] = identity
        model.lm_head.weight[:, token] = identity

        def head_rows(h):
            return slice(h * D_HEAD, (h + 1) * D_HEAD)

        # L0H0: previous-token head
        attn0 = model.model.layers[0].self_attn
        q = torch.zeros(D_HEAD)
        k = torch.zeros(D_HEAD)
        for m in range(N_FAST):
            theta = inv_freq[m].item()
            q[m], q[m + HALF] = 1.0, 0.0
            k[m], k[m + HALF] = math.cos(theta), math.sin(theta)
        strength = 6.0
        attn0.q_proj.weight[head_rows(0), const] = strength * q
        attn0.k_proj.weight[head_rows(0), const] = strength * k
        v_rows = slice(0, d_token)  # value = token identity
        attn0.v_proj.weight[head_rows(0)][v_rows, token] = torch.eye(d_token)
        attn0.o_proj.weight[prev, head_rows(0)][:, v_rows] = torch.eye(d_token)

        # L1H2: induction head, content on the slow pairs
        attn1 = model.model.layers[1].self_attn
        h = INDUCTION_HEAD[1]
        slow_dims = torch.cat([torch.arange(HALF // 2, HALF), torch.arange(HALF // 2, HALF) + HALF])
        match = 12.0
        attn1.q_proj.weight[h * D_HEAD + slow_dims, token] = match * torch.eye(d_token)
        attn1.k_proj.weight[h * D_HEAD + slow_dims, prev] = match * torch.eye(d_token)
        attn1.v_proj.weight[head_rows(h)][v_rows, token] = torch.eye(d_token)
        attn1.o_proj.weight[token, head_rows(h)][:, v_rows] = torch.eye(d_token)
    return HeadModel("planted-induction", model, tokenizer, hf_name="planted-induction")


COPY_ANSWER = "WXYZ"


def copier_model() -> HeadModel:
    """The planted induction model read out so that the head's copy wins over the current token: fed '@', its
    induction head L1H2 attends to the token after the needle's '@' and copies the answer token by token."""
    model = induction_model()
    with torch.no_grad():
        model.hf.model.layers[1].self_attn.o_proj.weight.mul_(3.0)
    return model


def copy_task_files(folder) -> dict:
    """A haystack of random letter words and one needle "code @WXYZ" written to `folder`; returns the retrieval
    parameters (paths, lengths, depths, templates) of the copy task."""
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklm"), size=rng.integers(2, 7))) for _ in range(400)]
    (folder / "hay.txt").write_text(" ".join(words))
    needle = {"id": "code", "fact": "code @{answer}\n", "question": "code?", "answer": COPY_ANSWER}
    (folder / "needles.jsonl").write_text(json.dumps(needle) + "\n")
    return {"needles": str(folder / "needles.jsonl"), "lengths": (200, 300), "depths": (0.2, 0.6),
            "haystack": str(folder / "hay.txt"), "intro": "", "question_template": "\n{question}", "answer_cue": "@"}


QUERY_HEAD = (1, 1)


def query_retrieval_model(sign: float = 1.0) -> HeadModel:
    """The planted induction model with its induction head silenced and L1H1 wired as a query-focused retrieval head:
    q and k both read the token's identity (slow rotary pairs), so a question's tokens attend to the passage holding
    the same tokens (sign -1: away from them)."""
    model = induction_model()
    attn = model.hf.model.layers[1].self_attn
    d_token = 2 * D_CONTENT
    token = slice(1, 1 + d_token)
    slow_dims = torch.cat([torch.arange(HALF // 2, HALF), torch.arange(HALF // 2, HALF) + HALF])
    with torch.no_grad():
        for projection in (attn.q_proj, attn.k_proj, attn.v_proj):
            projection.weight[INDUCTION_HEAD[1] * D_HEAD:(INDUCTION_HEAD[1] + 1) * D_HEAD] = 0
        h = QUERY_HEAD[1]
        attn.q_proj.weight[h * D_HEAD + slow_dims, token] = sign * 12.0 * torch.eye(d_token)
        attn.k_proj.weight[h * D_HEAD + slow_dims, token] = 12.0 * torch.eye(d_token)
    return model


def letter_passages(n: int = 20) -> list[dict]:
    """`n` passages, each of words in one capital letter of its own (none of the prompt template's letters), and
    the question that names it: a word of that letter."""
    letters = [c for c in "BCDEFGIJKLMORSTUVWXYZ" if c not in "HPQNA"][:n]
    rng = __import__("numpy").random.default_rng(0)
    return [{"id": f"letter-{c}", "text": " ".join(c * int(rng.integers(2, 5)) for _ in range(8)),
             "question": c * 3} for c in letters]
