# Two entry points (see README): `make pretrain` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, from this machine's package index: a CPU build where there is no GPU. DeepSpeed
# (an sdist that builds against the installed torch) comes after it, with the package's extras.
TORCH ?= torch==2.13.0

.PHONY: setup pretrain test test-unit lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	@# DeepSpeed's CPU communication op, built now rather than by the first training run (~1 min),
	@# into .venv/torch_extensions, where every run finds it (biglearn/train/engine.py).
	$(PY) -c "from biglearn.train.engine import build_deepspeed_ops; build_deepspeed_ops()"
	touch $(STAMP)

pretrain: $(STAMP)
	$(VENV)/bin/biglearn pretrain $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# The fast tier: everything that does not start a Ray cluster.
test-unit: $(STAMP)
	$(PY) -m pytest -m "not ray" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright
