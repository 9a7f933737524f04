# Two commands do all set-up on a fresh machine: `make run` (main job) and `make test` (whole suite).
# The venv is (re)built only when missing or when pyproject.toml or a C source changed, so both are quiet on a re-run.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kiln-installed
# The CPU wheel is local on CPU machines; the default build (with CUDA) where a GPU driver is present.
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: run test test-fast lint format bench clean

run: $(STAMP)
	$(PY) -m train

test: $(STAMP)
	$(PY) -m pytest -q

# Everything except the multi-process and Slurm tests (which CI still runs through `make test`).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml $(wildcard data/filters/*.c) $(wildcard data/filters/*.h) | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	@touch $@

clean:
	rm -rf $(VENV) runs outputs multirun
