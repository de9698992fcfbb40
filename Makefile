# One entry point for people and CI. torch is pinned: an open range pulls GBs of CUDA wheels.
# Each target installs only what it needs, recorded by a stamp in the venv: serving needs none of
# the extras, training adds tqdm and matplotlib, the tests add everything (ray, schemathesis, ...).
VENV := .venv
PY := $(VENV)/bin/python
SERVE := $(VENV)/.serve
TRAIN := $(VENV)/.train
ALL := $(VENV)/.installed
# make train: MNIST from $VAE_DATA_DIR, else downloaded (md5-checked) into data/mnist.
DATA := $(or $(VAE_DATA_DIR),data/mnist)

.PHONY: run train test lint

# Each stamp: make the venv if needed, install, and record it.
$(SERVE): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e .
	touch $@
$(TRAIN): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e '.[train]'
	touch $@
$(ALL): pyproject.toml clients/python/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 -e '.[train,dev]' -e clients/python
	touch $@

## run: serve models/default/vae.pt (shipped; or $VAE_MODEL_PATH) on port 8000, offline
run: $(SERVE)
	$(PY) -m app

## train: the default recipe into models/vae.pt; serve it with VAE_MODEL_PATH=models/vae.pt make run
train: $(TRAIN)
	$(PY) -m training --data-dir $(DATA) --out models/vae.pt $(if $(VAE_DATA_DIR),,--download)

## test: the whole test suite
test: $(ALL)
	$(PY) -m pytest

## lint: ruff and mypy --strict
lint: $(ALL)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
