# Two commands do all the set-up on a fresh machine:
#   make quickstart   builds .venv, then runs the main job on the built-in simulated shop
#   make test         builds .venv, then lints (ruff) and runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv quickstart lint test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/purchase-intent quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check purchase_intent tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check purchase_intent tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) pi-workspace
