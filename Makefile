# Two commands do everything on a fresh machine:
#   make demo   set up, export the default model (SmolLM2-135M-Instruct) and chat with it
#   make test   set up and run the whole test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[export,serve,dev]'
	touch $(STAMP)

demo: $(STAMP)
	echo "What is the capital of France?" | $(VENV)/bin/llama2-onnx chat

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
