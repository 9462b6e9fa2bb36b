# `make demo` and `make test` work as the first command on a fresh clone: each creates .venv
# and installs the project into it when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build these figures and tests were made with. setup.cfg states floors only; set
# TORCH= to keep the torch you already have (e.g. a CUDA build on a GPU machine).
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= runs/demo

.PHONY: demo test bench clean

# One pip call for torch and the project: one resolution (76 s here, against 85 s in three).
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
# written on. WORKERS=0 runs it serially. Most commands a test starts are forked from a server
# of imported modules (tests/forkserver.py); AMPCOMPARE_TEST_FORK=0 starts each one afresh.
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

clean:
	rm -rf $(VENV) build *.egg-info
