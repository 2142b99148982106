# Everything runs inside .venv, created on first use from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= configs/default.yaml
COMPARE ?= configs/compare/paper_table3_cpu.yaml
ARGS   ?=
ROOT   ?= ../shared/data/chest_xray/train

.PHONY: help install fit compare flower-demo bench test test-fast lint docs docs-shots tensorboard clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,flower,simulation]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with its test tools

fit: $(STAMP)  ## train on the embedded synthetic data (CONFIG=..., ARGS='--data.root DIR ...')
	$(BIN)/python -m pneumonia.fit --config $(CONFIG) $(ARGS)

compare: $(STAMP)  ## run a comparison (COMPARE=configs/compare/NAME.yaml, ARGS='--data.root DIR')
	$(BIN)/python -m pneumonia.compare --config $(COMPARE) $(ARGS)

flower-demo: $(STAMP)  ## a SuperLink + 3 SuperNodes on 127.0.0.1 with TLS, a short federation (about 4 min)
	$(BIN)/python -m pneumonia.flower.demo $(ARGS)

bench: $(STAMP)  ## CPU benchmarks, about 30 min (ROOT=a Kermany train folder, for bench/data.py)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/federated.py
	$(BIN)/python bench/data.py --root $(ROOT)
	$(BIN)/python bench/flower.py

# Three workers of one thread each: tiny models gain nothing from a second OpenMP thread, and
# two-thread workers oversubscribed two cores (496 s against 235 s for the same suite). The
# Flower files run one after another on one worker, first, while the other two compute
# (tests/conftest.py: FlowerTogether, LONGEST_FIRST): fresh-clone pytest 670 s, against 730 s
# with the files in xdist's own order and 814 s with four workers (2-core VM, 2026-12-03, a
# study paused beside them); alone, a fresh clone's pytest took 360 s. mypy checks the types of
# pneumonia/ ([tool.mypy] in pyproject.toml), incrementally through .mypy_cache.
test: $(STAMP)  ## lint, type-check, then the whole test suite (three one-thread workers, a file each)
	$(BIN)/ruff check pneumonia tests bench
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)

docs: $(STAMP)  ## the documentation site into site/ (warnings are errors); open site/index.html
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-shots: docs  ## screenshots of the site's home and a results page (headless Chromium) in site/
	for page in index results/new-patients/index; do \
		chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900 \
			--screenshot=site/$$(echo $$page | tr / -).png file://$(CURDIR)/site/$$page.html 2>/dev/null; \
	done

test-fast: $(STAMP)  ## the suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check pneumonia tests bench

tensorboard: $(STAMP)  ## serve the runs folder on http://localhost:6006
	$(BIN)/tensorboard --logdir runs --port 6006

clean:  ## remove runs and reports (keeps .venv and the decode cache)
	rm -rf runs reports
