# Two commands for a fresh machine: `make demo` (the main job on a synthetic dataset with the shipped model)
# and `make test`. Both create .venv and install what they need; torch is pinned to the CPU wheel here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_BIDS ?= demo/bids
DEMO_OUT ?= demo/out

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml version
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,group]"
	touch $@

demo: install
	rm -rf $(DEMO_BIDS) $(DEMO_OUT)
	$(VENV)/bin/bids_fcd synth $(DEMO_BIDS) --n 4 --seed 7
	$(PY) run.py $(DEMO_BIDS) $(DEMO_OUT) participant --n_cpus 2
	@echo "Reports: $$(ls $(DEMO_OUT)/*.html)"

test: install
	$(VENV)/bin/ruff check bids_fcd tests benchmarks tools run.py
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo
