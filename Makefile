# Quick start:  make demo   (the main job on the built-in default: synthetic data, tiny model)
#               make test   (the test suite)
# Both create .venv and install the package on first use.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test test-fast demo bench bench-smoke clean

install: $(STAMP)

# A torch that is already installed (a CUDA build on a GPU box, say) is kept: the venv then sees the base
# interpreter's packages. Otherwise the pinned torch is installed first, so that nothing pulls an
# unpinned torch (gigabytes of CUDA wheels on a CPU machine).
$(STAMP): setup.py
	@if [ ! -x "$(PY)" ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "using the torch already installed for $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

test: $(STAMP)
	$(RUN_ENV) TRITON_INTERPRET=1 $(PY) -m pytest -q

# The demo starts over on every call (overwrite=true replaces runs/synthetic-demo); DEMO_ARGS adds --set options.
demo: $(STAMP)
	$(RUN_ENV) $(PY) recipes/train_coconut.py --config recipes/configs/synthetic_demo.yaml --set overwrite=true $(DEMO_ARGS)

bench-smoke: $(STAMP)
	$(RUN_ENV) TRITON_INTERPRET=1 $(PY) -m pytest benchmarks -q -m benchmark --benchmark-disable

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
