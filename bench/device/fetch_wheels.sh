#!/usr/bin/env bash
# Run HERE (the development machine, with network), from the repository root, before a `run` call
# of bench/device/gpu_load.sh: fills what the call carries.
#
#   .whl/               the wheels of bench/device/wheels.txt (pip download, py3.12 manylinux x86-64);
#                       wheels of other versions of the same packages are removed (two stop the install)
#   .whl-test/, .whl-profile/  pytest (wheels-test.txt) and py-spy (wheels-profile.txt), carried
#                       only by the runs that need them
#   .bench_data/speech/ the load test's sentences as WAV files (bench/load.py --make-speech; espeak-ng)
#   avatars/demo/       the demo avatar, prepared here if missing (needs dlib, which the device lacks)
#
# All three are ignored by git (.git/info/exclude, .gitignore) and travel only when named in `carry`.
# Prints what would travel; the limit is 64 MiB for the working tree and the carried paths together.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

for ignored in /.whl/ /.whl-test/ /.whl-profile/ /.bench_data/; do
    grep -qx "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
# fetch LIST DIR: the wheels LIST names into DIR (other versions of the same packages removed)
fetch() {
    local list=$1 dir=$2 spec name version f base fname fversion have
    mkdir -p "$dir"
    for spec in $(grep -v '^\s*#' "$list" | grep -v '^\s*$'); do
        name=${spec%%==*}; version=${spec#*==}
        for f in "$dir"/*.whl; do
            [ -e "$f" ] || continue
            base=$(basename "$f"); fname=${base%%-*}; fversion=$(echo "$base" | cut -d- -f2)
            if [ "$(norm "$fname")" = "$(norm "$name")" ] && [ "$fversion" != "$version" ]; then
                echo "removing $base (want $version)"; rm -f "$f"
            fi
        done
        have=0
        for f in "$dir"/*.whl; do
            [ -e "$f" ] || continue
            base=$(basename "$f")
            [ "$(norm "${base%%-*}")" = "$(norm "$name")" ] && have=1
        done
        [ $have = 1 ] && continue
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
            --platform manylinux_2_34_x86_64 --platform manylinux_2_5_x86_64 -d "$dir" "$spec"
    done
}
fetch bench/device/wheels.txt .whl
# pytest and its needs, for the GPU-only unit tests: a separate folder, carried only by the runs
# that need it (the load kits' carry is near the 64 MiB limit without them)
fetch bench/device/wheels-test.txt .whl-test
# py-spy, for bench/device/profile_load.sh only: carry .whl-profile in those runs
fetch bench/device/wheels-profile.txt .whl-profile

[ -f .bench_data/speech/speech.json ] || "$PY" bench/load.py --make-speech .bench_data/speech
if [ ! -f avatars/demo/avatar.json ]; then
    "$PY" -c "from pipeline.avatar.demo import ensure_demo_avatar; from pipeline.avatar.store import AvatarStore; ensure_demo_avatar(AvatarStore('avatars'))"
fi

tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done | tr '\n' '\0' | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry=$(du -sb .whl .bench_data/speech avatars/demo | awk '{s += $1} END {print s}')
echo "wheels: $(ls .whl/*.whl | wc -l) files; travels: tree $((tree / 1048576)) MiB + carried $((carry / 1048576)) MiB (limit 64 MiB; .whl-test adds $(( $(du -sb .whl-test | cut -f1) / 1048576 )) MiB when carried)"
du -sh .whl .whl-test .whl-profile .bench_data/speech avatars/demo
