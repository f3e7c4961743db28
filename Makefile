# Two commands: `make serve` (set up and start the service on embedded defaults) and
# `make test` (set up and run the tests). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is installed first, pinned, so the project's torch range is satisfied by this build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/distill serve

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -rfEs $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .distill .pytest_cache
