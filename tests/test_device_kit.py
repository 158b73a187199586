"""The lent-GPU load kit (bench/device/gpu_load.sh) as a CPU dry run, on two devices.

Device time is scarce (30 minutes a session): a kit that fails at its first step wastes a
machine's start. It did once: a configuration rule made the shipped GPU config refuse the
bench's capacity override, and the server never started. This runs the same script, the same
prepare step and the same server config with micro weights on two CPU devices."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_two_gpu_command_runs_end_to_end_as_a_cpu_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    speech = tmp_path / "speech"  # what a lent machine gets carried (it has no espeak-ng)
    made = subprocess.run([sys.executable, "bench/load.py", "--make-speech", str(speech)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    env = {**os.environ, "PY": sys.executable, "OUT": str(out), "WORK": str(tmp_path / "work"), "SPEECH_DIR": str(speech)}
    command = [
        # a synthetic avatar: avatars/demo is made where dlib is, not in every checkout
        "bash", "bench/device/gpu_load.sh", "--cpu-dry-run", "--devices", "cuda:0,cuda:1", "--avatar", "synth512",
        "--set", "engine.capacity_sessions=40", "--duration", "4", "--warmup", "1", "--ramp", "0.5",
        "--budget", "300", "2:all",
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    (report_path,) = sorted(out.glob("load-*.json"))
    report = json.loads(report_path.read_text())
    # one device process per GPU asked for, each bound to one of the two sessions
    assert sorted(w["name"] for w in report["server_devices_window"]) == ["cpu:0", "cpu:1"]
    assert sorted(s["server"]["device"] for s in report["sessions"]) == ["cpu:0", "cpu:1"]
    assert (out / "results.tgz").stat().st_size > 0
    # the command line's settings won over the dry run's own (capacity 8), over configs/gpu.yaml
    assert report["server"]["capacity_per_device"] == [40, 40], report["server"]
    assert "verdict:" in log and "syntax error" not in log
