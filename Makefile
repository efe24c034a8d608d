# ciliary — make targets. Every target that runs code first makes sure the machine is set up.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ciliary-installed
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: setup demo test test-unit test-integration test-e2e lint bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup:
	bash scripts/setup.sh

demo: $(STAMP)
	bash scripts/demo.sh "$(DEMO_DIR)"

test: $(STAMP)
	$(PY) -m pytest tests/unit tests/integration tests/e2e -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration -q

test-e2e: $(STAMP)
	$(PY) -m pytest tests/e2e -q

lint: $(STAMP)
	$(VENV)/bin/ruff check ciliary services tests bench
	$(VENV)/bin/lint-imports

# Every benchmark script; bench/sandbox.py and bench/kubeproxy_rules.py are libraries they share.
BENCHES := $(filter-out bench/sandbox.py bench/kubeproxy_rules.py,$(wildcard bench/*.py))

bench: $(STAMP)
	@for b in $(BENCHES); do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .demo .pytest_cache
