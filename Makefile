# mmengine: `make demo` sets everything up and runs the main job; `make test` runs the CPU suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The pip `make torch` installs with (setup and constraints pass their venv's).
PIP ?= $(PY) -m pip

.PHONY: setup demo test lint format gpu-test clean torch constraints

setup: $(STAMP)

# One install step for every command: a venv in the repo, torch (the local CUDA build on
# x86_64; it runs on CPU too), then the project with its dev extras.
# constraints.txt pins every other package to the versions the suite last passed with, so a
# fresh machine gets a tested set (a new transformers or PyAV release once broke a clean
# install; docs/design-notes.md). `make constraints` moves them to the newest releases.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory torch PIP="$(PY) -m pip"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# torch and torchvision (the local CUDA build on x86_64; it runs on CPU too).
torch:
	if [ "$$(uname -m)" = "x86_64" ]; then \
	  $(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"; \
	else \
	  $(PIP) install -q "torch==2.9.1" "torchvision==0.24.1"; \
	fi

# Rewrites constraints.txt from a scratch venv with the newest releases pyproject.toml
# allows; run `make test` after it and commit both if it passes.
LATEST := .venv-latest
constraints:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory torch PIP="$(LATEST)/bin/python -m pip"
	$(LATEST)/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Versions \`make setup\` installs (besides torch, torchvision and their own"; \
	  echo "# dependencies, pinned in the Makefile). Written by \`make constraints\`."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | \
	  grep -viE '^(torch|torchvision|triton|nvidia-|cuda-|mmengine|sympy|mpmath|networkx|filelock|fsspec|typing.extensions|setuptools|pip|wheel)=='; \
	} > constraints.txt
	rm -rf $(LATEST)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

gpu-test:
	python3 -m pytest -q -m gpu -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
