# Two commands do everything on a fresh machine:
#   make demo   set up, export the default model (SmolLM2-135M-Instruct) and chat with it
#   make test   set up and run the whole test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup browser

setup: $(STAMP) browser

# The browser test (tests/test_web_page.py) drives Debian's Chromium; never a downloaded browser.
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "note: could not install chromium (apt-get, as root); the browser test will skip"

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[export,serve,ray,dev]'
	touch $(STAMP)

demo: $(STAMP)
	echo "What is the capital of France?" | $(VENV)/bin/llama2-onnx chat

test: setup
	$(VENV)/bin/python -m pytest -q
