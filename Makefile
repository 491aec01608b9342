# Two set-up commands do everything: `make run` and `make test`.
# Both create .venv if it is missing and install the pinned versions first.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
PYTHON ?= python3

.PHONY: run test test-all install validate clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## run: the whole pipeline on the default data set (MNIST-1D), then the comparison table
run: install
	dvc repro
	@echo; cat reports/compare.md

## test: the default test suite (fast; slow end-to-end tests are marked)
test: install
	pytest -m "not slow"

## test-all: every test, the slow end-to-end ones included
test-all: install
	pytest
