# volta: one command from nothing to green (`make test`) and to the demo (`make demo`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The CPU and CI machines carry these torch/torchvision builds on disk; pip takes them from there.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv lint typecheck test test-unit test-integration demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check volta orchestration tests bench
	$(VENV)/bin/ruff format --check volta orchestration tests bench

typecheck: venv
	$(VENV)/bin/mypy

# The whole CPU suite. Ray, moto and MLflow servers start inside a private network namespace with only
# loopback when we can make one (root + unshare), so nothing the tests start is reachable from the network.
test: lint typecheck
	scripts/in-private-netns.sh $(VENV)/bin/python -m pytest -n 2 --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/python -m pytest -m unit -n 2 $(PYTEST_ARGS)

demo: venv
	scripts/in-private-netns.sh scripts/demo.sh

bench: venv
	scripts/in-private-netns.sh $(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
