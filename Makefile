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
# The GPU machine runs triton 3.6: CI also compiles every kernel for sm_90 with it, from a folder of its own.
TRITON36   ?= .triton36
# Wheels for the GPU machine (Python 3.12, no package index) of what its image lacks: rasterio for the scan phase,
# onnxscript for the ONNX export. rasterio below 1.5: 1.5 needs numpy 2, 1.4 runs on numpy 1.24 and later too.
WHEELS     ?= .whl
GPU_PYVER  ?= 3.12
GPU_NEEDS  ?= "rasterio>=1.3,<1.5" "onnxscript>=0.7"
# Already in the GPU image (removed after the download; the check also skips any wheel whose project it finds).
GPU_HAS    ?= numpy onnx protobuf sympy mpmath typing_extensions packaging pyparsing pillow

.PHONY: venv demo test test-fast test-triton36 bench gpu-wheels clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fusionkern demo --out $(DEMO_OUT)

# The tests, then the benchmark suite in its quick mode: every case runs once on tiny shapes (no timing is checked),
# the GPU check's dry run (setup, imports, phase plan, budget) and the sm_90 compile with triton 3.6.
test: $(STAMP)
	FUSIONKERN_TRITON36= $(TEST_ENV) $(PY) -m pytest -q tests
	$(TEST_ENV) $(PY) -m pytest -q benchmarks --benchmark-disable
	PYTHON=$(PY) benchmarks/gpu_check.sh --dry-run
	@$(MAKE) --no-print-directory test-triton36

# sm_90 compilation of every kernel with triton 3.6 (torch and numpy from the venv, triton from $(TRITON36)/), then
# the static gate (spills, occupancy, tensor cores) with it; skipped with one line where the wheel cannot be had.
# (`make test` turns the gate's triton 3.6 runs off above, since they run here.)
test-triton36: $(STAMP)
	@if [ ! -f $(TRITON36)/.installed ]; then \
	    rm -rf $(TRITON36); \
	    if $(PY) -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 30 --no-deps \
	        --target $(TRITON36) "triton==3.6.0"; then touch $(TRITON36)/.installed; fi; \
	fi; \
	if [ ! -f $(TRITON36)/.installed ]; then \
	    echo "test-triton36: SKIPPED: the triton==3.6.0 wheel could not be installed for $$($(PY) --version)"; \
	else \
	    PYTHONPATH=$(TRITON36) $(PY) -c 'import triton, sys; sys.exit(triton.__version__ != "3.6.0")' || \
	        { echo "test-triton36: $(TRITON36)/ does not hold triton 3.6.0"; exit 1; }; \
	    PYTHONPATH=$(TRITON36) $(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider \
	        tests/test_kernels_conv.py tests/test_kernels_block.py -k "sm90 or compile_spec" && \
	    FUSIONKERN_TRITON36=$(abspath $(TRITON36)) $(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider \
	        tests/test_kernels_static.py -k triton36; \
	fi

# Wheels for benchmarks/gpu_check.sh on the GPU machine (manylinux x86-64, CPython $(GPU_PYVER)), under 60 MiB.
gpu-wheels: $(STAMP)
	rm -rf $(WHEELS)
	$(PY) -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version $(GPU_PYVER) \
	    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux_2_28_x86_64 -d $(WHEELS) $(GPU_NEEDS)
	cd $(WHEELS) && for name in $(GPU_HAS); do rm -f $$name-[0-9]*.whl; done
	@ls $(WHEELS)
	@du -sm $(WHEELS) | awk '{ if ($$1 >= 60) { print "gpu-wheels: " $$1 " MiB, over the 60 MiB limit"; exit 1 } \
	    else print "gpu-wheels: " $$1 " MiB in $(WHEELS)/" }'

bench: $(STAMP)
	$(VENV)/bin/fusionkern bench --device cpu --out bench-out

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info $(TRITON36) .gpu-check
