"""Ahead-of-time compile check of the Triton kernels for GPUs this machine need not have (sm_80, sm_90).

Each variant (kernel, dtype, head dim, mask, softcap, entropy, learned sinks) goes through the real launcher,
attention_with_stats_triton, on small CPU tensors while a compile-only driver stands in for the GPU: Triton
specializes the call as it would on the device (argument types, 16-divisible sizes and strides, strides of 1, the
launch configuration from launch.py) and hands it to a hook instead of compiling it. The hooked kernel is then
compiled for the target; `cuobjdump --dump-resource-usage` on the cubin Triton built reads registers, stack and
static shared memory, the compiled kernel's metadata its dynamic shared memory.

A variant passes when its stack is 0 (no register spills; STACK_BOUND lists the exceptions and their bounds) and
its shared memory fits the architecture's per-block maximum. Needs TRITON_INTERPRET unset (the test suite sets it,
so tests/test_kernel_compile.py starts this in a process of its own):

    python -m headlab.kernels.compile_check [--full] [--json FILE] [--workers 2]
    python -m headlab.kernels.compile_check --variant forward,bf16,128,window,1,1,90,1 --config 128,64,8,3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import driver

from .launch import DTYPES, HEAD_DIMS, KERNELS, LaunchConfig
from .stats import check_problem

ARCHS = (80, 90)
# Shared memory a block may use after opting in (cudaDevAttrMaxSharedMemoryPerBlockOptin): 163 KiB on A100 (sm_80),
# 227 KiB on H100 (sm_90), from the compute-capability table of the CUDA C++ Programming Guide. Held against the
# dynamic shared memory Triton launches with plus the cubin's static shared memory.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Variants allowed a nonzero stack, and the bound they are held to: (kernel, dtype, head_dim, arch) -> bytes.
# fp32 at head dim 256: the query tile split into two tf32 halves (tf32x3, for fp32 accuracy) is 16 rows x 256 x 2
# words over 32 lanes, 256 registers a thread by itself; no configuration tried (16-64 queries, 16-64 keys, 2-8
# warps, 1-3 stages) compiles spill-free. The configurations of launch.py spill least.
STACK_BOUND: dict[tuple[str, str, int, int], int] = {
    ("forward", "fp32", 256, 80): 32, ("forward", "fp32", 256, 90): 128,
    ("span_mass", "fp32", 256, 80): 16, ("span_mass", "fp32", 256, 90): 16,
}
MASKS = ("none", "causal", "window")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# the launch: grouped-query heads (8 query heads on 2 key/value heads), 1024 tokens, a window of 256, 2 spans
BATCH, HEADS, KV_HEADS, TOKENS, WINDOW, SPANS = 1, 8, 2, 1024, 256, [(0, 8), (100, 132)]


@dataclass(frozen=True)
class Variant:
    kernel: str  # "forward", "span_mass" or "column_sum"
    dtype: str
    head_dim: int
    mask: str  # "none", "causal" or "window" (causal with a sliding window)
    softcap: bool
    entropy: bool  # forward only
    arch: int
    sinks: bool = False  # forward only (the other kernels read its LSE, which includes the sinks)

    def want(self) -> tuple[str, ...]:
        return {"forward": ("lse", "top1") + ("entropy",) * self.entropy, "span_mass": ("lse", "span_mass"),
                "column_sum": ("lse", "colsum")}[self.kernel]


def variants(full: bool = False) -> list[Variant]:
    """The variants to compile, forward kernels first (they take longest).

    full: every (kernel, dtype, head dim, arch, mask, softcap, entropy, sinks), 576 compiles. Otherwise 90: per
    (dtype, head dim, arch) each kernel with every flag on (window, softcap, entropy, sinks: the heaviest) and the
    forward kernel
    with every flag off; and per (head dim, arch), in bf16, the forward kernel as the capture path runs it by
    default (causal only) and the other two kernels with every flag off. So every (kernel, dtype, head dim, arch)
    is compiled and every flag is on and off for each (kernel, head dim, arch). Register allocation is not
    monotonic in the flags (a lighter variant can spill where the heaviest does not): run --full after changing a
    kernel or a configuration."""
    out = []
    for arch, dtype, head_dim in itertools.product(ARCHS, [DTYPE_NAMES[d] for d in DTYPES], HEAD_DIMS):
        base = dict(dtype=dtype, head_dim=head_dim, arch=arch)
        if full:
            for kernel, mask, softcap, entropy, sinks in itertools.product(KERNELS, MASKS, *[(False, True)] * 3):
                if not (entropy or sinks) or kernel == "forward":
                    out.append(Variant(kernel, mask=mask, softcap=softcap, entropy=entropy, sinks=sinks, **base))
            continue
        out += [Variant(kernel, mask="window", softcap=True, entropy=kernel == "forward", sinks=kernel == "forward",
                        **base) for kernel in KERNELS]
        out.append(Variant("forward", mask="none", softcap=False, entropy=False, **base))
        if dtype == "bf16":
            out.append(Variant("forward", mask="causal", softcap=False, entropy=False, **base))
            out += [Variant(kernel, mask="none", softcap=False, entropy=False, **base) for kernel in KERNELS[1:]]
    return sorted(out, key=lambda v: v.kernel != "forward")


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: reports the target; nothing is launched (the hook refuses to compile)."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # the JIT keeps one cache per device: one per architecture

    def get_current_stream(self, device=None):
        return 0


def launched_kernels(variant: Variant, configs: dict[str, LaunchConfig] | None = None) -> list[dict]:
    """What attention_with_stats_triton would compile for `variant` on its architecture, in launch order: per
    kernel the JIT function and the hook's compile info. configs: as the launcher's."""
    from .triton_kernel import attention_with_stats_triton

    dtype = {name: d for d, name in DTYPE_NAMES.items()}[variant.dtype]
    q = torch.zeros(BATCH, HEADS, TOKENS, variant.head_dim, dtype=dtype)
    k = torch.zeros(BATCH, KV_HEADS, TOKENS, variant.head_dim, dtype=dtype)
    problem = check_problem(q, k, k, causal=variant.mask != "none", window=WINDOW if variant.mask == "window" else None,
                            scale=None, softcap=30.0 if variant.softcap else None, spans=SPANS, want=variant.want(),
                            query_rows=None, sinks=torch.zeros(HEADS) if variant.sinks else None)
    launched = []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        launched.append({"fn": fn.jit_function, "compile": compile})
        return True  # not compiled (compile_kernel does that for a chosen target), never launched

    driver.set_active(_CompileOnlyDriver(variant.arch))  # stays: this runs in a process of its own
    knobs.runtime.jit_cache_hook = hook
    try:
        attention_with_stats_triton(q, k, k, problem, configs)
    finally:
        knobs.runtime.jit_cache_hook = None
    return launched


def compile_kernel(launch: dict, arch: int):
    """Compile one hooked launch for sm_<arch>: the CompiledKernel (asm["ptx"], asm["cubin"], metadata)."""
    info = launch["compile"]
    signature = {getattr(name, "name", name): ty for name, ty in info["signature"].items()}
    source = ASTSource(launch["fn"], signature, info["constants"], info["configs"][0])
    options = {name: info[name] for name in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """Registers, stack, static shared memory and local memory of the one function in `cubin` (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return dict(zip(("regs", "stack", "smem_static", "local"), map(int, found.groups())))


def check(variant: Variant, configs: dict[str, LaunchConfig] | None = None) -> dict:
    """Compile `variant`'s kernel and read its resources: one row of the table."""
    (launch,) = [launch for launch in launched_kernels(variant, configs)
                 if launch["fn"].__name__ == f"_{variant.kernel}_kernel"]
    start = time.perf_counter()
    compiled = compile_kernel(launch, variant.arch)
    seconds = time.perf_counter() - start
    resources = cubin_resources(compiled.asm["cubin"])
    info = launch["compile"]
    constants = {launch["fn"].arg_names[path[0]]: value for path, value in info["constants"].items()}
    smem = compiled.metadata.shared + resources["smem_static"]
    bound = STACK_BOUND.get((variant.kernel, variant.dtype, variant.head_dim, variant.arch), 0)
    return {
        **asdict(variant),
        "config": f"{constants['BLOCK_M']}x{constants['BLOCK_N']} w{info['num_warps']} s{info['num_stages']}",
        **resources, "smem_dynamic": compiled.metadata.shared, "smem": smem, "smem_limit": SMEM_LIMIT[variant.arch],
        "stack_bound": bound, "ok": resources["stack"] <= bound and smem <= SMEM_LIMIT[variant.arch],
        "compile_s": round(seconds, 2),
    }


def _check_quietly(job: tuple[Variant, dict | None]) -> dict:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    return check(*job)


def table(rows: list[dict]) -> str:
    """The resource table, one line per compiled variant (smem in KiB: dynamic + static)."""
    head = (f"{'kernel':<10} {'sm':>3} {'dtype':<5} {'d':>3} {'mask':<6} {'cap':<3} {'ent':<3} {'snk':<3} "
            f"{'config':<13} "
            f"{'regs':>4} {'stack':>5} {'smem':>6} {'limit':>5}  ok")
    lines = [head, "-" * len(head)]
    for r in rows:
        bound = f" (bound {r['stack_bound']})" if r["stack_bound"] else ""
        lines.append(
            f"{r['kernel']:<10} {r['arch']:>3} {r['dtype']:<5} {r['head_dim']:>3} {r['mask']:<6} "
            f"{'yes' if r['softcap'] else '-':<3} {'yes' if r['entropy'] else '-':<3} "
            f"{'yes' if r.get('sinks') else '-':<3} {r['config']:<13} "
            f"{r['regs']:>4} {r['stack']:>5} {r['smem'] / 1024:>6.1f} {r['smem_limit'] // 1024:>5}  "
            f"{'ok' if r['ok'] else 'FAIL'}{bound}")
    return "\n".join(lines)


def _parse_variant(text: str) -> Variant:
    kernel, dtype, head_dim, mask, softcap, entropy, arch, *sinks = text.split(",")
    return Variant(kernel, dtype, int(head_dim), mask, softcap == "1", entropy == "1", int(arch), sinks == ["1"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every combination of flags (about 5x longer)")
    parser.add_argument("--variant", help="only this one: KERNEL,DTYPE,HEAD_DIM,MASK,SOFTCAP,ENTROPY,ARCH[,SINKS] "
                                          "(e.g. forward,bf16,128,window,1,1,90,1)")
    parser.add_argument("--config", help="with --variant: BLOCK_M,BLOCK_N,NUM_WARPS,NUM_STAGES instead of launch.py's")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check needs TRITON_INTERPRET unset: under the interpreter nothing is compiled", file=sys.stderr)
        return 2
    if args.variant:
        variant = _parse_variant(args.variant)
        configs = {variant.kernel: LaunchConfig(*map(int, args.config.split(",")))} if args.config else None
        jobs = [(variant, configs)]
    else:
        jobs = [(variant, None) for variant in variants(full=args.full)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(args.workers, len(jobs))) as pool:
        rows = list(pool.map(_check_quietly, jobs))
    rows.sort(key=lambda r: (r["arch"], list(DTYPE_NAMES.values()).index(r["dtype"]), r["head_dim"],
                             KERNELS.index(r["kernel"])))
    print(table(rows))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} variants compiled for sm_{'/sm_'.join(map(str, ARCHS))} in "
          f"{time.perf_counter() - start:.0f} s; {len(failed)} failed")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
