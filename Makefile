# Visionyard: one entry point for installing, running the demo, testing and benchmarking.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PACKAGES := -e shared -e services/api -e services/trainer-runner -e services/tracker \
            -e services/storage -e trainers/classifier -e "cli[demo]"
PYPROJECTS := $(wildcard shared/pyproject.toml services/*/pyproject.toml trainers/*/pyproject.toml cli/pyproject.toml)

.PHONY: install demo up test test-unit lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS) requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PACKAGES) -r requirements-dev.txt
	touch $@

# The demo keeps its data directory (checkpoints, MLflow store, logs) for inspection; each run starts fresh.
DEMO_DIR ?= demo-data
demo: install
	rm -rf $(DEMO_DIR)
	$(BIN)/visionyard demo --data-dir $(DEMO_DIR)

up: install
	$(BIN)/visionyard up

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m "not integration and not e2e"

lint: install
	$(BIN)/ruff check --select F,E9 shared services trainers cli bench tests

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .data demo-data
