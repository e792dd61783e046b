# Every target installs into a local virtual environment first (.venv), torch pinned to the CPU wheel.
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
PY := .venv/bin/python

.PHONY: install demo test bench screenshot
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
