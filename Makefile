# Two commands do everything on a fresh machine with Python >= 3.11 and make:
#   make run    set up .venv and run the pipeline on the default corpus
#   make test   set up .venv with dev extras and run the test suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any torch >= 2.4 works. When the venv has none, this build is installed (CPU wheel here;
# on a CUDA machine pip picks the CUDA build of the same release).
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# Silence one noisy pip warning about index locations; keep every other line and pip's status.
PIP := $(BIN)/python -m pip --disable-pip-version-check
PIP_FILTER := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: run test install install-dev clean

run: $(VENV)/.installed
	$(BIN)/tokenmill run $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: tokenmill needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing tokenmill into $(VENV) (first time: a few minutes)"
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)" 2>&1 | $(PIP_FILTER)
	@$(PIP) install -q -e . 2>&1 | $(PIP_FILTER)
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@$(PIP) install -q -e '.[dev]' 2>&1 | $(PIP_FILTER)
	@touch $@

clean:
	rm -rf $(VENV) .tokenmill build *.egg-info
