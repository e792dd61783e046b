# Every target installs into a local virtual environment first (.venv), torch pinned to the CPU wheel,
# every other package at the exact version of the lock (constraints.txt) that CI last passed with.
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
PY := .venv/bin/python

.PHONY: install demo test test-latest bench screenshot mutation
install: .venv/.installed
.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch .venv/.installed

demo: install
	bash train/demo.sh

# One torch thread (unless set): the tests' models are tiny and many tests run subprocesses beside the
# main process, so extra threads only compete for the cores; it also matches the subprocesses' numerics.
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --durations=15

# The newest releases pyproject.toml allows, without the lock, in their own venv (.venv-latest): drift in
# diffusers / transformers / PEFT / accelerate shows up as a named test failure here, not as a broken fresh
# install. torch stays at the CI pin (named on the same command line so the eager upgrade keeps it).
LATEST := .venv-latest/bin/python
test-latest:
	python3 -m venv .venv-latest
	$(LATEST) -m pip install -q --upgrade pip
	$(LATEST) -m pip install -q torch==2.13.0
	$(LATEST) -m pip install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e ".[test]"
	$(LATEST) -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|peft|accelerate|safetensors|huggingface.hub|tokenizers|gradio|pytest) '
	$(LATEST) -m pytest -q --durations=15; rc=$$?; \
	  echo "newer releases not installed (held back by a range in pyproject.toml or by a dependency):"; \
	  $(LATEST) -m pip list --outdated 2>/dev/null | grep -iE "^(diffusers|transformers|peft|accelerate|safetensors) " || echo "  none"; \
	  exit $$rc

bench: install
	$(PY) bench/step_time.py --model tiny-unet --device cpu --steps 30

screenshot: install
	$(PY) assets/make_screenshot.py

# Mutation testing (not part of CI; see BENCHMARKS.md "Mutation testing"): mutmut (pinned, the
# `mutation` extra) on the core modules against the fast test subset configured in pyproject.toml.
# MUTANTS picks the modules (mutmut name patterns); `make mutation MUTANTS='dashdiff.*'` runs all of them,
# e.g. MUTANTS='dashdiff.export*' (export.py against test_export.py) or
# MUTANTS='dashdiff.training.guard* dashdiff.training.run*' (the run lifecycle). MUTMUT_CHILDREN=1 on a shared
# machine. The mutants only a GPU kills are planted by hand there: python tests/scripts/plant_mutants.py
MUTANTS ?= dashdiff.dash.kernel* dashdiff.autolora.kernel* dashdiff.dash.selection* dashdiff.autolora.ranks*
MUTMUT_CHILDREN ?= 2
mutation: install
	$(PY) -m pip install -q -e ".[mutation]"
	.venv/bin/mutmut run --max-children $(MUTMUT_CHILDREN) $(foreach m,$(MUTANTS),"$(m)")
	.venv/bin/mutmut results
