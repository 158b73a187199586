#!/usr/bin/env bash
# bench/gpu_costs.py on the lent GPU machine (run from the repository root there; carry .whl):
#
#   bash bench/device/gpu_costs.sh [bench/gpu_costs.py options]
#
# Installs the carried wheels into /tmp/site (the machine has torch but not diffusers and the
# server stack), writes full-size synthetic weights once to /tmp/mt, and leaves gpu_costs.json
# and run.log in $OUT. Write the docs/benchmarks.md section here afterwards with
# `python -m bench.gpu_costs --report <files_at>/gpu_costs.json`.
set -uo pipefail
OUT=${OUT:-$PWD/bench-results/gpu-costs-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -m bench.gpu_costs --device cuda:0 --models /tmp/mt --work /tmp/mtw --out "$OUT" "$@"
