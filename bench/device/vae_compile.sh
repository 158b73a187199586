#!/usr/bin/env bash
# bench/vae_compile.py on the lent GPU machine (run from the repository root there; carry .whl),
# then bench/graph_memory.py if time is left:
#
#   bash bench/device/vae_compile.sh [bench/vae_compile.py options]
#
# Installs the carried wheels into /tmp/site, writes full-size synthetic weights once to /tmp/mt,
# and leaves vae_compile.json, graph_memory.json and run.log in $OUT. Write the docs section here
# afterwards with `python -m bench.vae_compile --report <files_at>/vae_compile.json`.
set -uo pipefail
source bench/device/common.sh
bench_kit vae-compile
$PY -m bench.vae_compile --device cuda:0 --models /tmp/mt --out "$OUT" "$@"
# GPU memory of a CUDA graph for every batch size, captured smallest first vs largest first.
timeout 150 $PY -m bench.graph_memory --models /tmp/mt --top 24 | tee "$OUT/graph_memory.txt"
