# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

# Test processes at once (pytest-xdist): on 2 cores a third keeps both busy while the others
# wait on their services.
TEST_WORKERS ?= 3

.PHONY: setup system-deps lint stubs test bench demo clean

# Three distributions: the Python client (clients/python), the services and the web console
# (clients/web), which depend on it.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml clients/web/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e ./clients/python -e ./clients/web -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json clients/node/package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed node_modules/.installed

system-deps:
	scripts/install_system_deps.sh

stubs: setup
	$(PY) scripts/gen_protos.py

# buf breaking: the protos may only grow (checked against the previous commit, if there is one).
lint: setup
	npx buf lint
	if git rev-parse -q --verify HEAD~1 >/dev/null; then npx buf breaking --against '.git#ref=HEAD~1'; fi
	$(PY) scripts/gen_protos.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Line coverage of every process the tests start (pyproject.toml [tool.coverage]), printed at
# the end; below fail_under, the run fails.
test: system-deps lint
	$(PY) -m coverage erase
	$(PY) -m coverage run -m pytest -q -ra -n $(TEST_WORKERS)
	$(PY) -m coverage combine -q
	$(PY) -m coverage report

bench: setup system-deps
	$(PY) -m pip install -qq -e ./clients/python -e ./clients/web -e '.[dev,bench]'
	$(PY) -m bench
	$(PY) -m bench engine

# Both services on SQLite, a workflow with a live progress bar, the engine killed mid-run and
# the run resumed; everything it starts is stopped again, all it writes is in ./data/demo.
demo: $(VENV)/.installed
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) node_modules data
