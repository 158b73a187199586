# Sourced by the device kits (bench/device/*.sh), from the repository root on the lent machine:
# the carried wheels go into /tmp/site (the machine has torch, not the server stack) and onto
# PYTHONPATH, so every kit installs them the same way.
PY=${PY:-python3}

# install_wheels: 0 when installed or nothing was carried (``no_wheels`` then says so), 1 on failure
install_wheels() {
    if [ ! -d .whl ]; then
        no_wheels=1
        return 0
    fi
    local extra=()
    [ -d .whl-test ] && extra=(.whl-test/*.whl)  # pytest, for the GPU-only unit tests (wheels-test.txt)
    [ -d .whl-profile ] && extra+=(.whl-profile/*.whl)  # py-spy, for profile_load.sh (wheels-profile.txt)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        "${extra[@]}" || return 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

# bench_kit NAME: $OUT (default bench-results/NAME-<time>), everything printed also into
# $OUT/run.log, offline model hubs, the wheels installed (exit 3 if that fails), the GPU named
bench_kit() {
    OUT=${OUT:-$PWD/bench-results/$1-$(date +%Y%m%d-%H%M%S)}
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/run.log") 2>&1
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    install_wheels || exit 3
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
