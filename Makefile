# mmengine: `make demo` sets everything up and runs the main job; `make test` runs the CPU suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format gpu-test clean

setup: $(STAMP)

# One install step for every command: a venv in the repo, torch (the local CUDA build on
# x86_64; it runs on CPU too), then the project with its dev extras.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$$(uname -m)" = "x86_64" ]; then \
	  $(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"; \
	else \
	  $(PY) -m pip install -q "torch==2.9.1" "torchvision==0.24.1"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

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
	rm -rf $(VENV) build *.egg-info
