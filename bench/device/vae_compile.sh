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
OUT=${OUT:-$PWD/bench-results/vae-compile-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -m bench.vae_compile --device cuda:0 --models /tmp/mt --out "$OUT" "$@"
# GPU memory of a CUDA graph for every batch size, captured smallest first vs largest first.
timeout 150 $PY -m bench.graph_memory --models /tmp/mt --top 24 | tee "$OUT/graph_memory.txt"
