# lagg_pipeline -- `make help` lists the targets.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install install-dev run test test-fast test-slow sweep ui bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the package (quick when nothing changed)

install-dev: $(VENV)/.installed-dev ## install plus the test dependencies

run: install ## the main job on the embedded default dataset (ARGS="key=value ..." to override)
	$(PY) -m lagg_pipeline $(ARGS)

test: install-dev ## all tests: the fast set, then the slow end-to-end smoke tests
	$(PY) -m pytest
	$(PY) -m pytest -m slow

test-fast: install-dev ## the fast tests only
	$(PY) -m pytest

test-slow: install-dev ## the slow end-to-end smoke tests only
	$(PY) -m pytest -m slow

sweep: install ## a grid: fedavg and slowmo x H x local learning rate, one MLflow parent run
	$(PY) -m lagg_pipeline --multirun optimizer=fedavg,slowmo H=4,8,16 local_learning_rate=0.5,0.3,0.1 $(ARGS)

ui: install ## serve the MLflow UI for the local store on http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db \
		--default-artifact-root $(CURDIR)/outputs/mlartifacts --host 127.0.0.1 --port 5000

bench: install ## seconds per round and per outer step, measured in one run
	$(PY) -m lagg_pipeline.bench $(ARGS)

clean: ## remove outputs, caches and build files (keeps .venv)
	rm -rf outputs multirun build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
