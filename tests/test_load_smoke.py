"""bench/load.py end to end: its own server, two WebSocket sessions, each in a client process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_load_two_websocket_sessions(avatars_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"avatars": {"dir": str(avatars_root)}}))
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "load.py"), "--spawn-server", "--config", str(config),
        "--sessions", "2", "--duration", "6", "--mode", "ws", "--ramp", "0.5", "--out", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = sorted(out.glob("load-*.json"))
    assert len(reports) == 1, done.stdout
    report = json.loads(reports[0].read_text())

    sessions = report["sessions"]
    assert len(sessions) == 2, sessions
    for session in sessions:
        assert not session.get("error"), session.get("error")
        assert session["mode"] == "ws"
        assert session["fps"] >= 20, session
        assert session["frames_received"] >= 20 * 6
        assert session["latency_ms_p50"] is not None, session  # at least one utterance onset was timed
        assert 50 < session["latency_ms_p50"] < 2000
        assert session["server"]["stats"]["latency_ms_p50"] is not None
    overall = report["overall"]
    assert overall["sessions"] == 2 and overall["onsets_measured"] >= 2
    assert overall["latency_ms_p50"] is not None
    assert isinstance(overall["server_cpu_percent_mean"], float)  # the spawned server was sampled
    assert "sessions OK" in done.stdout
