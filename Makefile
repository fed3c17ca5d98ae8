# lens-serve: `make run` serves the demo groups on http://localhost:8000, `make test` runs
# ruff and pytest. Setup (virtualenv, torch, the package, the demo models) runs once; stamp
# files under .venv/ record what is done.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU wheel is enough for the demo; on a GPU machine pick the build that matches CUDA,
# e.g. `make run TORCH_SPEC=torch==2.13.0 PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128"`.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
DEMO_DIR := .demo

TORCH_STAMP := $(VENV)/.stamp-torch
INSTALL_STAMP := $(VENV)/.stamp-install

.PHONY: run test lint format demo validate k8s k8s-check setup clean

run: setup $(DEMO_DIR)/manifest.json
	$(BIN)/serve run serve_config.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .

demo: setup $(DEMO_DIR)/manifest.json

validate: setup $(DEMO_DIR)/manifest.json
	$(BIN)/lens-serve validate groups

k8s: setup
	$(BIN)/lens-serve k8s render serve_config.yaml k8s/rayservice.yaml

k8s-check: setup
	$(BIN)/lens-serve k8s render serve_config.yaml k8s/rayservice.yaml --check

setup: $(INSTALL_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	touch $@

$(INSTALL_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/pip install -e ".[serve,test]"
	touch $@

$(DEMO_DIR)/manifest.json: | $(INSTALL_STAMP)
	$(BIN)/lens-serve make-demo $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
