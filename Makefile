# The two set-up commands of the README. Each creates .venv if absent and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/demo

.PHONY: demo test lint install install-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet -e .

install-test: $(PY)
	$(PIP) install --quiet -e ".[test,reference]"
	$(PIP) install --quiet --no-deps "openai-clip==1.0.1" "DALL-E==0.1"

demo: install
	$(PY) experiments/demo.py --workdir $(WORKDIR)

lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)
