# `make demo` and `make test` work as the first command on a fresh clone: each creates .venv
# and installs the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build these figures and tests were made with. setup.cfg states floors only; set
# TORCH= to keep the torch you already have (e.g. a CUDA build on a GPU machine).
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: demo test test-image bench clean

# One pip call for torch and the project: one resolution, faster than three (docs/benchmark.md).
$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[test]"
	touch $@

# The main job in short: every implementation at 32-true and the device's mixed precision, and
# the plain loop once more as the control, on synthetic data, into one folder with report.md
# and benchmark.png. Three repeats, so that a verdict rests on the noise between processes as
# the calibration measured it (docs/benchmark.md, "How sure is a verdict"); 1,024 images at
# batch 128, so that 36 fresh processes fit in five minutes; lr 1e-3, so that 3 epochs learn.
demo: $(BIN)/.installed
	$(BIN)/ampcompare compare --dataset synthetic --model small --synthetic-size 1024 \
		--batch-size 128 --epochs 3 --lr 1e-3 --repeats 3 --out-dir $(DEMO_DIR)

# The python-only wheel of apex 25.04, where this checkout has it beside it (../shared/wheels):
# make test installs it, so that the suite runs real apex's import and its exit-2 line without
# CUDA. Nothing needs it; without it the suite checks the "apex is not installed" line instead.
APEX_WHEEL ?= $(wildcard ../shared/wheels/apex-25.04/apex-0.1-py3-none-any.whl)

$(BIN)/.apex: $(BIN)/.installed
	$(if $(APEX_WHEEL),$(BIN)/python -m pip install --quiet --no-deps $(APEX_WHEEL))
	touch $@

# Two pytest workers, one thread each (tests/conftest.py), on the 2-core machines the suite was
# written on. WORKERS=0 runs it serially.
WORKERS ?= 2

# The linter and the formatter first (ruff.toml): a second or two, before minutes of tests.
test: $(BIN)/.apex
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist worksteal)

# What each framework costs per step, measured side by side in each of three fresh processes and
# pooled over them (ampcompare/bench.py).
bench: $(BIN)/.installed
	$(BIN)/ampcompare bench

# The suite on the lent GPU machine's stack (docs/devices.md: Python 3.12, torch 2.11.0,
# torchvision 0.26.0, pytorch-lightning 2.6.6, accelerate 1.15.0), with every other requirement
# at the floor setup.cfg states, so that the floors are tested too; the apex wheel beside it.
# CPU only; pip downloads a few GB the first time (torch's CUDA libraries come with it), so
# CI does not run it. IMAGE_PYTHON names a Python 3.12 (pyenv's, where there is one).
IMAGE_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
IMAGE_VENV ?= .venv-image
IMAGE_PINS ?= torch==2.11.0 torchvision==0.26.0 pytorch-lightning==2.6.6 accelerate==1.15.0 \
	numpy==1.26.4 click==8.4.0 rich==13.0.0 matplotlib==3.8.0 \
	pytest==8.0.0 pytest-xdist==3.5.0 ruff==0.17.6 timm==1.0.8

$(IMAGE_VENV)/bin/.installed: setup.cfg pyproject.toml
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install --quiet $(IMAGE_PINS) -e ".[test]"
	$(if $(APEX_WHEEL),$(IMAGE_VENV)/bin/python -m pip install --quiet --no-deps $(APEX_WHEEL))
	touch $@

test-image: $(IMAGE_VENV)/bin/.installed
	$(IMAGE_VENV)/bin/python -m pytest -q $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist worksteal)

clean:
	rm -rf $(VENV) $(IMAGE_VENV) build *.egg-info
