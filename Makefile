# Two entry points that work on a fresh machine (no GPU, no model hub):
#   make demo   set up .venv from the lock, then run the whole pipeline on the synthetic catalogue and tiny model
#   make test   set up .venv from the lock, then run the test suite (what CI runs: every test)
#   make test-fast    the same without the tests marked slow (the inner loop, a few minutes)
#   make test-latest  the suite against the newest releases the version ranges allow (.venv-latest), to see drift
#   make lock         re-resolve requirements.lock (exact versions + hashes) from pyproject.toml's ranges
#   make gpu-check    the GPU paths (fp16, bf16, 4-bit QLoRA with a 16-bit tower, liger, classify) on tiny models;
#                     skips without CUDA
VENV ?= .venv
LATEST_VENV ?= .venv-latest
PYTHON ?= python3
PY := $(VENV)/bin/python
LOCK := requirements.lock
# torch + torchvision: the CPU-capable CUDA build of the machine's local wheel store (no multi-GB download there)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-latest lock bench gpu-check clean

# The tested set, exactly: every package at the lock's version and hash; then vlmtax itself, editable, with no
# resolution of its own (its ranges in pyproject.toml are for people who install it as a library).
$(VENV)/.installed: $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
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

# The newest releases inside pyproject.toml's ranges (torch stays at the local pair), in their own venv;
# pytest's -rf closes with one `FAILED test - reason` line per failure.
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH_PINS)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|peft|trl|accelerate|timm|datasets|tokenizers)=='
	$(LATEST_VENV)/bin/python -m pytest -q -rf $(PYTEST_PARALLEL)

# uv resolves for CI's platform and Python and records every file's hash; the torch pair is pinned to the
# local wheels' versions (requirements-pins.txt).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet uv
	.venv-lock/bin/uv pip compile pyproject.toml --extra dev -c requirements-pins.txt --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet -o $(LOCK)
	@echo "$(LOCK) written: review the diff, then run make test"

bench: setup
	$(PY) bench/prepare.py
	$(PY) bench/sft.py
	$(PY) bench/predict.py

gpu-check: setup
	$(PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock demo_work bench/_work
