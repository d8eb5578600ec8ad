# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtual environment on first use. VENV may point outside the clone (CI reuses one).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cirlab-installed
# torch/torchvision are pinned to the builds that lie on this machine's disk (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cirlab demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The GPU paths (bf16-mixed, ViT-B/32 steps, deepspeed): on a CUDA machine; skipped elsewhere.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -rs tests/test_gpu.py

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs demo_out .pytest_cache
