# Two entry points (see README): `make pretrain` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first, from this machine's package index: a CPU build where there is no GPU. DeepSpeed
# (an sdist that builds against the installed torch) comes after it, with the package.
TORCH ?= torch==2.13.0

.PHONY: setup pretrain test

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
	$(PY) jobs/pretrain.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)
