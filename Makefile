# Two commands for a fresh machine: `make run` (the service on its embedded default) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The real IndexTTS2 (the `indextts` extra) for the tests; `make run` does not need it.
ENGINE_STAMP := $(VENV)/.engine-stamp
# On these machines this takes the CPU build that lies on disk; a plain `torch` would pull the CUDA one.
TORCH  ?= torch==2.13.0

.PHONY: install install-engine run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(ENGINE_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check '$(TORCH)'
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,indextts]'
	touch $(ENGINE_STAMP)

install-engine: $(ENGINE_STAMP)

run: $(STAMP)
	$(BIN)/python api_server.py

test: $(ENGINE_STAMP)
	$(BIN)/python -m pytest

lint: $(ENGINE_STAMP)
	$(BIN)/ruff check src tests bench api_server.py test_api.py
	$(BIN)/mypy src bench

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
