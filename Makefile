# Visionyard: one entry point for installing, running the demo, testing and benchmarking.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PACKAGES := -e shared -e services/api -e services/trainer-runner -e services/tracker \
            -e services/storage -e trainers/classifier -e trainers/yolo -e "cli[demo]"
PYPROJECTS := $(wildcard shared/pyproject.toml services/*/pyproject.toml trainers/*/pyproject.toml cli/pyproject.toml)

.PHONY: install trainer-env demo up test test-unit lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS) requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PACKAGES) -r requirements-dev.txt
	touch $@

# The Ultralytics trainer environment (torch + Ultralytics, ~6 GB) lives outside the checkout, keyed by the
# sha256 of trainers/yolo/requirements-env.txt: built once per machine, reused by every checkout and run.
# `ensure` only checks a marker when the environment is there (it also points the environment's editable
# project packages at this checkout), so the target always runs.
trainer-env: install
	$(BIN)/python -m visionyard.cli.trainer_envs ensure

# The demo keeps its data directory (checkpoints, MLflow store, logs) for inspection; each run starts fresh.
DEMO_DIR ?= demo-data
demo: install trainer-env
	rm -rf $(DEMO_DIR)
	$(BIN)/visionyard demo --data-dir $(DEMO_DIR)

up: install
	$(BIN)/visionyard up

test: install trainer-env
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m "not integration and not e2e"

# ruff.toml: pyflakes, syntax, import order, bugbear, pyupgrade; mypy.ini: strict on shared/ and the
# services' use cases and ports, the defaults on the rest of the services.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install trainer-env
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .data demo-data
