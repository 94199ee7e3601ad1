# The two set-up commands of the README. Each creates .venv if absent and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
WORKDIR ?= runs/demo

# Real data comes from Debian packages (no downloads at run time); installed where apt-get and root
# are available, otherwise the data tests say which command to run.
DEBIAN_DATA := fonts-noto-color-emoji fonts-symbola ruby-gemojione dataset-fashion-mnist wordnet-base \
	fortunes-min

.PHONY: demo test lint install install-test data-packages notebooks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# openai-clip carries the CLIP BPE vocabulary (MIT); --no-deps because it declares torch/torchvision.
install: $(PY)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps "openai-clip==1.0.1"

install-test: $(PY)
	$(PIP) install --quiet -e ".[test,reference]"
	$(PIP) install --quiet --no-deps "openai-clip==1.0.1" "DALL-E==0.1"

# glibc.malloc.hugetlb=1: the heap in transparent huge pages (README, "On CPU").
demo: install data-packages
	GLIBC_TUNABLES=glibc.malloc.hugetlb=1 $(VENV)/bin/jaxaigc demo --workdir $(WORKDIR)

data-packages:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		dpkg -s $(DEBIAN_DATA) >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_DATA); }; \
	else echo "note: not root or no apt-get; install with: apt-get install $(DEBIAN_DATA)"; fi

lint: install-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# notebooks/*.py and their .ipynb twins: whichever was edited last updates the other.
notebooks: install-test
	$(VENV)/bin/jupytext --sync notebooks/*.py

test: lint data-packages
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)
