"""Small random models for tests: real architectures (Llama, Gemma3, BERT), seeded weights, a byte tokenizer."""

from __future__ import annotations

import functools
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<bos>", "<eos>", "<pad>", "<unk>"]


@functools.lru_cache(maxsize=None)
def tokenizer_dir(kind: str) -> str:
    """A folder holding the "byte" or "shapes" tokenizer (TransformerLens reloads tokenizers from their folder)."""
    from headlab.shapes import word_tokenizer

    folder = tempfile.mkdtemp(prefix=f"headlab-{kind}-tokenizer-")
    {"byte": _byte_tokenizer, "shapes": word_tokenizer}[kind]().save_pretrained(folder)
    return folder


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


def _llama(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config)


def _gemma3(vocab: int) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        architectures=["Gemma3ForCausalLM"],
    )
    return Gemma3ForCausalLM(config)


def _bert(vocab: int) -> BertForMaskedLM:
    config = BertConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=2, initializer_range=0.2,
        architectures=["BertForMaskedLM"],
    )
    return BertForMaskedLM(config)


def _llava(vocab: int):
    from transformers import LlavaForConditionalGeneration

    from headlab.shapes import llava_config

    config = llava_config(vocab, text_layers=2, text_heads=4, text_width=64, vision_layers=1, vision_width=32)
    return LlavaForConditionalGeneration(config)


TINY_BUILDERS = {"tiny-llama": _llama, "tiny-gemma3": _gemma3, "tiny-bert": _bert, "tiny-llava": _llava}
TINY_DESCRIPTIONS = {
    "tiny-llama": "random 2-layer Llama (4 query heads, 2 KV heads), byte tokenizer; for tests",
    "tiny-gemma3": "random 3-layer Gemma3 (sliding window 8 on layers 0-1), byte tokenizer; for tests",
    "tiny-bert": "random 2-layer BERT encoder (bidirectional), byte tokenizer; for tests",
    "tiny-llava": "random LLaVA (1-layer CLIP vision tower, projector, 2-layer Llama), shapes-world words; for tests",
}


def tiny_model(name: str, seed: int = 0):
    """(hf_model, tokenizer) for a `tiny-*` name; the same seed gives the same weights."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("shapes" if name == "tiny-llava" else "byte"))
    torch.manual_seed(seed)
    model = TINY_BUILDERS[name](len(tokenizer))
    return model.eval(), tokenizer
