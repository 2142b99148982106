# Everything runs inside .venv, created on first use from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml
COMPARE ?= configs/compare/paper_table3_cpu.yaml
ARGS   ?=

.PHONY: help install fit compare test test-fast lint tensorboard clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its test tools

fit: $(STAMP)  ## train on the embedded synthetic data (CONFIG=..., ARGS='--data.root DIR ...')
	$(BIN)/python -m pneumonia.fit --config $(CONFIG) $(ARGS)

compare: $(STAMP)  ## run a comparison (COMPARE=configs/compare/NAME.yaml, ARGS='--data.root DIR')
	$(BIN)/python -m pneumonia.compare --config $(COMPARE) $(ARGS)

test: $(STAMP)  ## lint, then the whole test suite
	$(BIN)/ruff check pneumonia tests
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check pneumonia tests

tensorboard: $(STAMP)  ## serve the runs folder on http://localhost:6006
	$(BIN)/tensorboard --logdir runs --port 6006

clean:  ## remove runs and reports (keeps .venv and the decode cache)
	rm -rf runs reports
