"""Which keys a query sees: causal and sliding-window masks from absolute positions.

Queries are the last n_q of n_k positions (n_q = n_k in a prefill, 1 in a decoding step). A window w
(causal only, as in Gemma3's local layers) hides keys more than w - 1 positions behind the query.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int


def visible_keys(
    q_pos: Int[torch.Tensor, "nq"], k_pos: Int[torch.Tensor, "nk"], causal: bool, window: int | None
) -> Bool[torch.Tensor, "nq nk"]:
    """True where query position q_pos[i] may attend to key position k_pos[j]."""
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    visible = torch.ones(q_pos.shape[0], k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        visible &= k_pos <= q_pos
    if window is not None:
        visible &= q_pos - k_pos < window
    return visible


def key_range(q_start: int, q_end: int, n_k: int, causal: bool, window: int | None) -> tuple[int, int]:
    """[lo, hi): the keys that some query of positions [q_start, q_end) can see."""
    lo = max(0, q_start - window + 1) if window is not None else 0
    hi = min(n_k, q_end) if causal else n_k
    return lo, hi


def queries_seeing(n_q: int, n_k: int, causal: bool, window: int | None) -> Int[torch.Tensor, "nk"]:
    """How many of the last n_q queries see each key (the denominator of a key's mean attention)."""
    j = torch.arange(n_k)
    if not causal:
        return torch.full((n_k,), n_q)
    first = torch.clamp(j, min=n_k - n_q)  # the earliest query that sees key j
    last = torch.full_like(j, n_k - 1) if window is None else torch.clamp(j + window - 1, max=n_k - 1)
    return torch.clamp(last - first + 1, min=0)
