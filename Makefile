# Two entry points (see README): `make pretrain` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, from this machine's package index: a CPU build where there is no GPU. DeepSpeed
# (an sdist that builds against the installed torch) comes after it, with the package.
TORCH ?= torch==2.13.0
# DeepSpeed compiles a CPU op on first use into this cache. One per checkout: a build killed
# mid-way leaves a lock file that makes every later build (and so every training worker) wait
# forever, and checkouts with different venvs would otherwise keep rebuilding it for each other.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup pretrain test

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	@# DeepSpeed's CPU communication op, built now rather than by the first training run (~1 min).
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

pretrain: $(STAMP)
	$(PY) jobs/pretrain.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)
