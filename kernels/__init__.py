"""Fused attention-with-statistics (Triton kernel + torch twin): pure tensors, no model, no tokenizer."""
