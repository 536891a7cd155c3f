# volta: one command from nothing to green (`make test`) and to the demo (`make demo`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# The lock (requirements/, made by `make lock` from pyproject.toml) decides every installed version, not the
# registry's newest release; every file is checked against its sha256. torch.txt is PyPI's build of torch:
# pip installs it because pip reads this machine's local wheel store (pip.conf) where uv would download
# 3 GB. lock.txt (everything else) goes through the locked uv, 10x faster than pip. --no-deps: the lock is
# the whole closure, and `pip check` proves it is consistent. A lock change rebuilds the venv from scratch
# (--clear), so nothing the lock dropped stays behind. --compile-bytecode: uv (unlike pip) writes no .pyc files,
# and where PYTHONDONTWRITEBYTECODE is set (these machines) no process ever does, so every Ray actor, DataLoader
# worker and CLI process compiled ray/deepspeed/transformers from source again (~2 s of CPU each; docs/benchmarks.md).
LOCK := requirements/lock.txt
TORCH_LOCK := requirements/torch.txt
HASHED := --no-deps --require-hashes --only-binary=:all:
UV := $(VENV)/bin/uv pip install -q --python $(PY)
PYTEST_ARGS ?=

.PHONY: venv lock lock-check lint typecheck test test-unit test-integration demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) $(TORCH_LOCK)
	@$(PYTHON) scripts/lock.py check
	$(PYTHON) -m venv --clear $(VENV)
	$(PYTHON) scripts/lock.py entry uv > $(VENV)/uv.txt
	$(PIP) install -q $(HASHED) -r $(VENV)/uv.txt
	$(PIP) install -q $(HASHED) -r $(TORCH_LOCK)
	$(UV) $(HASHED) --compile-bytecode --no-binary=deepspeed -r $(LOCK)
	$(UV) --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $(STAMP)

# Re-resolve requirements/*.txt from pyproject.toml. Locked versions stay unless pyproject.toml moves them;
# `make lock UPGRADE=optuna,ray` moves those packages to their newest release, `UPGRADE=all` every package.
UPGRADE ?=
lock:
	$(PYTHON) scripts/lock.py compile --upgrade "$(UPGRADE)"

# One line and a non-zero exit when pyproject.toml and the lock disagree (standard library only: no venv needed).
lock-check:
	@$(PYTHON) scripts/lock.py check

lint: venv
	$(VENV)/bin/ruff check volta orchestration tests bench scripts
	$(VENV)/bin/ruff format --check volta orchestration tests bench scripts

typecheck: venv
	$(VENV)/bin/mypy

# The whole CPU suite. Ray, moto and MLflow servers start inside a private network namespace with only
# loopback when we can make one (root + unshare), so nothing the tests start is reachable from the network.
test: lock-check lint typecheck
	scripts/in-private-netns.sh $(VENV)/bin/python -m pytest -n 2 --dist loadgroup --durations=15 $(PYTEST_ARGS)

test-unit: venv
	$(VENV)/bin/python -m pytest -m unit -n 2 $(PYTEST_ARGS)

# `make demo DEMO_STEPS=20` trains 20 steps instead of the recipe's (a quick look); VOLTA_VERBOSE=1 shows all output.
DEMO_STEPS ?=
demo: venv
	VOLTA_DEMO_STEPS=$(DEMO_STEPS) scripts/in-private-netns.sh scripts/demo.sh

bench: venv
	scripts/in-private-netns.sh $(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
