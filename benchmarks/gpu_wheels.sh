#!/usr/bin/env bash
# make gpu-wheels: what `make gpu-check` needs on a CUDA machine with no
# network, beyond the PyTorch, Triton and transformers such a machine has:
# tokenstep's other dependencies and the OpenAI SDK as wheels for CPython
# 3.12 on x86-64 (the versions this venv holds), and the default model's
# tokenizer, all in .whl/ (git-ignored; about 30 MB). benchmarks/gpu_check.py
# installs the wheels into a scratch folder there when fastapi is missing.
#
# Usage: bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
PYTHON_VERSION=${1:-3.12}
# The second line: the transformers tokenstep is tested with (a CUDA image's may be older:
# Falcon takes a registered attention function only from 5.25) and what it needs anew.
PACKAGES="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types
  annotated-doc typing-extensions uvicorn sse-starlette llguidance gguf platformdirs openai jiter distro sniffio opentelemetry-api
  transformers huggingface-hub tokenizers kernels tomlkit httpx2 httpcore2 truststore"
rm -rf .whl && mkdir -p .whl
pins=()
for package in $PACKAGES; do
  version=$("$PY" -m pip show "$package" | sed -n 's/^Version: //p')
  pins+=("$package==$version")
done
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${platforms[@]}" -d .whl "${pins[@]}" \
  2> >(grep -v "is ignored: it is neither" >&2)
"$PY" - <<'PY'
from transformers import AutoTokenizer
from model_runtime.loading.default_model import default_model_dir
AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(".whl/tokenizer")
PY
du -sh .whl
