# diva-lightning developer targets. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: help setup test test-slow test-distributed lint format demo demo-data bench bench-stages bench-stages-real bench-fused bench-gpu bench-data bench-mini bench-mini-v1 clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

setup: ## create .venv with the CPU torch build and the package in editable mode
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build; anything looser pulls multi-GB CUDA wheels
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,eval]'
	# lmms-eval without its declared dependencies (see the `eval` extra in pyproject.toml)
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3

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

TINY := --config configs/tiny/trainer.yaml --config configs/tiny/data.yaml
DIVA := $(VENV)/bin/diva-cli

demo-data: ## write the synthetic shapes-world shards by hand (the data module also does on first use)
	test -f data/shapes/train/summary.json || $(DIVA) prepare data/shapes/train --synthetic 512 --max_count 64 --seed 0 --overwrite true
	test -f data/shapes/val/summary.json || $(DIVA) prepare data/shapes/val --synthetic 64 --max_count 32 --seed 1 --overwrite true

demo: ## stage 1 then stage 2 on the embedded default (tiny Emu3, synthetic shards, CPU)
	$(DIVA) fit $(TINY) --config configs/tiny/stage1.yaml
	$(DIVA) fit $(TINY) --config configs/tiny/stage2.yaml
	@echo "logs (TensorBoard): runs/tiny  ->  $(VENV)/bin/tensorboard --logdir runs/tiny  (Images: eval/samples)"
	@echo "stage-1 encoders:   runs/tiny/stage1/factor_encoders"
	@echo "checkpoints:        runs/tiny/stage1/checkpoints, runs/tiny/stage2/checkpoints"

bench: bench-stages bench-fused bench-data ## every benchmark

bench-stages: ## step time and peak memory: SFT vs stage 2 (online, EMA targets, balance cap), tiny and medium Show-o shapes
	$(PY) benchmarks/bench_stages.py

clean: ## remove caches and run outputs
	rm -rf .cache .pytest_cache .ruff_cache runs

bench-stages-real: ## step time and peak memory at real vocabularies (Show-o 58,498, Liquid 264,192): SFT, stage 1, stage 2 at 2/6/11 layers
	$(PY) benchmarks/bench_stages.py --real

bench-fused: ## fused flows (one forward of both flows) vs two forwards: step time, tiny and medium Emu3 shapes
	$(PY) benchmarks/bench_fused.py

bench-gpu: ## on a CUDA GPU: stage 2 vs SFT on a Show-o-1.5B shape (tokens/s, MFU, peak memory) and a ZeRO-2 run capped at 24 GiB
	$(PY) benchmarks/bench_gpu.py --capped

bench-data: ## data loading samples/s: decoded-JPEG vs pre-tokenised shards (synthetic world)
	$(PY) benchmarks/bench_data.py

MODE ?= full
bench-mini: ## DIVA-mini v2 (benchmarks/mini/README.md): MODE=quick (own small base, val split; 9.3 min from a fresh clone on 2 cores) or MODE=full (every phase, resumable)
ifeq ($(MODE),quick)
	$(PY) -m benchmarks.mini.protocol quick --out runs/mini
else
	$(PY) -m benchmarks.mini.base --mode v2 --out runs/mini --probe-every 1000
	$(PY) -m benchmarks.mini.protocol sft-check --out runs/mini
	$(PY) -m benchmarks.mini.protocol grid --out runs/mini
	$(PY) -m benchmarks.mini.protocol select --out runs/mini
	$(PY) -m benchmarks.mini.protocol final --out runs/mini
	$(PY) -m benchmarks.mini.protocol report --out runs/mini
endif

bench-mini-v1: ## DIVA-mini v1 (world v1, the earlier protocol): MODE=full or MODE=quick
	$(PY) -m benchmarks.mini.run --mode $(MODE) --out runs/mini
