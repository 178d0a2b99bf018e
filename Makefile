# Two set-up commands (see README): `make demo` and `make test`. Both create .venv from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/scoredistill: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,diffusers,mnist]"
	touch $(BIN)/scoredistill

.PHONY: install demo test test-fast lint
install: $(BIN)/scoredistill

demo: install
	$(BIN)/scoredistill demo

# everything, distribution tests included (~14 min on 2 cores: 843 s in a fresh clone, 2026-12-01); lists the 25 slowest
test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q --durations=25 tests

# without the distribution tests (~1.5 min)
test-fast: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
