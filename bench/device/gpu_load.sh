#!/usr/bin/env bash
# The load test (bench/load.py) against one server running the full-size MuseTalk engine with
# random weights, on the lent GPU machine. Run from the repository root there:
#
#   bash bench/device/gpu_load.sh [options] SCENARIOS
#
#   SCENARIOS   bench/load.py --scenarios: N:talk[:mode[:seconds]],... e.g. 16:all,18:all,29:conversational
#   --devices D       engine devices, comma-separated (default cuda:0; cuda:0,cuda:1 on two GPUs)
#   --avatar A        demo (the carried avatars/demo, 512x512) | synth512 | synth720 (1280x720) [demo]
#   --duration S      seconds every scenario talks (default 30)
#   --mode M          ws | webrtc | mixed (default ws)
#   --ramp S          seconds over which a scenario's sessions connect (default 5)
#   --warmup S        before the first scenario, as many sessions as the largest scenario talk S
#                     seconds as it does, unmeasured (default 10; on an H200 the first speech after the start
#                     stalled every session ~2 s, and more sessions stalled them once more)
#   --set K=V         server config override, repeatable (e.g. --set sessions.processing_seconds=0.3)
#   --seed N          talk plans from seed N + session index (bench/load.py --seed, default 0): another
#                     draw of who talks when (conversational)
#   --budget S        seconds this script may take in all (default 570: the run tool's limit is 600)
#   --client-nice N   niceness of the client processes (bench/load.py --client-nice, default 10; 19 leaves
#                     the server every CPU it asks for: the clients share the server's 16 cores here)
#   --client-cpus L   run the clients on these CPUs only, e.g. 8-15 (bench/load.py --client-cpus)
#   --server-cpus L   run the server, all its processes, on these CPUs only, e.g. 0-7: with --client-cpus
#                     the server's cores are its own, as on a machine that does not host its viewers.
#                     On the 16-core H200, 0-7 / 8-15 gives each side about what it uses at 29
#                     conversational sessions (~6 cores each; 2026-12-04); 0-9 / 10-15 starved the clients.
#                     On two H200s (32 cores): 0-15 / 16-31.
#   --cpu-dry-run     micro weights on the CPU, no wheels installed: checks the kit on a CPU machine
#                     (--devices cuda:0,cuda:1 becomes cpu:0,cpu:1: one device process each)
#
# Needs, carried by the `run` call: .whl (wheels of the server stack, bench/device/fetch_wheels.sh),
# .bench_data/speech (bench/load.py --make-speech; the device has no espeak-ng; SPEECH_DIR=... for another) and avatars/demo
# (for --avatar demo; the device has no dlib). Writes into $OUT (or bench-results/device-*):
# run.log (everything printed), results.tgz (every scenario's JSON and PNG, the server's log,
# its config) and the scenarios' JSON files. Prints a table of the scenarios last.
set -uo pipefail

DEVICES=cuda:0 AVATAR=demo DURATION=30 MODE=ws RAMP=5 BUDGET=570 WARMUP=10 DRY=0 NICE=10 SEED=0
SETS=() CPUS=()
SCENARIOS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) DEVICES=$2; shift 2 ;;
        --avatar) AVATAR=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --mode) MODE=$2; shift 2 ;;
        --ramp) RAMP=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --set) SETS+=(--set "$2"); shift 2 ;;
        --seed) SEED=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --client-nice) NICE=$2; shift 2 ;;
        --client-cpus|--server-cpus) CPUS+=("$1" "$2"); shift 2 ;;
        --cpu-dry-run) DRY=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;  # the header comment, however long
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) SCENARIOS=$1; shift ;;
    esac
done
[ -n "$SCENARIOS" ] || { echo "usage: bash bench/device/gpu_load.sh [options] SCENARIOS (see --help)" >&2; exit 2; }
# A fresh H200 machine: ~50 s of wheels and synthetic weights, then 95-145 s of compiling and
# graph capture before the server is ready (2026-12-03 runs), then the scenarios. A budget below
# this wastes the device time (the server is stopped while still compiling). START_S: a server
# start's seconds (gpu_load_ab.sh's second test finds the compile cache warm: ~60 s).
whole() { printf '%.0f' "$1"; }  # seconds may be given as fractions; bash counts whole ones
MIN_BUDGET=$((50 + ${START_S:-150} + $(whole "$WARMUP") + $(whole "$RAMP") + $(whole "$DURATION") + 30))  # one scenario at least
if [ "$DRY" = 0 ] && [ "$BUDGET" -lt "$MIN_BUDGET" ]; then
    echo "--budget $BUDGET s is too short: a cold start takes ~200 s before the first scenario (need >= $MIN_BUDGET)" >&2
    exit 2
fi

START=$SECONDS
OUT=${OUT:-$PWD/bench-results/device-$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-/tmp/lipstream-load}
RES=$WORK/results
rm -rf "$RES"
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/run.log") 2>&1

# Kept as KINDS.md asks on the lent machines (no NCCL here, but keep them for any child).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
source bench/device/common.sh
step() { echo "[gpu_load +$((SECONDS - START))s] $*"; }

if [ "$DRY" = 1 ]; then
    EXTRA=(--tiny-cpu --set engine.capacity_sessions=8)  # calibration admits one session on a small CPU
    # as many CPU devices as GPUs asked for (cpu:0,cpu:1 for two), so a dry run checks the
    # several-device path of the kit too
    n=$(echo "$DEVICES" | tr ',' '\n' | grep -c .)
    if [ "$n" -gt 1 ]; then DEVICES=$(seq -s, -f "cpu:%g" 0 $((n - 1))); else DEVICES=cpu; fi
    export OMP_NUM_THREADS=1  # as tests/test_musetalk_live.py: two torch threads on few cores stall
