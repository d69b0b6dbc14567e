# Two set-up commands on a fresh machine: `make demo` and `make test` (both create .venv when missing).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_output
# make demo FAMILY=flux2-klein (or flux2-dev): the same flow on that family's tiny model
FAMILY ?= flux1

.PHONY: demo test test-gpu test-gpu-quick lint clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .  # flux_qlora and the scripts importable, edits live
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	# --maxschedchunk 1: tests handed out two at a time, so the slow ones (collected first) spread over the workers
	$(PY) -m pytest -q -n 2 --maxschedchunk 1  # both cores (the measured times: docs/tests.md)

# The whole suite on a machine with an NVIDIA GPU, where every end-to-end test runs through the CUDA path (a GPU
# changes defaults: attention backend, dtype). GPU_PY: a Python with CUDA torch and these requirements (default:
# the venv's; on the device machine: GPU_PY=python3 with PYTHONPATH=$$PWD:$$PWD/.gpu-site).
GPU_PY ?= $(PY)
GPU_WORKERS ?= 8
test-gpu:
	HF_HUB_OFFLINE=1 $(GPU_PY) -m pytest -n $(GPU_WORKERS) --maxschedchunk 1 -p no:cacheprovider -rs tests/

# Only the tests whose behaviour depends on CUDA (marked `gpu`: compile, CUDA graphs, fp16, FP8, attention backends,
# out of memory, the device's defaults), for a change to GPU-path code; the same GPU_PY as test-gpu.
test-gpu-quick:
	HF_HUB_OFFLINE=1 $(GPU_PY) -m pytest -n $(GPU_WORKERS) --maxschedchunk 1 -p no:cacheprovider -rs -m gpu tests/

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# The whole flow on the CPU with the tiny Flux-shaped model and the generated image set.
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 bash scripts/demo.sh $(PY) $(DEMO) $(FAMILY)

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
