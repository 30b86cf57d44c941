# Two entry points (see README): `make run` (main job) and `make test` (the test suite);
# `make gpu` (and `make gpu-profile`, `make gpu-sweep`) on a GPU machine.
# run and test create .venv and install the package with its dev extra on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install run test gpu gpu-profile gpu-sweep
install: $(VENV)/.installed

# The report of a run goes to out/report (ignored by git): the committed reports in
# benchmarks/results are written on purpose, with --out benchmarks/results.
run: $(VENV)/.installed
	$(PY) -m benchmarks --out out/report

# Triton kernels run on the CPU through Triton's interpreter; the same run also checks the
# PyTorch reference path and compiles every launched kernel for sm_80/sm_90. Three passes:
# every other test on two processes (pytest-xdist, one test file per process at a time);
# the same tests without the interpreter, where CPU tensors take the CPU path (what a CPU
# user runs: torchvision's kernels from a thread pool, PyTorch operations); then the
# compile check, which also compiles what the first pass launched (tests/conftest.py).
LAUNCHES_DIR := $(shell mktemp -u /tmp/kernel-launches.XXXXXX)
test: $(VENV)/.installed
	rm -rf $(LAUNCHES_DIR) && mkdir -p $(LAUNCHES_DIR)
	KERNEL_LAUNCHES_DIR=$(LAUNCHES_DIR) TRITON_INTERPRET=1 $(PY) -m pytest tests -q -rs \
		-m "not compile_check" -n 2 --dist loadfile
	$(PY) -m pytest tests -q -m "not compile_check" -n 2 --dist loadfile
	KERNEL_LAUNCHES_DIR=$(LAUNCHES_DIR) TRITON_INTERPRET=1 $(PY) -m pytest tests -q -rs \
		-m compile_check
	rm -rf $(LAUNCHES_DIR)

# On a GPU machine, with that machine's own python3 and packages (no venv, nothing
# installed): the GPU kit. `make gpu GPU_ARGS=--dry-run` rehearses it on a CPU. gpu runs the
# full plan (540 s); gpu-profile (300 s: environment, smoke, profiled benchmarks, ncu) and
# gpu-sweep (240 s: environment, tuning sweep) are shorter calls for the device time left
# after it (docs/gpu.md: which fits where).
gpu:
	PYTHONPATH=. $(PYTHON) -m benchmarks.gpu $(GPU_ARGS)

gpu-profile:
	PYTHONPATH=. $(PYTHON) -m benchmarks.gpu --plan profile $(GPU_ARGS)

gpu-sweep:
	PYTHONPATH=. $(PYTHON) -m benchmarks.gpu --plan sweep $(GPU_ARGS)
