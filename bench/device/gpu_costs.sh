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
source bench/device/common.sh
bench_kit gpu-costs
$PY -m bench.gpu_costs --device cuda:0 --models /tmp/mt --work /tmp/mtw --out "$OUT" "$@"
