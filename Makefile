# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.attndsl-installed
# A known-good CPU release; an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
TORCH  ?= torch==2.13.0
# A second environment with only Triton 3.6 (the GPU machines' version): the ahead-of-time
# compile check (codegen/aot_runner.py needs nothing but triton) runs there too. ~7 s to create.
VENV36  ?= .venv-triton36
PY36    := $(VENV36)/bin/python
STAMP36 := $(VENV36)/.attndsl-installed
TRITON36 ?= triton==3.6.0

.PHONY: setup test test-fast lint demo train bench-train bench-select clean triton36 aot aot36

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,hf]"
	touch $(STAMP)

$(STAMP36): Makefile
	test -x $(PY36) || $(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install --quiet --disable-pip-version-check "$(TRITON36)"
	touch $(STAMP36)

setup: $(STAMP)

triton36: $(STAMP36)

# every example's kernel compiled ahead of time for sm_80 and sm_90 (no GPU needed)
aot: $(STAMP)
	$(PY) -m attndsl.codegen.aot examples/*.attn

aot36: $(STAMP) $(STAMP36)
	$(PY) -m attndsl.codegen.aot --python $(PY36) examples/*.attn

lint: $(STAMP)
	$(PY) -m ruff check attndsl codegen grammar tests bench examples/train examples/hf

# the full suite (what CI runs): every test, every hypothesis example; tests/test_codegen_aot.py
# also compiles the kernels with Triton 3.6 from $(VENV36)
test: lint $(STAMP36)
	ATTNDSL_TEST_LANE=full $(PY) -m pytest

# the edit loop (~2 minutes on 2 cores): no tests marked `slow` (the ahead-of-time compiles, the
# Triton 3.6 check among them), a sixth of the property tests' examples (tests/conftest.py)
test-fast: lint
	ATTNDSL_TEST_LANE=fast $(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/attndsl run examples/longformer.attn --q-len 1024 --kv-len 1024 --heads 4 --head-dim 64

# a 2-layer LM trained with a sparse attndsl pattern and a learned bias table, against the same
# model with dense SDPA (examples/train/README.md; ~1.5 min on 2 cores)
train: $(STAMP)
	$(PY) examples/train/train.py

# forward+backward time against FlexAttention and SDPA (bench/bench_train.py; ~3 min on 2 cores)
bench-train: $(STAMP)
	$(PY) bench/bench_train.py

# data-dependent block selection against the Flex way and dense causal (bench/bench_select.py;
# ~2-3 min on 2 cores)
bench-select: $(STAMP)
	$(PY) bench/bench_select.py

clean:
	rm -rf $(VENV) $(VENV36) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
