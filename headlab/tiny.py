"""Small random models for tests: real architectures (Llama, Gemma3, BERT, GPT-2, LLaVA), seeded weights, a byte
tokenizer (LLaVA: the shapes world's words, `datasets/shapes_vocabulary.json`, so vision tests can caption with it);
and one of every supported model type from its transformers config class (`tiny_family`, the coverage matrix)."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from headlab.data import dataset_path

SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<unk>"]


@functools.lru_cache(maxsize=None)
def tokenizer_dir(kind: str) -> str:
    """A folder holding the "byte" or "words" tokenizer (TransformerLens reloads tokenizers from their folder)."""
    folder = tempfile.mkdtemp(prefix=f"headlab-{kind}-tokenizer-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    {"byte": _byte_tokenizer, "words": shapes_word_tokenizer}[kind]().save_pretrained(folder)
    return folder


def shapes_word_tokenizer() -> PreTrainedTokenizerFast:
    """The shapes world's word-level tokenizer (datasets/shapes_vocabulary.json)."""
    vocabulary = json.loads(dataset_path("shapes_vocabulary.json").read_text())
    return word_tokenizer(vocabulary["special_tokens"], vocabulary["words"])


def word_tokenizer(special_tokens: list[str], words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: the special tokens first (<bos>, <eos>, <pad>, <unk>, and any other, such
    as <image>, as additional special tokens), then the words."""
    vocab = {token: i for i, token in enumerate(special_tokens + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = ["<bos>", "<eos>", "<pad>", "<unk>"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>",
                                   additional_special_tokens=[t for t in special_tokens if t not in named])


def llava_config(vocab_size: int, image_token_id: int, *, image_size: int, patch: int, text_layers: int = 4,
                 text_heads: int = 4, text_width: int = 128, vision_layers: int = 2, vision_width: int = 64):
    """A small LLaVA-style config: CLIP vision tower (square images, square patches), 2-layer projector, Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch, projection_dim=vision_width)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_heads,
                       head_dim=text_width // text_heads, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                       pad_token_id=2, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       vision_feature_layer=-1, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", architectures=["LlavaForConditionalGeneration"])


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (ids 4..259) after four special tokens (ids 0..3)."""
    return AutoTokenizer.from_pretrained(tokenizer_dir("byte"))


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


# What every tiny model shares: width 64, MLP 128, 4 query heads, 256 positions, byte tokenizer's special tokens.
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=256, bos_token_id=0,
             eos_token_id=1, pad_token_id=2)


def _llama(vocab: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                        tie_word_embeddings=False, architectures=["LlamaForCausalLM"], **SMALL))


def _gemma3(vocab: int) -> Gemma3ForCausalLM:
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, num_hidden_layers=3, num_key_value_heads=1,
                                              head_dim=16, sliding_window=8, layer_types=layer_types,
                                              query_pre_attn_scalar=16, architectures=["Gemma3ForCausalLM"], **SMALL))


def _bert(vocab: int) -> BertForMaskedLM:
    return BertForMaskedLM(BertConfig(vocab_size=vocab, num_hidden_layers=2, initializer_range=0.2,
                                      architectures=["BertForMaskedLM"],
                                      **{k: v for k, v in SMALL.items() if k not in ("bos_token_id", "eos_token_id")}))


def _gpt2(vocab: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                      architectures=["GPT2LMHeadModel"]))


def _llava(vocab: int):
    from transformers import LlavaForConditionalGeneration

    image_token_id = AutoTokenizer.from_pretrained(tokenizer_dir("words")).convert_tokens_to_ids("<image>")
    config = llava_config(vocab, image_token_id, image_size=32, patch=8, text_layers=2, text_heads=4, text_width=64,
                          vision_layers=1, vision_width=32)
    return LlavaForConditionalGeneration(config)


TINY_BUILDERS = {"tiny-llama": _llama, "tiny-gemma3": _gemma3, "tiny-bert": _bert, "tiny-gpt2": _gpt2,
                 "tiny-llava": _llava}
TINY_DESCRIPTIONS = {
    "tiny-llama": "random 2-layer Llama (4 query heads, 2 KV heads), byte tokenizer; for tests",
    "tiny-gemma3": "random 3-layer Gemma3 (sliding window 8 on layers 0-1), byte tokenizer; for tests",
    "tiny-bert": "random 2-layer BERT encoder (bidirectional), byte tokenizer; for tests",
    "tiny-gpt2": "random 2-layer GPT-2 (fused q/k/v projection, learned positions), byte tokenizer; for tests",
    "tiny-llava": "random LLaVA (1-layer CLIP vision tower, projector, 2-layer Llama), shapes-world words; for tests",
}


def tiny_model(name: str, seed: int = 0):
    """(hf_model, tokenizer) for a `tiny-*` name; the same seed gives the same weights."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("words" if name == "tiny-llava" else "byte"))
    torch.manual_seed(seed)
    model = TINY_BUILDERS[name](len(tokenizer))
    return model.eval(), tokenizer


