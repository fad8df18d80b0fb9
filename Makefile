# `make demo` / `make test`: create .venv, install onlinemix with its dev extra, then run
# the main job on the demo world / the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo
test: $(VENV)/installed
	$(BIN)/python -m pytest -q

# The main job on the built-in demo world (configs/demo.yaml): CPU only, no download.
demo: $(VENV)/installed
	$(BIN)/python train.py

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@
