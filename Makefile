# Two commands do everything on a fresh machine:
#   make demo   set up, export the default model (SmolLM2-135M-Instruct) and chat with it
#   make test   set up and run the whole test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# the demo needs the runtime and the exporter (its first run exports the default model) and nothing more
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test setup browser llama-cpp app

setup: $(STAMP) browser

# The browser test (tests/test_web_page.py) drives Debian's Chromium; never a downloaded browser.
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "note: could not install chromium (apt-get, as root); the browser test will skip"

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[export,serve,ray,dev]'
	touch $(STAMP)

$(DEMO_STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[export]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	echo "What is the capital of France?" | $(VENV)/bin/llama2-onnx chat

test: setup
	$(VENV)/bin/python -m pytest -q

# The desktop app: the runtime, the server and the chat page frozen by PyInstaller into dist/llama2-onnx/
# (one folder, no Python needed to run it), built from its own runtime-only venv (build/app-venv: never torch).
app:
	$(PYTHON) packaging/build_app.py

# llama.cpp as a bench peer (`llama2-onnx bench --peers llama.cpp`), built from llama-cpp-python's PyPI
# source package for this CPU only (no GPU backends); takes minutes on 2 cores. `make test` does not need it.
# The instruction sets are this CPU's (from /proc/cpuinfo) but never AMX: with -march=native ggml's AMX
# path dies of SIGILL (tilezero) in the first prompt pass on this KVM guest.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
CPU_FLAGS = $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
GGML_ISA = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  $(if $(filter avx512f,$(CPU_FLAGS)),-DGGML_AVX512=ON) $(if $(filter avx512_vnni,$(CPU_FLAGS)),-DGGML_AVX512_VNNI=ON) \
  $(if $(filter avx512_bf16,$(CPU_FLAGS)),-DGGML_AVX512_BF16=ON) $(if $(filter avx512vbmi,$(CPU_FLAGS)),-DGGML_AVX512_VBMI=ON) \
  $(if $(filter avx_vnni,$(CPU_FLAGS)),-DGGML_AVX_VNNI=ON)
llama-cpp: $(STAMP)
	CMAKE_ARGS="$(GGML_ISA) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) sh -c '$(VENV)/bin/python -m pip uninstall --quiet -y llama-cpp-python; \
	  $(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-binary llama-cpp-python "$(LLAMA_CPP_PYTHON)"'
