# Two entry points that work on a fresh machine (no GPU, no model hub):
#   make demo   set up .venv, then run the whole pipeline on the synthetic catalogue and tiny model
#   make test   set up .venv, then run the test suite (what CI runs: every test)
#   make test-fast   the same without the tests marked slow (the inner loop, a few minutes)
#   make gpu-check  the GPU paths (fp16, bf16, 4-bit QLoRA, liger) on the tiny model; skips without CUDA
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch + torchvision pinned: taken from the machine's local wheel store (no multi-GB download there)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/vlmtax demo --workdir demo_work

# One pytest worker per core, whole test files per worker (session fixtures and the docs walk-through
# stay in one process), in the order tests/conftest.py gives (longest first): the demo and its blank-image
# control are two files, so they start at once, side by side.
PYTEST_PARALLEL ?= -n auto --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

bench: setup
	$(PY) bench/prepare.py
	$(PY) bench/sft.py
	$(PY) bench/predict.py

gpu-check: setup
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) demo_work bench/_work
