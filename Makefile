# `make demo` / `make test` / `make docs`: create .venv, install onlinemix with its dev extra, then run
# the main job on the demo world / the tests / build the documentation (warnings are errors).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo docs
test: $(VENV)/installed
	$(BIN)/python -m pytest -q

# The main job on the built-in demo world (configs/demo.yaml): CPU only, no download.
demo: $(VENV)/installed
	$(BIN)/python train.py

# MkDocs with mkdocstrings (mkdocs.yml): a broken link or a docstring naming a parameter the code
# lacks stops the build.
docs: $(VENV)/installed
	$(BIN)/mkdocs build --strict --quiet

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@
