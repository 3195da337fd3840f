# One entry point per job. `make demo` and `make test` each do all the set-up they need.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ssip-installed
DEMO ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup system test lint pytest demo bench quality clean

setup: system $(STAMP)

system:
	@bash scripts/system_deps.sh

# Re-installs only when pyproject.toml changed (quick when nothing did).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps py-neuromodulation==0.1.3
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check ssip tests bench jobs
	$(BIN)/lint-imports
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint pytest

# The main job on the embedded default: simulated corpus from real speech -> ingest -> the
# shipped prior checked for leakage,
# likelihoods, baselines -> DPS decode -> report (resumable: a re-run skips finished stages).
demo: setup
	$(BIN)/ssip pipeline $(DEMO) --config configs/pipeline-demo.yaml

bench: setup
	$(BIN)/python bench/ingest.py

# Decoding quality of DPS against the baselines (about an hour on 2 cores; resumable).
quality: setup
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
