#!/usr/bin/env bash
# Two load tests in one device call: the same scenarios against two server configurations, one
# after the other. The second server reuses the first one's compile cache on the same machine
# (its start took ~60 s instead of ~143 s on an H200), so an A/B comparison fits the run tool's
# 600 s, where two calls would each pay a machine start and a cold compile.
#
#   bash bench/device/gpu_load_ab.sh [options] --a "SETTINGS" --b "SETTINGS" SCENARIOS
#
#   --a / --b         each a string of bench/device/gpu_load.sh options for that server,
#                     e.g. --a "" --b "--set engine.whisper_batch=16" ("" = the defaults)
#   --budget-a S      seconds for the first test (default 320: a cold start, warm-up, scenarios)
#   --budget S        seconds for both (default 580)
#   any other option  passed to both (--devices, --duration, --warmup, --ramp, --set ...)
#
# Carry what gpu_load.sh needs. Each test writes into $OUT/a and $OUT/b (run.log, results.tgz,
# the scenarios' JSON); the last lines compare their scenarios.
set -uo pipefail
A="" B="" BUDGET=580 BUDGET_A=320 SCENARIOS="" COMMON=()
while [ $# -gt 0 ]; do
    case "$1" in
        --a) A=$2; shift 2 ;;
        --b) B=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --budget-a) BUDGET_A=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;  # the header comment, however long
        --cpu-dry-run) COMMON+=("$1"); shift ;;
        -*) COMMON+=("$1" "$2"); shift 2 ;;
        *) SCENARIOS=$1; shift ;;
    esac
done
[ -n "$SCENARIOS" ] || { echo "usage: bash bench/device/gpu_load_ab.sh [options] --a SETTINGS --b SETTINGS SCENARIOS" >&2; exit 2; }
START=$SECONDS
ROOT_OUT=${OUT:-$PWD/bench-results/device-ab-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$ROOT_OUT/a" "$ROOT_OUT/b"
# shellcheck disable=SC2086 - the A and B strings are option lists
OUT="$ROOT_OUT/a" bash bench/device/gpu_load.sh "${COMMON[@]}" $A --budget "$BUDGET_A" "$SCENARIOS" | tail -40
LEFT=$((BUDGET - (SECONDS - START)))
echo "[gpu_load_ab] first test done after $((SECONDS - START)) s; ${LEFT} s left for the second"
# shellcheck disable=SC2086
START_S=70 OUT="$ROOT_OUT/b" bash bench/device/gpu_load.sh "${COMMON[@]}" $B --budget "$LEFT" "$SCENARIOS" | tail -40
PY=${PY:-python3}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
for side in a b; do
    settings=$A; [ $side = b ] && settings=$B
    echo "=== $side: ${settings:-defaults}"
    jsons=("$ROOT_OUT/$side"/load-*.json)
    [ -e "${jsons[0]}" ] || { echo "(no report)"; continue; }
    if [ ${#jsons[@]} -gt 1 ]; then
        $PY bench/load.py --report "${jsons[@]}" | sed -n '/^scenarios:/,$p'
    else
        $PY bench/load.py --report "${jsons[@]}" | grep -E "^(sessions|latency|server|device|GPU|verdict)"
    fi
done
