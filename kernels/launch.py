"""Launch configurations of the Triton kernels: one per (kernel, padded head dim, dtype).

The launcher (triton_kernel.py) and the ahead-of-time compile check (compile_check.py) both read this table, so
what is checked is what runs. Every entry compiles within the shared memory of sm_80 and sm_90 and without
register spills, except fp32 at head dim 256 (held to the bounds in compile_check.STACK_BOUND): fp32 dots run as
tf32x3 for fp32 accuracy, and the split query tile alone takes 256 registers a thread there.
Tiles of 16 queries hold fp32 at head dim 128 spill-free; 16-bit inputs take tiles of 64-128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KERNELS = ("forward", "span_mass", "column_sum")
HEAD_DIMS = (64, 128, 256)  # padded head dims with their own entry; smaller ones use the 64 entry
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # queries per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the tile loops (buffers of K/V or Q tiles in shared memory)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


_HALF, _FP32 = "half", "fp32"
_COLUMNS = [(d, precision) for precision in (_HALF, _FP32) for d in HEAD_DIMS]  # as in the README's table
# (queries, keys per tile, warps, stages) per column: 16-bit at head dims 64, 128, 256, then fp32 at 64, 128, 256.
# forward: the query tile stays in registers with its accumulators, key and value tiles stream; span mass: the query
# tile stays, the spans' key tiles stream; column sums: the key tile stays, query tiles stream. fp32 at 256 spills
# (see compile_check.STACK_BOUND).
_TABLE = {
    "forward": [(128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 8, 2)],
    "span_mass": [(64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 8, 2)],
    "column_sum": [(64, 128, 8, 2), (64, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (16, 32, 4, 2), (16, 32, 4, 2)],
}
CONFIGS: dict[tuple[str, int, str], LaunchConfig] = {
    (kernel, d, precision): LaunchConfig(*config)
    for kernel, row in _TABLE.items() for (d, precision), config in zip(_COLUMNS, row, strict=True)
}


def launch_config(kernel: str, head_d: int, dtype: torch.dtype) -> LaunchConfig:
    """The configuration for `kernel` at padded head dim `head_d` (a power of two >= 16) and input `dtype`; head dims
    below 64 take the 64 entry, above 256 the 256 entry (not compile-checked there)."""
    precision = _FP32 if dtype == torch.float32 else _HALF
    return CONFIGS[(kernel, min(max(head_d, 64), 256), precision)]
