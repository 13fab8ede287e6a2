"""Peak memory of loading a model in bf16: headlab.load_model against plain transformers, in one run.

    python tests/bench/bench_load_memory.py --out bench_load_memory.json

A bf16 safetensors copy of Gemma3 (the cached `gemma3-270m`, saved with save_pretrained in bfloat16 to a temporary
folder) is loaded six ways, each in a fresh interpreter: plain `AutoModelForCausalLM.from_pretrained(folder,
dtype=bfloat16)`, the same plus `AutoTokenizer.from_pretrained(folder)` (headlab loads the tokenizer too),
`headlab.load_model(folder, dtype=bfloat16)`, and headlab with every other decoder layer mapped to "disk" (half of
the layers); the last two again with the tokenizer loaded before the baseline and passed in (`tokenizer=`), which
leaves the weights alone. Each then runs one forward pass on the same 32 token ids. Reported for each, as GiB and as
a ratio to the bf16 weight bytes: the peak RSS of the load, and of the load and the forward pass, above the RSS after
`import torch` (the imports of transformers and headlab then count) and above the RSS after every import (the load
alone), and the resident memory at the end split into anonymous memory and pages of mapped files (which the system
can drop and read again). Safetensors weights are memory-mapped: they count once read, at the forward pass.
Targets: headlab at most 1.0x; with half of the layers on disk, below 0.5x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30


def rss_kib(field: str) -> int:
    """VmRSS (now), VmHWM (the peak since the last reset), RssAnon or RssFile of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(kind: str, folder: str, device_map: str | None) -> dict:
    """Load the folder once, the `kind` way ("plain", "plain+tokenizer", "headlab", "headlab, tokenizer given"), in
    this (fresh) interpreter, then run one forward pass: the peak RSS of each above the RSS after `import torch` and
    above the RSS after every import."""
    import torch

    after_torch = rss_kib("VmRSS")
    torch_anon, torch_file = rss_kib("RssAnon"), rss_kib("RssFile")
    import transformers  # noqa: F401 - imported before the baseline, as headlab imports it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import headlab
    import headlab.loading  # noqa: F401 - the loader and what it imports, before the baseline

    offload = tokenizer = None
    if kind == "headlab, tokenizer given":
        tokenizer = headlab.loading.load_tokenizer(folder)
    baseline = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    if kind.startswith("plain"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(folder) if kind == "plain+tokenizer" else None  # kept, as headlab's
        forward, dtype = lambda ids: model(input_ids=ids).logits, next(model.parameters()).dtype
    else:
        offload = tempfile.mkdtemp(prefix="bench-load-offload-") if device_map else None
        model = headlab.load_model(folder, dtype=torch.bfloat16, tokenizer=tokenizer,
                                   **({"device_map": json.loads(device_map), "offload_dir": offload}
                                      if device_map else {}))
        forward, dtype = model.logits, model.dtype
    load_peak = rss_kib("VmHWM")
    with torch.no_grad():
        forward(torch.arange(2, 34)[None])
    peak = rss_kib("VmHWM")
    anon, file = rss_kib("RssAnon") - torch_anon, rss_kib("RssFile") - torch_file
    del tokenizer
    if offload:
        shutil.rmtree(offload, ignore_errors=True)
    return {"kind": kind, "dtype": str(dtype), "after_torch_kib": after_torch, "baseline_kib": baseline,
            "load_peak_kib": load_peak, "forward_peak_kib": peak, "end_anon_kib": anon, "end_file_kib": file}  # above `import torch`


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

    with tempfile.TemporaryDirectory(prefix="bench-load-gemma3-bf16-") as folder:
        weight_bytes, disk = bf16_copy(Path(folder))
        rows = []
        for kind, way, device_map in (
                ("plain", "plain", None), ("plain+tokenizer", "plain+tokenizer", None), ("headlab", "headlab", None),
                ("headlab, half of the layers on disk", "headlab", disk["map"]),
                ("headlab, tokenizer given", "headlab, tokenizer given", None),
                ("headlab, tokenizer given, half on disk", "headlab, tokenizer given", disk["map"])):
            runs = [child(way, Path(folder), device_map) for _ in range(args.repeats)]
            row = {"kind": kind, "dtype": runs[0]["dtype"], "runs": runs}
            for peak in ("load_peak", "forward_peak"):
                for base, label in (("after_torch", "over_torch"), ("baseline", "over_imports")):
                    extra = max(run[f"{peak}_kib"] - run[f"{base}_kib"] for run in runs) * 1024
                    row[f"{peak}_{label}_gib"] = extra / GIB
                    row[f"{peak}_{label}_ratio"] = extra / weight_bytes
            for part in ("anon", "file"):
                row[f"end_{part}_over_torch_gib"] = max(run[f"end_{part}_kib"] for run in runs) * 1024 / GIB
            rows.append(row)
    result = {"model": "gemma3-270m, bf16 safetensors copy", "bf16_weight_bytes": weight_bytes,
              "bf16_weight_gib": weight_bytes / GIB, "disk_layer_bytes": disk["disk_bytes"],
              "rows": rows, "versions": versions(),
              "note": "peak RSS above the RSS after `import torch` / after every import, each way in a fresh "
                      "interpreter; the max over repeats"}
    if args.out:
        from headlab.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"bf16 weights: {weight_bytes / GIB:.2f} GiB ({disk['disk_bytes'] / GIB:.2f} GiB in the layers put on disk); "
          "peak RSS above `import torch` (above every import), and what stays resident after the forward pass")
    for row in rows:
        print(f"{row['kind']:>40}: load {row['load_peak_over_torch_gib']:.2f} GiB = "
              f"{row['load_peak_over_torch_ratio']:.2f}x ({row['load_peak_over_imports_ratio']:.2f}x); "
              f"load + forward {row['forward_peak_over_torch_gib']:.2f} GiB = "
              f"{row['forward_peak_over_torch_ratio']:.2f}x ({row['forward_peak_over_imports_ratio']:.2f}x); "
              f"then {row['end_anon_over_torch_gib']:.2f} GiB anonymous + {row['end_file_over_torch_gib']:.2f} GiB "
              "of mapped files")


if __name__ == "__main__":
    main()
