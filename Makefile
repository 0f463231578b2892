# Two commands do all the set-up on a fresh machine:
#   make quickstart   builds .venv, then runs the main job on the built-in simulated shop
#   make test         builds .venv, then lints (ruff) and runs the tests
# The same commit installs the same versions: every package but torch comes from requirements.lock, pinned
# and checked against its hashes. `make lock` refreshes the lock (README, "Locked dependencies").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
TORCH_VERSION := 2.13.0
# where `make lock` finds the torch CPU wheel whose dependencies it locks (a folder or a find-links URL)
TORCH_WHEELS ?= /opt/wheels

.PHONY: venv quickstart lint test test-slow lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build, and the CPU build installed
	# from local disk has another hash than PyPI's, so it is the one package the lock leaves out.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	# everything else at the locked versions and hashes, torch's own dependencies included (moved to their pins)
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	# the project itself, adding nothing the lock did not
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/purchase-intent quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check purchase_intent tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check purchase_intent tests benchmarks
	$(PY) -m pytest -q

# the tests marked slow, which the default run leaves out (exit 5, "no test collected", is not a failure)
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout 900 || [ $$? -eq 5 ]

# refresh requirements.lock after a change of dependencies in pyproject.toml (needs PyPI): keeps the locked
# versions that still fit; `make lock UPGRADE=1` moves every package to its newest fitting release
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'uv>=0.5,<1'
	echo 'torch==$(TORCH_VERSION)+cpu' > $(VENV)/torch-constraint.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra all --generate-hashes --python-version 3.11 \
	    --no-emit-package torch --find-links $(TORCH_WHEELS) --constraint $(VENV)/torch-constraint.txt \
	    --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) -o $(LOCK)

clean:
	rm -rf $(VENV) pi-workspace
