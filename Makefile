# Every target installs into a local virtual environment first (.venv), torch pinned to the CPU wheel.
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
PY := .venv/bin/python

.PHONY: install demo test bench screenshot mutation
install: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch .venv/.installed

demo: install
	bash train/demo.sh

test: install
	$(PY) -m pytest -q --durations=15

bench: install
	$(PY) bench/step_time.py --model tiny-unet --device cpu --steps 30

screenshot: install
	$(PY) assets/make_screenshot.py

# Mutation testing (not part of CI; see BENCHMARKS.md "Mutation testing"): mutmut (pinned, the
# `mutation` extra) on the core modules against the fast test subset configured in pyproject.toml.
# MUTANTS picks the modules (mutmut name patterns); `make mutation MUTANTS='dashdiff.*'` runs all five.
MUTANTS ?= dashdiff.functional* dashdiff.launch* dashdiff.ranks*
mutation: install
	$(PY) -m pip install -q -e ".[mutation]"
	.venv/bin/mutmut run --max-children 2 $(foreach m,$(MUTANTS),"$(m)")
	.venv/bin/mutmut results
