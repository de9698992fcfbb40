# One entry point for people and CI. torch is pinned: an open range pulls GBs of CUDA wheels.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e '.[train,dev]'
	touch $@

## run: train the default model if none exists, then serve it on port 8000
run: $(STAMP)
	PYTHON=$(PY) scripts/serve.sh

## test: the whole test suite
test: $(STAMP)
	$(PY) -m pytest

## lint: ruff and mypy --strict
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