else
    EXTRA=()
    step "installing the carried wheels (.whl) into /tmp/site"
    no_wheels=0
    install_wheels || { step "wheel install failed"; exit 3; }
    [ "$no_wheels" = 1 ] && step "no .whl folder: using the installed packages"
fi

step "checking imports"
$PY - <<'EOF' || { step "import check failed"; exit 4; }
import importlib, platform, os
names = ["numpy", "cv2", "torch", "diffusers", "transformers", "av", "aiortc", "fastapi", "starlette", "uvicorn",
         "websockets", "httpx", "pydantic", "pydantic_settings", "typer", "yaml", "prometheus_client", "webrtcvad",
         "safetensors", "skimage", "matplotlib"]
versions = {}
for name in names:
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        versions[name] = f"MISSING ({type(exc).__name__}: {exc})"
print("python", platform.python_version(), "|", ", ".join(f"{k} {v}" for k, v in versions.items()))
import torch
print("cuda devices:", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
import server.app  # noqa: F401 - the server's own imports
missing = [k for k, v in versions.items() if str(v).startswith("MISSING") and k != "matplotlib"]
if missing:
    raise SystemExit(f"missing: {missing}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu --format=csv
echo "cores: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
# whether the cores are hyperthreads decides how much the clients' CPU slows the server's
lscpu 2>/dev/null | grep -E "^(Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)|NUMA node\(s\)):" | tr -s ' ' | paste -sd ';'

step "preparing weights, avatar and config"
# the dry run's own settings first: a --set given on the command line wins over them
$PY bench/device/prepare.py --work "$WORK" --devices "$DEVICES" --avatar "$AVATAR" "${EXTRA[@]}" "${SETS[@]}" \
    || { step "prepare failed"; exit 5; }
cp "$WORK/server.yaml" "$RES/server.yaml"

# What the docs rows show as each scenario's command (bench/load.py --report ... --write-doc, here).
KIT="bash bench/device/gpu_load.sh --devices $DEVICES --avatar $AVATAR --mode $MODE"
[ "$NICE" != 10 ] && KIT="$KIT --client-nice $NICE"
[ "$SEED" != 0 ] && KIT="$KIT --seed $SEED"
[ ${#CPUS[@]} -gt 0 ] && KIT="$KIT ${CPUS[*]}"
for ((i = 1; i < ${#SETS[@]}; i += 2)); do KIT="$KIT --set ${SETS[i]}"; done
[ "$DRY" = 1 ] && KIT="$KIT --cpu-dry-run"

# Each of the server's processes on its own (one GIL each): is one of them the limit?
$PY bench/device/process_cpu.py --out "$RES/process-cpu.log" &
SAMPLER=$!

LEFT=$((BUDGET - (SECONDS - START) - 30))
step "load test: scenarios $SCENARIOS, $DURATION s each, mode $MODE; ${LEFT} s left for it (server start included)"
timeout -s INT -k 30 "$LEFT" $PY bench/load.py --spawn-server --config "$WORK/server.yaml" \
    --avatars-dir "$WORK/avatars" --avatar "$AVATAR" --speech-dir "${SPEECH_DIR:-.bench_data/speech}" \
    --scenarios "$SCENARIOS" --duration "$DURATION" --mode "$MODE" --ramp "$RAMP" --warmup "$WARMUP" \
    --client-nice "$NICE" --seed "$SEED" "${CPUS[@]}" \
    --server-timeout $((LEFT > 120 ? LEFT - 60 : 60)) --out "$RES" --doc-command "$KIT {scenario}"
rc=$?
step "load test exited with $rc"
kill $SAMPLER 2>/dev/null
echo "--- CPU % of one core per server process, every 5 s (main | device processes | peer processes):"
cut -c1-200 "$RES/process-cpu.log" 2>/dev/null | tail -80
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader

for log in "$RES"/load-*-server.log; do
    [ -e "$log" ] || continue
    echo "--- server log, start-up and problems ($(wc -l < "$log") lines; all of it in results.tgz):"
    grep -vE "uvicorn.access|connection (open|closed)|WebSocket /v1" "$log" \
        | grep -iE "warm|compil|graph|calibrat|capacity|ready|device|error|exception|traceback|refused|failed|dropped without" \
        | head -40 | cut -c1-300
    if grep -q "Fatal Python error" "$log"; then  # a crash: faulthandler's stacks (server/cli.py)
        echo "--- the crash:"
        grep -A60 "Fatal Python error" "$log" | head -80 | cut -c1-300
    fi
done
tar czf "$OUT/results.tgz" -C "$RES" .
jsons=("$RES"/load-*.json)
if [ -e "${jsons[0]}" ] && [ ${#jsons[@]} -le 6 ]; then cp "${jsons[@]}" "$OUT/"; fi
step "wrote $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ -e "${jsons[0]}" ]; then
    $PY bench/load.py --report "${jsons[@]}" | sed -n '/^scenarios:/,$p'
    [ ${#jsons[@]} -eq 1 ] && $PY bench/load.py --report "${jsons[@]}" | grep -E "^(sessions|latency|server|clients|CPU|GPU|verdict)"
fi
exit $rc
