# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attndsl-installed
# A known-good CPU release; an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
TORCH  ?= torch==2.13.0

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check attndsl codegen grammar tests bench

test: lint
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/attndsl run examples/longformer.attn --q-len 1024 --kv-len 1024 --heads 4 --head-dim 64

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
