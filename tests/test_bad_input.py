"""Every bad input to `headlab scan` gets one sentence: exit code 1, one `error:` line on stderr, no traceback,
nothing written. One row per case of the README's table. Objects only Python can pass (a model in memory) get one
sentence too, as a HeadlabError subclass: API_ROWS."""

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

import headlab
from headlab.cli import app
from headlab.registry import REAL_MODELS, cached_dir

runner = CliRunner()


def _empty(tmp):
    folder = tmp / "empty"
    folder.mkdir()
    return str(folder)


def _config_only(tmp):
    folder = tmp / "config-only"
    headlab.load_model("tiny-llama").hf.config.save_pretrained(folder)
    return str(folder)


def _pickle_only(tmp):
    folder = tmp / "pickle-only"
    headlab.load_model("tiny-llama").hf.config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read: pickles are never loaded")
    return str(folder)


def _corrupt_cache(tmp, monkeypatch):
    """A cache entry of smollm2-135m whose weights no longer match their recorded checksum."""
    monkeypatch.setenv("HEADLAB_CACHE", str(tmp / "cache"))
    spec = REAL_MODELS["smollm2-135m"]
    entry = cached_dir(spec, spec.source_sha256())
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"corrupted")
    (entry / "headlab.json").write_text(json.dumps({"weights_sha256": "0" * 64}))
    return "smollm2-135m"


def _scan_with_scores(tmp, damage):
    """A scan folder whose probes/retrieval.csv was damaged by `damage(text) -> text`."""
    import numpy as np

    folder = tmp / "scan-with-scores"
    (folder / "probes").mkdir(parents=True)
    path = headlab.HeadScores.from_matrix(np.arange(8.0).reshape(2, 4), {"probe": "retrieval"}).save(
        folder / "probes" / "retrieval")
    path.write_text(damage(path.read_text()))
    return str(folder)


