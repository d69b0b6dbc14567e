# Two set-up commands on a fresh machine: `make demo` and `make test` (both create .venv when missing).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo_output

.PHONY: demo test lint clean

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .  # flux_qlora and the scripts importable, edits live
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# The whole flow on the CPU with the tiny Flux-shaped model and the generated image set.
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 bash scripts/demo.sh $(PY) $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
