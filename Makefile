# The two commands of the README, and their machinery. Everything installs into .venv.
# PyTorch's CPU build is installed first, on purpose: a plain `torch` requirement on a machine
# without torch would pull several GB of CUDA packages.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test test-slow docs lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"

$(VENV)/.core: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.docs: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $@

## demo: install pyrosc and fit the VAE to the embedded PBMC 3k dataset (writes pyrosc_out/)
demo: $(VENV)/.core
	$(BIN)/pyrosc fit --out pyrosc_out

## test: install pyrosc with its test tools; lint, check formatting, run the default test suite
test: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

## test-slow: the long-running tests (marked `slow`), left out of `make test`
test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow

## docs: install the docs tools; build the site into docs/_build/html (warnings are errors)
docs: $(VENV)/.docs
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

format: $(VENV)/.test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) pyrosc_out .pytest_cache .ruff_cache docs/_build docs/generated
