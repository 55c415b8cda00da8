# diva-lightning developer targets. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: help setup test test-slow test-distributed lint format demo bench bench-data clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

setup: ## create .venv with the CPU torch build and the package in editable mode
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build; anything looser pulls multi-GB CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'

test: ## run the default (fast, offline) test suite
	$(PY) -m pytest -q

test-slow: ## run the slow tests
	$(PY) -m pytest -q -m slow

test-distributed: ## run the multi-process DDP / DeepSpeed tests on CPU
	$(PY) -m pytest -q -m distributed

lint: ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: ## ruff autofix and format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove caches and run outputs
	rm -rf .cache .pytest_cache .ruff_cache runs
