"""Peak memory of loading a model in bf16: headlab.load_model against plain transformers, in one run.

    python tests/bench/bench_load_memory.py --out bench_load_memory.json

A bf16 safetensors copy of Gemma3 (the cached `gemma3-270m`, saved with save_pretrained in bfloat16 to a temporary
folder) is loaded three ways, each in a fresh interpreter: plain `AutoModelForCausalLM.from_pretrained(folder,
dtype=bfloat16)`, `headlab.load_model(folder, dtype=bfloat16)` (which also loads the tokenizer), and headlab with
every other decoder layer mapped to "disk" (half of the layers). Reported for each: the peak RSS above the
interpreter's baseline (its RSS after importing torch, transformers and headlab; the peak is reset there), in GiB
and as a ratio to the bf16 weight bytes; beside it the same peak above the RSS after `import torch` alone.
Targets: headlab at most 1.0x; with half of the layers on disk, below 0.5x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(kind: str, folder: str, device_map: str | None) -> dict:
    """Load the folder once, the `kind` way, in this (fresh) interpreter: its peak RSS above the baseline (and, for
    comparison, above the RSS after `import torch` alone: what the other imports add is then counted too)."""
    import torch

    after_torch = rss_kib("VmRSS")
    import transformers  # noqa: F401 - imported before the baseline, as headlab imports it
    from transformers import AutoModelForCausalLM

    import headlab
    import headlab.loading  # noqa: F401 - the loader and what it imports, before the baseline

    baseline = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    if kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        dtype = next(model.parameters()).dtype
    else:
        offload = tempfile.mkdtemp(prefix="bench-load-offload-") if device_map else None
        model = headlab.load_model(folder, dtype=torch.bfloat16,
                                   **({"device_map": json.loads(device_map), "offload_dir": offload}
                                      if device_map else {}))
        dtype = model.dtype
    peak = rss_kib("VmHWM")
    return {"kind": kind, "baseline_kib": baseline, "peak_kib": peak, "extra_bytes": (peak - baseline) * 1024,
            "extra_over_torch_bytes": (peak - after_torch) * 1024, "dtype": str(dtype)}


def bf16_copy(folder: Path) -> tuple[int, dict]:
    """Save the cached Gemma3 in bf16 to `folder`; (its weight bytes, a device map with every other layer on disk)."""
    import torch

    import headlab

    model = headlab.load_model("gemma3-270m")
    hf = model.hf.to(torch.bfloat16)
    hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())  # a tied tensor counted once
    device_map = {"lm_head": "cpu"}
    for name, _ in hf.model.named_children():
        if name != "layers":
            device_map[f"model.{name}"] = "cpu"
    for layer in range(model.n_layers):
        device_map[f"model.layers.{layer}"] = "disk" if layer % 2 == 0 else "cpu"
    on_disk = sum(p.numel() * p.element_size() for layer in range(0, model.n_layers, 2)
                  for p in hf.model.layers[layer].parameters())
    return weight_bytes, {"map": device_map, "disk_bytes": on_disk}


def child(kind: str, folder: Path, device_map: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--measure", kind, str(folder)]
    if device_map:
        command += ["--device-map", json.dumps(device_map)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=2, help="fresh interpreters per way of loading (the max is kept)")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--device-map", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.device_map)))
        return

    from headlab.scores import versions

    folder = Path(tempfile.mkdtemp(prefix="bench-load-gemma3-bf16-"))
    weight_bytes, disk = bf16_copy(folder)
    rows = []
    for kind, device_map in (("plain", None), ("headlab", None), ("headlab, half of the layers on disk", disk["map"])):
        runs = [child("plain" if kind == "plain" else "headlab", folder, device_map) for _ in range(args.repeats)]
        extra = max(run["extra_bytes"] for run in runs)
        over_torch = max(run["extra_over_torch_bytes"] for run in runs)
        rows.append({"kind": kind, "extra_gib": extra / GIB, "ratio_to_bf16_weights": extra / weight_bytes,
                     "runs_extra_bytes": [run["extra_bytes"] for run in runs], "dtype": runs[0]["dtype"],
                     "extra_over_torch_gib": over_torch / GIB, "over_torch_ratio": over_torch / weight_bytes})
    result = {"model": "gemma3-270m, bf16 safetensors copy", "bf16_weight_bytes": weight_bytes,
              "bf16_weight_gib": weight_bytes / GIB, "disk_layer_bytes": disk["disk_bytes"],
              "rows": rows, "versions": versions(),
              "note": "peak RSS above the interpreter's baseline, each load in a fresh interpreter; the max over repeats"}
    if args.out:
        from headlab.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"bf16 weights: {weight_bytes / GIB:.2f} GiB ({disk['disk_bytes'] / GIB:.2f} GiB in the layers put on disk)")
    for row in rows:
        print(f"{row['kind']:>38}: {row['extra_gib']:.2f} GiB = {row['ratio_to_bf16_weights']:.2f}x the bf16 weights "
              f"(above `import torch` alone: {row['extra_over_torch_gib']:.2f} GiB = {row['over_torch_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
