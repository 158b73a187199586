#!/usr/bin/env bash
# Profile the server process during one load scenario on the lent GPU machine: runs
# bench/device/gpu_load.sh in the background and, once the clients talk, records the server's
# main process with py-spy (carry .whl-profile, bench/device/fetch_wheels.sh): 10 s of samples of the thread holding
# the GIL (--gil), then 10 s of all threads; then the same for the first device process, and 5 s
# of each for a peer process (so give the scenario --duration 60 or more). Raw flame-graph files
# land in $OUT (profile.tgz); their per-thread summary (bench/pyspy_summary.py) in
# $OUT/profile-summary.txt, and printed last.
#
#   bash bench/device/profile_load.sh [gpu_load.sh options] SCENARIOS   (the first one is profiled)
set -uo pipefail
OUT=${OUT:-$PWD/bench-results/profile-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export OUT
bash bench/device/gpu_load.sh --warmup 0 "$@" > "$OUT/gpu_load.out" 2>&1 &
LOAD=$!
until grep -q "talking for" "$OUT/gpu_load.out" 2>/dev/null; do
    kill -0 $LOAD 2>/dev/null || { tail -50 "$OUT/gpu_load.out"; exit 1; }
    sleep 1
done
sleep 5
SERVER=$(pgrep -f "server.cli --config" | head -1)
SPY=/tmp/site/bin/py-spy
[ -x "$SPY" ] || echo "no py-spy in /tmp/site: carry .whl-profile (bench/device/fetch_wheels.sh); only the thread listings will come back"
echo "server pid $SERVER; children: $(pgrep -P "$SERVER" | tr '\n' ' ')"
ps -o pid,pcpu,nlwp,cmd --ppid "$SERVER" -p "$SERVER" | cut -c1-120
top -b -n 1 -H -p "$SERVER" | head -40 > "$OUT/top-main-threads.txt"
$SPY record -p "$SERVER" -d 10 -r 100 --gil --threads --format raw -o "$OUT/server-gil.raw" --nonblocking
$SPY record -p "$SERVER" -d 10 -r 100 --threads --format raw -o "$OUT/server-threads.raw" --nonblocking
# children: device processes have torch's CUDA libraries mapped, peer processes do not
for CHILD in $(pgrep -P "$SERVER" -f "spawn_main"); do
    if grep -q libtorch "/proc/$CHILD/maps" 2>/dev/null; then DEVICE=${DEVICE:-$CHILD}; else PEER=${PEER:-$CHILD}; fi
done
if [ -n "${DEVICE:-}" ]; then
    top -b -n 1 -H -p "$DEVICE" | head -40 > "$OUT/top-device-threads.txt"
    $SPY record -p "$DEVICE" -d 10 -r 100 --gil --threads --format raw -o "$OUT/device-gil.raw" --nonblocking
    $SPY record -p "$DEVICE" -d 10 -r 100 --threads --format raw -o "$OUT/device-threads.raw" --nonblocking
fi
if [ -n "${PEER:-}" ]; then
    top -b -n 1 -H -p "$PEER" | head -40 > "$OUT/top-peer-threads.txt"
    $SPY record -p "$PEER" -d 5 -r 100 --gil --threads --format raw -o "$OUT/peer-gil.raw" --nonblocking
    $SPY record -p "$PEER" -d 5 -r 100 --threads --format raw -o "$OUT/peer-threads.raw" --nonblocking
fi
(cd "$OUT" && tar czf profile.tgz ./*.raw top-*.txt && rm -f ./*.raw top-*.txt)  # the run tool returns few files
${PY:-python3} bench/pyspy_summary.py "$OUT/profile.tgz" --top 8 > "$OUT/profile-summary.txt" 2>&1
wait $LOAD
tail -25 "$OUT/gpu_load.out"
echo "--- where the profiled processes' samples went (bench/pyspy_summary.py; all of it in profile-summary.txt)"
head -c 7000 "$OUT/profile-summary.txt"
