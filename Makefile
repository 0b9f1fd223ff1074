# Two commands: `make demo` runs the main job on the embedded default, `make test` runs the tests.
# Each installs what it needs into .venv first (idempotent: re-runs only when pyproject changes).
# A machine with no torch gets the CPU build (torch==2.13.0); a python3 that already has torch
# (e.g. a CUDA build) is reused through --system-site-packages, so a GPU user keeps their own.

PYTHON ?= python3
VENV ?= .venv
CPU_TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.refl-engine-installed
DEMO_DIR ?= outputs/demo
DEMO_ARGS ?= --config demo --method draft --K full --output_dir $(DEMO_DIR) --overwrite_output_dir

.PHONY: install demo test bench clean

NATIVE_DIR := build/native
NATIVE_LIB := $(NATIVE_DIR)/librefl_native.so

install: $(STAMP) $(NATIVE_LIB)

$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "$(CPU_TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

# The native ops (csrc/, CMakeLists.txt) against the venv's torch, rebuilt when a source changes.
# Without cmake the build is skipped with a message, and refl_kernels uses torch's GroupNorm.
$(NATIVE_LIB): $(STAMP) CMakeLists.txt $(wildcard csrc/*)
	@if command -v cmake >/dev/null 2>&1; then \
	  cmake -S . -B $(NATIVE_DIR) --log-level=NOTICE -DPython_EXECUTABLE=$(abspath $(PY)) && \
	  cmake --build $(NATIVE_DIR) -j2 && touch $@; \
	else echo "cmake not found: native ops not built; refl_kernels uses torch's GroupNorm"; fi

# Train (DeepSpeed's launcher, one process), then the before/after grid and the proxy-vs-gold curves.
demo: install
	$(VENV)/bin/deepspeed --num_gpus 1 engine/train.py $(DEMO_ARGS)
	$(PY) -m refl_engine.toyworld.demo $(DEMO_DIR)

test: install
	$(VENV)/bin/pytest -q -n 2 tests

bench: install
	$(PY) benchmarks/kernel_speed.py
	$(PY) benchmarks/memory.py

clean:
	rm -rf $(VENV) outputs