# ---- one tiny model per supported model type (the coverage matrix) --------------------------------------------------
# Two layers, width 64, 4 query heads (2 KV heads where the family has grouped queries), head size 16, the byte
# tokenizer's vocabulary; a sliding window of 8, logit softcapping, partial rotary and a few experts where the family
# has them, so the traps of each family are exercised on 32-token prompts.
_FAMILY = dict(num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False)
_GQA = dict(num_key_value_heads=2, head_dim=16)
_WINDOW = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
_EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": _GQA,
    "mistral": {**_GQA, "sliding_window": 8},
    "mixtral": {**_GQA, **_EXPERTS, "sliding_window": 8},
    "starcoder2": {**_GQA, "sliding_window": 8},
    "qwen2": {**_GQA, **_WINDOW, "use_sliding_window": True, "max_window_layers": 1},
    "qwen2_moe": {**_GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3": {**_GQA},
    "qwen3_moe": {**_GQA, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "granite": {**_GQA, "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.0},
    "smollm3": {**_GQA, "no_rope_layers": [1, 0]},
    "olmo": {},
    "olmo2": _GQA,
    "olmoe": {**_GQA, "num_experts": 4, "num_experts_per_tok": 2},
    "gemma": _GQA,
    "gemma2": {**_GQA, **_WINDOW, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0,
               "query_pre_attn_scalar": 16, "initializer_range": 0.2},  # scores of a few units: the cap bends them
    "gemma3_text": {**_GQA, **_WINDOW, "query_pre_attn_scalar": 16},
    "phi3": {**_GQA, "sliding_window": 8, "partial_rotary_factor": 0.5},
    "phi": {"partial_rotary_factor": 0.5},
    "stablelm": {**_GQA, "partial_rotary_factor": 0.25},
    "gpt_oss": {**_GQA, **_WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_neox": {"rotary_pct": 0.25, "use_parallel_residual": True},
    "gptj": {"rotary_dim": 8},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt2": {},
    "bert": {},
    "granitemoe": {**_GQA, **_EXPERTS, "attention_multiplier": 0.2, "residual_multiplier": 0.5},
    "arcee": _GQA,
    "seed_oss": {**_GQA, "attention_bias": True},
    "nemotron": {**_GQA, "partial_rotary_factor": 0.5},
    "olmo3": {**_GQA, **_WINDOW},
    "exaone4": {**_GQA, **_WINDOW},
    "apertus": _GQA,
    "glm": {**_GQA, "partial_rotary_factor": 0.5},
    "ernie4_5": _GQA,
    "gpt_bigcode": {"multi_query": True},
    "cohere": {**_GQA, "logit_scale": 0.25, "use_qk_norm": True},
    "cohere2": {**_GQA, **_WINDOW},
    "glm4": {**_GQA, "partial_rotary_factor": 0.5},
    "vaultgemma": {**_GQA, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 16,
                   "initializer_range": 0.2},
}


def tiny_family(model_type: str, seed: int = 0):
    """(hf_model, byte tokenizer) of `model_type` built from its transformers config class, seeded, no download."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    tokenizer = byte_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                  **{**_FAMILY, **FAMILY_CONFIGS[model_type]})
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval(), tokenizer
