# fusionkern: two entry points on a fresh machine, `make demo` and `make test`.
#
# The virtual environment gets the CPU build of PyTorch (torch==2.13.0, about 200 MB) unless TORCH_SPEC says
# otherwise: a plain `torch` requirement would pull the multi-GB CUDA build onto machines that have no GPU.
# On a GPU machine: make TORCH_SPEC="torch" venv   (or install the CUDA build of your choice into .venv first).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= geo,kernels,export,scan,ray,bench,experiments,dev
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.fusionkern-installed
DEMO_OUT   ?= demo-out
# Tests run the Triton kernels on the CPU through Triton's interpreter; the flag must be set before import.
TEST_ENV   := TRITON_INTERPRET=1 TRITON_DEFAULT_FP_FUSION=1 OMP_NUM_THREADS=2

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fusionkern demo --out $(DEMO_OUT)

# The tests, then the benchmark suite in its quick mode: every case runs once on tiny shapes (no timing is checked).
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests
	$(TEST_ENV) $(PY) -m pytest -q benchmarks --benchmark-disable

bench: $(STAMP)
	$(VENV)/bin/fusionkern bench --device cpu --out bench-out

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
