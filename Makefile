# Two commands do all the set-up on a fresh machine (README.md): `make train` and `make test`.
# Both create .venv on first use: torch 2.13.0 (the CPU build) unless an NVIDIA GPU is present, then this project.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be set before Python starts.
TEST_ENV := $(if $(HAS_GPU),,TRITON_INTERPRET=1)

.PHONY: train test lint
# Training uses every core (torch threads); PASSIVE lets a waiting OpenMP thread sleep instead of spinning, so that a
# core taken by another process does not stall the others (5-10x slower steps on a busy 2-core machine without it).
train: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m crate_kernels.train --task.compare vit_demo

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadgroup -m "not slow and not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(if $(HAS_GPU),,torch==2.13.0)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,train]'
	touch $@
