# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtual environment on first use. VENV may point outside the clone (CI reuses one).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cirlab-installed
# torch/torchvision are pinned to the builds that lie on this machine's disk (see README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu venv bench clean

venv: $(STAMP)

# A new venv takes ~6 GB (torch's CUDA build) and pip unpacks its wheels beside it (8.3 GB at the peak
# of a fresh clone's `make test`): check the disk first, so a full one gets one line, not pip's OSError.
VENV_NEED_GB ?= 9

$(STAMP): pyproject.toml
	@test -x $(PY) || { mkdir -p $(VENV) && \
	  free=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}') && \
	  if [ "$$free" -lt $(VENV_NEED_GB) ]; then \
	    rmdir $(VENV) 2>/dev/null; \
	    echo "error: a new venv at $(VENV) needs about $(VENV_NEED_GB) GB of free disk (torch's build alone is ~6 GB);" \
	      "its disk has $$free GB. Free some space, or put the venv on a disk with room: make VENV=/path/venv ..." >&2; \
	    exit 1; \
	  fi && python3 -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	@# setuptools' notice for every editable install of a mapped layout asks nothing of the user: not shown
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[dev]'
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
