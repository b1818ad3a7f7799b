#!/bin/bash
# Many streams at once, side by side: `edge-llm bench -np` against llama.cpp's
# llama-batched-bench on the 1B-shaped random model, 2 threads, two interleaved rounds.
# Uses the files bench/compare_llamacpp.py makes (and builds llama-batched-bench beside them).
set -euo pipefail
cd "$(dirname "$0")/.."
B="${EDGE_LLM_BENCH_DIR:-$HOME/.cache/edge-llm-bench}"
python bench/compare_llamacpp.py --prepare-only --quants int8,int4 >&2
BATCHED="$(python -c 'from bench.compare_llamacpp import llamacpp_bin; print(llamacpp_bin("llama-batched-bench"))')"
for round in 1 2; do
  for pair in int8:Q8_0 int4:Q4_0; do
    ours="${pair%%:*}"; theirs="${pair##*:}"
    echo "== round $round: edge-llm $ours"
    python -m edge.cli bench -m "$B/bundles/llama-3.2-1b-random-$ours" -np 1,2,4,8 -p 128 -n 32 -t 2 -r 2
    echo "== round $round: llama.cpp $theirs"
    "$BATCHED" -m "$B/gguf/llama-3.2-1b-random-$theirs.gguf" -c 4096 -b 2048 -ub 512 \
        -npp 128 -ntg 32 -npl 1,2,4,8 -t 2 2>/dev/null
  done
done
