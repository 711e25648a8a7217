# Two commands on a fresh machine:  `make demo`  (set up + run the embedded demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
CONSTRAINTS ?= constraints.txt

.PHONY: setup demo test test-fast lint bench lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (test extra) for the PyTorch parity references; every other version is the
	# one CI tested (constraints.txt).
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test,lmms-cpu]"
	# lmms-eval without its declared torchvision (PyPI's is a CUDA build that breaks the CPU torch): the lmms-cpu
	# extra above brings what its CLI imports.
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --no-deps lmms-eval
	touch $@

demo: setup
	$(PY) -m vlmprune demo

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) experiments/bench_selection.py

# Refresh constraints.txt: install the newest versions pyproject.toml allows into a scratch venv and freeze them.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e ".[test,lmms-cpu]"
	.venv-lock/bin/python -m pip install --quiet --no-deps "lmms-eval>=0.7,<0.8"
	{ head -n 3 $(CONSTRAINTS); .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^vlmprune'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .venv-lock

clean:
	rm -rf $(VENV) checkpoints/tiny-llava-1.5 .pytest_cache
