# The README's two commands: `make run` (main job on the embedded default) and
# `make test` (the whole suite, never the benchmarks). Both set up .venv/ themselves.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# Embedded GCS (fake-gcs-server); its buckets live in .gcs/ at the repo root.
GCS_PORT ?= 4443
export DRIVERS_GCS_ROOT ?= $(CURDIR)/.gcs
export STORAGE_EMULATOR_HOST ?= http://127.0.0.1:$(GCS_PORT)

.PHONY: setup run test lint bench gcs-up gcs-down

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -r requirements-dev.txt
	touch $(STAMP)

gcs-up: setup
	$(BIN)/drivers gcs up --port $(GCS_PORT)

gcs-down: setup
	$(BIN)/drivers gcs down

run: gcs-up
	$(BIN)/drivers nightly-plan

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/python bench/run_all.py
