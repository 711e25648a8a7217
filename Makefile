# Two commands on a fresh machine:  `make demo`  (set up + run the embedded demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (test extra) for the PyTorch parity references.
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(PY) -m vlmprune demo

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) experiments/bench_selection.py

clean:
	rm -rf $(VENV) checkpoints/tiny-llava-1.5 .pytest_cache