def _truncated_scores(tmp):
    return _scan_with_scores(tmp, lambda text: text[: len(text) // 2 + 3])  # cut inside a row


def _corrupted_scores(tmp):
    return _scan_with_scores(tmp, lambda text: text + '7,1,"L7H1,0.5\n8,2,oops,"x",1,2,3\n')


def _quick_scan(tmp):
    """A finished quick scan of tiny-llama (detectors and flow): the folder a careless rerun would destroy."""
    folder = tmp / "earlier-scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,flow", "--quick", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return str(folder)


# (id, arguments with {model} / {out} placeholders, how to make the model argument, what the sentence says)
ROWS = [
    ("unknown-model", ["scan", "smolm2-135m"], None, "unknown model"),
    ("unknown-probe", ["scan", "tiny-llama", "--probes", "detectors,nope"], None, "unknown probe"),
    ("unwritable-parent", ["scan", "tiny-llama", "--out", "/proc/headlab-scan"], None, "cannot write the output"),
    ("out-is-a-file", ["scan", "tiny-llama", "--out", "{file}"], None, "it is a file"),
    ("folder-without-config", ["scan", "{model}"], _empty, "no config.json"),
    ("config-without-weights", ["scan", "{model}"], _config_only, "no weights"),
    ("pickle-only-weights", ["scan", "{model}"], _pickle_only, "safetensors or GGUF only"),
    ("hub-offline", ["scan", "someone/some-model"], "offline", "hub"),
    ("cuda-without-cuda", ["scan", "tiny-llama", "--device", "cuda"], None, "CUDA is not available"),
    ("mps-without-mps", ["scan", "tiny-llama", "--device", "mps"], None, "MPS (Apple's GPU) is not available"),
    ("unknown-device", ["scan", "tiny-llama", "--device", "gpu0"], None, "unknown device"),
    ("max-context-too-small", ["scan", "tiny-llama", "--probes", "detectors", "--max-context", "3"], None,
     "below what detectors need"),
    ("corrupted-cache", ["scan", "{model}", "--probes", "detectors"], _corrupt_cache, "no longer match"),
    ("top-zero", ["scan", "tiny-llama", "--top", "0"], None, "--top must be at least 1"),
    ("probe-cannot-handle-the-model", ["scan", "tiny-bert", "--probes", "qk"], None, "causal language model"),
    ("kv-truncated-scores", ["kv", "tiny-llama", "--scores", "{model}"], _truncated_scores, "not a HeadScores table"),
    ("kv-corrupted-scores", ["kv", "tiny-llama", "--scores", "{model}"], _corrupted_scores,
     "not a readable HeadScores table"),
    ("sweep-unknown-model", ["sweep", "tiny-llama", "nonexistent-model"], None, "unknown model 'nonexistent-model'"),
    ("scan-folder-of-other-settings", ["scan", "tiny-llama", "--probes", "detectors", "--out", "{model}"], _quick_scan,
     "holds a scan with other settings (quick True there, False here); choose another --out or pass --overwrite"),
    ("scan-folder-of-other-parameters", ["scan", "tiny-llama", "--probes", "flow", "--quick", "--set",
                                         "flow.n_texts=3", "--out", "{model}"], _quick_scan,
     "holds flow run with other parameters (n_texts)"),
    ("scan-folder-of-another-model", ["scan", "tiny-gemma3", "--probes", "flow", "--quick", "--out", "{model}"],
     _quick_scan, "holds a scan of tiny-llama, not tiny-gemma3"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_gets_one_sentence(row, tmp_path, monkeypatch):
    if row[0] == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if row[0] == "mps-without-mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    _, args, make, says = row
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "file").write_text("")
    model = None
    if make == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif make is _corrupt_cache:
        model = make(inputs, monkeypatch)
    elif make is not None:
        model = make(inputs)
    out = tmp_path / "scan"
    args = [a.format(model=model, file=inputs / "file") for a in args]
    if "--out" not in args:
        args += ["--out", str(out)]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(app, args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert after == [p for p in before if "cache" not in p.parts], "the command wrote something"
    assert not os.path.exists("/proc/headlab-scan")


def _tiny_hf():
    return headlab.load_model("tiny-llama").hf


def _mamba():
    """A model of a family without attention heads (a state-space model), built in memory."""
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))


def _tokenizer():
    return headlab.load_model("tiny-llama").tokenizer


# (id, the call, the error class, what its sentence says): load_model and headlab.scan given the wrong object
API_ROWS = [
    ("a-string-that-is-no-model", lambda tmp: headlab.load_model("x" * 400), headlab.UnknownModelError,
     "unknown model"),
    ("a-plain-torch-module", lambda tmp: headlab.load_model(torch.nn.Linear(2, 2)), headlab.InputError,
     "a torch module that is not a transformers model"),
    ("a-dict", lambda tmp: headlab.load_model({"model.embed_tokens.weight": torch.zeros(2, 2)}), headlab.InputError,
     "got a dict"),
    ("a-tokenizer-as-the-model", lambda tmp: headlab.load_model(_tokenizer()), headlab.InputError,
     "where the model goes; pass the model first and the tokenizer as tokenizer="),
    ("a-model-without-tokenizer", lambda tmp: headlab.load_model(_tiny_hf()), headlab.InputError,
     "came without a tokenizer; pass its tokenizer as tokenizer="),
    ("a-tokenizer-that-is-no-tokenizer", lambda tmp: headlab.load_model(_tiny_hf(), tokenizer="gpt2"),
     headlab.InputError, "tokenizer= takes a transformers tokenizer, got a str"),
    ("a-family-headlab-does-not-support", lambda tmp: headlab.load_model(_mamba(), tokenizer=_tokenizer()),
     headlab.UnsupportedModelError, "mamba"),
    ("a-dtype-for-a-model-in-memory", lambda tmp: headlab.load_model(_tiny_hf(), tokenizer=_tokenizer(),
                                                                     dtype="bfloat16"),
     headlab.InputError, "a model in memory stays on the devices and in the dtype it has, so dtype does not apply"),
    ("ray-for-a-model-in-memory", lambda tmp: headlab.scan(headlab.load_model("tiny-llama"), tmp / "scan",
                                                           engine="ray"),
     headlab.InputError, "a model in memory is scanned here"),
]


@pytest.mark.parametrize("row", API_ROWS, ids=[row[0] for row in API_ROWS])
def test_a_wrong_object_gets_one_sentence(row, tmp_path):
    _, call, error, says = row
    with pytest.raises(error) as caught:
        call(tmp_path)
    message = str(caught.value)
    assert says in message and "\n" not in message and message.count(". ") == 0, message
    assert not any(tmp_path.iterdir()), "the call wrote something"


def test_a_probe_crashing_in_torch_does_not_stop_the_others(tmp_path, monkeypatch):
    import headlab.probes as registry
    from probe_plugin import SelfAttention

    class Crash(SelfAttention):
        name = "crash"

        def run(self, model, params, unit):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setitem(registry._REGISTERED, "crash", Crash())
    out = tmp_path / "scan"
    result = runner.invoke(app, ["scan", "tiny-llama", "--probes", "detectors,crash", "--quick", "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "detectors" in (out / "heads.csv").read_text().splitlines()[0]
    summary = json.loads((out / "scan.json").read_text())
    assert summary["probes"] == ["detectors"] and "mat1 and mat2" in summary["failed"]["crash"]
    assert "RuntimeError: mat1 and mat2 shapes" in (out / "report.html").read_text()
    shutil.rmtree(out)
