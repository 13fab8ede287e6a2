"""Head-aware KV-cache policies (DuoAttention's structure, RazorAttention, HeadKV), with real eviction, evaluated
on long-context retrieval against memory.

    from headlab import kv
    policy = kv.from_scores(model, retrieval_scores, 0.35)      # top 35% of KV heads full, the rest stream
    cache = kv.prefill(model, ids, policy)                      # streaming heads hold sinks + window only
    logits = kv.step(model, cache, token)
    table = kv.evaluate(model, [kv.full(), policy, kv.streaming()], task)

The "uses" layer: it reads HeadScores and acts through the model's own forward (transformers' Cache and
the attention seam, headlab.attention); it does not import the CLI or the report.
"""

from headlab.kv.cache import PolicyCache, PolicyLayer, applying, prefill, step
from headlab.kv.policy import (
                               DEFAULT_SINK,
                               DEFAULT_WINDOW,
                               KVPolicy,
                               budget,
                               from_heads,
                               from_scores,
                               full,
                               kv_head_scores,
                               long_layers,
                               random,
                               razor,
                               sink_token_ids,
                               streaming,
)

__all__ = ["DEFAULT_SINK", "DEFAULT_WINDOW", "KVPolicy", "PolicyCache", "PolicyLayer", "applying",
           "budget", "from_heads", "from_scores", "full", "kv_head_scores", "long_layers", "prefill", "random",
           "razor", "sink_token_ids", "step", "streaming"]
