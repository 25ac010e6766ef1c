# mohico: two commands on a fresh machine -> `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
# pip prints one harmless "Location ... is ignored" line per package on this machine.
QUIET_PIP := 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: venv demo test test-fast bench gpu-check gpu-proof clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[mohico] installing into $(VENV) (first time: ~2 min, ~6.5 GB)"
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ -n "$$free" ] && [ "$$free" -lt 8 ]; then \
	    echo "[mohico] warning: only $$free GB free on this disk; the install needs ~8 GB while it unpacks (free some space first if it fails with 'No space left on device')"; fi
	@set -o pipefail; $(PIP) install -q -c constraints.txt -e '.[dev]' $(QUIET_PIP)
	@$(PY) -c "import torch, deepspeed, nvidia.dali, webdataset, wandb, cv2, av, omegaconf" \
	  || { echo "[mohico] install is incomplete: see the pip output above"; exit 1; }
	@touch $(STAMP)

demo: venv
	@DEMO_DIR=$(DEMO_DIR) PATH=$(VENV)/bin:$$PATH bash scripts/demo.sh

test: venv
	@PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -q --durations=15 tests

test-fast: venv
	@PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow" tests

bench: venv
	@PATH=$(VENV)/bin:$$PATH bash benchmarks/run_all.sh

# On a CUDA machine: every GPU path in one command, one table (without a GPU it says so, exit 0).
gpu-check: venv
	@PATH=$(VENV)/bin:$$PATH PY=$(PY) bash benchmarks/gpu_check.sh

# On a CUDA machine: the production step (R(2+1)D-18, bf16, MCL + HiCo, DALI mixed) vs a bare loop, memory,
# decode, kernels; each stage's JSON in $(GPU_PROOF_OUT) as it ends, one table (~6 min on one H100/H200;
# without a GPU: toy sizes on the CPU, exit 0).
GPU_PROOF_OUT ?= /tmp/mohico-gpu-proof
gpu-proof: venv
	@PATH=$(VENV)/bin:$$PATH PY=$(PY) bash benchmarks/gpu_proof.sh --out $(GPU_PROOF_OUT)

clean:
	rm -rf $(DEMO_DIR) runs .pytest_cache
