#!/usr/bin/env bash
# Speculative decoding on the default model, one request at a time, per
# configuration: tokens/s and drafts proposed/accepted (from /metrics).
#   CONFIGS="off ngram4 draft4:3 draft8:3" bash benchmarks/run_speculative.sh
# "off": no speculation; "ngramK": n-gram lookup, K drafts; "draftN:K": the
# first N layers of the model as --speculative-model (benchmarks/make_layer_draft.py), K drafts.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/spec}
CONFIGS=${CONFIGS:-"off ngram4 draft4:3 draft8:3"}
PORT=8101
mkdir -p "$OUT"
DRAFTS=$(mktemp -d /tmp/tokenstep-drafts.XXXXXX)
trap 'rm -rf "$DRAFTS"' EXIT

spec_args() {
  case "$1" in
    off) ;;
    ngram*) echo "--num-speculative-tokens ${1#ngram}" ;;
    draft*) local spec=${1#draft}
            local layers=${spec%%:*}
            [ -d "$DRAFTS/$layers" ] || .venv/bin/python benchmarks/make_layer_draft.py "$DRAFTS/$layers" --layers "$layers" >/dev/null
            echo "--speculative-model $DRAFTS/$layers --num-speculative-tokens ${spec##*:}" ;;
  esac
}
counter() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v name="$1" '$1 == name {print int($2)}'; }

for config in $CONFIGS; do
  name=${config/:/-k}   # file names without ':'
  if curl -s "http://127.0.0.1:$PORT/" > /dev/null; then echo "port $PORT is busy: stop what is there first" >&2; exit 1; fi
  args=$(spec_args "$config")
  # shellcheck disable=SC2086
  .venv/bin/tokenstep serve --host 127.0.0.1 --port $PORT --log-level warning $args > "$OUT/$name.server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
  kill -0 "$pid" || { echo "$config ($args) did not start: see $OUT/$name.server.log" >&2; exit 1; }
  BENCH=".venv/bin/tokenstep bench --base-url http://127.0.0.1:$PORT --max-concurrency 1 --seed 0 --no-progress"
  $BENCH --num-prompts 2 --output-len 8 > /dev/null   # warm-up
  for workload in repeat stories random; do
    drafts0=$(counter tokenstep_spec_decode_num_draft_tokens_total); accepted0=$(counter tokenstep_spec_decode_num_accepted_tokens_total)
    case "$workload" in
      random) $BENCH --label "$config $workload" --num-prompts 8 --input-len 128 --output-len 128 --ignore-eos --result-json "$OUT/$name-$workload.json" | grep -E "Output token throughput|Median TPOT" ;;
      *) $BENCH --label "$config $workload" --endpoint chat --dataset "benchmarks/datasets/$workload.jsonl" --num-prompts 8 --result-json "$OUT/$name-$workload.json" | grep -E "Output token throughput|Median TPOT" ;;
    esac
    echo "$config $workload: drafts $(( $(counter tokenstep_spec_decode_num_draft_tokens_total) - drafts0 )) accepted $(( $(counter tokenstep_spec_decode_num_accepted_tokens_total) - accepted0 ))"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
  while curl -s "http://127.0.0.1:$PORT/" > /dev/null; do sleep 1; done
done
