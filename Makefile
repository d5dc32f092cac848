# The front door. `make demo` runs the service; `make test` installs what the tests need and runs them.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint bench loadtest clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/spatialbench demo

test: venv
	bash scripts/test.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: venv
	$(PY) scripts/bench.py && $(PY) scripts/bench_split.py

# The README's screenshots, from the demo that `make demo` is running in another terminal.
.PHONY: screenshots
screenshots: venv
	$(PY) scripts/screenshots.py

# The read paths at 200 req/s while an evaluation runs (starts and stops its own service).
loadtest: venv
	$(PY) scripts/loadtest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
