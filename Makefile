# `make demo` / `make test`: create .venv, install onlinemix with its dev extra, then run
# the main job on the toy data set / the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo
test: $(VENV)/installed
	$(BIN)/python -m pytest -q

# The main job on the built-in toy set: CPU only, no download, about a minute.
demo: $(VENV)/installed
	$(BIN)/python train.py --config configs/toy.yaml

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@
