# Two commands: `make serve` (set up and start the service on embedded defaults) and
# `make test` (set up and run the tests). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch is installed first, pinned, so the project's torch range is satisfied by this build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# `make serve PORT=8010` (HOST=0.0.0.0 serves other machines, with auth on: see README).
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-long lint bench clean

# pip shows what it fetches: the first install takes a few minutes and should not look stuck.
$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) (first run only; a few minutes)"
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "==> installing $(TORCH) (about 750 MB)"
	$(PIP) install --progress-bar on "$(TORCH)"
	@echo "==> installing distill and its dependencies"
	$(PIP) install --progress-bar on -e '.[dev]'
	touch $@
	@echo "==> $(VENV) is ready"

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/distill serve --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -rfEs -m "not long" $(PYTEST_ARGS)

# The long tests: distillation of the real all-MiniLM-L6-v2 (about 9 minutes on 2 cores).
test-long: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -rfEs -m long $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .distill .pytest_cache
