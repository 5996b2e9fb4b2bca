# Two commands do everything (see README):  make tutorial  |  make test
# The virtual environment is created on first use; nothing else needs installing by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

COLAB_ENV   := .colab-venv
COLAB_STAMP := $(COLAB_ENV)/.built

.PHONY: tutorial tutorial-full book test test-fast benchmark clean-outputs colab-env

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed, found " + sys.version' 
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

## Run every notebook in quick mode on the embedded synthetic data; results under outputs/
tutorial: $(STAMP)
	MPLBACKEND=Agg $(PY) -m segx_helpers.cli.runner

## Same, in full mode (longer training, all test images explained)
tutorial-full: $(STAMP)
	MPLBACKEND=Agg $(PY) -m segx_helpers.cli.runner --full

## The notebooks executed by make tutorial as a static site (outputs/book/html/index.html); runs nothing again
book: $(STAMP)
	@ls outputs/notebooks/*.ipynb >/dev/null 2>&1 || { echo "make book: no executed notebooks in outputs/notebooks/: run make tutorial first" >&2; exit 1; }
	@$(PY) -c 'import importlib, myst_nb, sphinx_book_theme; importlib.import_module("sphinx-mathjax-offline")' 2>/dev/null || $(PY) -m pip install --quiet -e ".[docs]"
	$(PY) -m segx_helpers.cli.book

## The emulated Colab runtime the Colab test runs notebooks on (Colab's pinned kernel packages; torch and the rest
## seen from .venv, not installed again); rebuilt when the pins change
$(COLAB_STAMP): tests/colab_pins.txt tests/colab_emulation.py $(STAMP)
	$(PY) tests/colab_emulation.py build-env $(COLAB_ENV) $(VENV)

colab-env: $(COLAB_STAMP)

## The test suite, notebooks included (what CI runs); installs the headless browser the browser test drives
test: $(STAMP) $(COLAB_STAMP)
	@bash scripts/install-browser.sh
	MPLBACKEND=Agg $(PY) -m pytest

## The unit tests only, without executing the notebooks
test-fast: $(STAMP)
	MPLBACKEND=Agg $(PY) -m pytest -m "not notebooks"

## Throughput and overhead benchmark (prints a table, writes benchmarks/results/)
benchmark: $(STAMP)
	$(PY) benchmarks/run_benchmark.py

## Training images/s of the segmenter and classifier at 128 and 256 px on 2 threads, per CPU setting (float32,
## channels_last, bfloat16 autocast, + the opt-in fast kernels), and quick mode's segmenter Dice with each
.PHONY: benchmark-training
benchmark-training: $(STAMP)
	$(PY) benchmarks/run_training_benchmark.py --dice

## segx audit: images/s for 1 and 2 processes and peak memory for 1k and 10k synthetic images (slow on a CPU)
.PHONY: benchmark-audit
benchmark-audit: $(STAMP)
	$(PY) benchmarks/run_audit_benchmark.py

clean-outputs:
	rm -rf outputs
