"""bench/load.py end to end: its own server, two WebSocket sessions, each in a client process."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CPUS = sorted(os.sched_getaffinity(0))


def test_load_two_websocket_sessions(avatars_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"avatars": {"dir": str(avatars_root)}}))
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "bench" / "load.py"), "--spawn-server", "--config", str(config),
        "--sessions", "2", "--duration", "6", "--mode", "ws", "--ramp", "0.5", "--out", str(out),
        # the clients on one CPU, the server on all: each stays where it is put
        "--client-cpus", str(CPUS[-1]), "--server-cpus", ",".join(map(str, CPUS)),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = sorted(out.glob("load-*.json"))
    assert len(reports) == 1, done.stdout
    plots = sorted(out.glob("load-*.png"))  # matplotlib comes with the bench extra (make test)
    assert len(plots) == 1 and plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stdout
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
        # the clients yield the CPU to the server (--client-nice, default 10; it adds to ours)
        assert session["client_nice"] >= 10 and report["config"]["client_nice"] == 10
        assert session["client_cpus"] == [CPUS[-1]]
    assert report["config"]["server_affinity"] == CPUS
    overall = report["overall"]
    assert overall["sessions"] == 2 and overall["onsets_measured"] >= 2
    assert overall["latency_ms_p50"] is not None
    assert isinstance(overall["server_cpu_percent_mean"], float)  # the spawned server was sampled
    assert "sessions OK" in done.stdout
    # where the device's made frames spent their time, from GET /v1/devices at the end
    (device,) = report["server_devices_at_end"]["devices"]
    assert device["stages_ms"]["frames"] > 0 and "batch" in device["stages_ms"]
    assert f"device {device['name']} stages over its last" in done.stdout
    (window,) = report["server_devices_window"]  # the talking window's batches: differences of the counters
    assert window["name"] == device["name"] and 0 < window["frames"] <= device["frames"]
    assert window["mean_batch"] == pytest.approx(window["frames"] / window["batches"], abs=0.01)
    assert f"device {device['name']} in the window:" in done.stdout
    # where delivery waits: the server's picture lags, its event loop, the clients' packets and decoder
    lags = sessions[0]["server"]["stats"]["output_lag_ms"]
    assert lags["sent_p50"] is not None and lags["sent_max"] >= lags["ready_p50"], lags
    assert report["server_process_at_end"]["event_loop_lag"]["samples"] > 0
    assert "its longest GC pause" in done.stdout
    assert overall["output_sent_ms_p95_median"] is not None
    for session in sessions:
        assert session["packet_delay_ms_p50"] is not None and session["decode_delay_ms_p50"] >= 0, session
    assert "delivery, ms after release" in done.stdout
    # the returned audio's delay by cross-correlation: found for most onsets, after the server's
    # release delay (lookahead + jitter + processing: at least 0.12 s) and before the mouth's window
    assert overall["echo_onsets"] >= overall["onsets_sent"] // 2, overall
    assert 120 < overall["echo_latency_ms_p50"] < 1500, overall
    assert "returned audio by cross-correlation" in done.stdout
    # the input: WebSocket pushes (not live) are never shortened; the clock's silence is counted
    assert overall["input_shortened_seconds"] == 0 and overall["input_padded_seconds"] > 0
    assert "s of delayed microphones' pauses left out" in done.stdout

    # several reports, plain and gzipped (as bench/results/load stores them): one line each, with
    # the device's mean batch and stage figures
    gzipped = tmp_path / (reports[0].name + ".gz")
    gzipped.write_bytes(gzip.compress(reports[0].read_bytes()))
    again = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--report", str(reports[0]), str(gzipped)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    overview = again.stdout[again.stdout.index("scenarios:"):].splitlines()
    assert "batch feat95 pass95 slack5" in overview[1]
    assert len(overview) == 4 and f" {window['mean_batch']:.1f} " in overview[2], overview


def test_a_report_with_refused_sessions_says_how_the_admitted_ones_did() -> None:
    """An admission run (bench/results/load, 2026-12-04: 30 half-talkers asked of a device that
    admits 29): the refusals fail the verdict, as they should for a capacity test, and the report
    says that every admitted session passed."""
    report = ROOT / "bench" / "results" / "load" / "load-20261204-141229.json.gz"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 sessions were refused (503" in done.stdout
    assert "of the 29 admitted, 29 passed every criterion" in done.stdout
    assert "verdict: FAIL (all_sessions_ok" in done.stdout


def test_skipped_frames_count_as_late_in_the_verdict() -> None:
    """A frame the device skipped (the mouth held) is a degraded frame: the session's late share
    and its OK verdict include it; a server that reports no skips (older) is judged as before."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    def session(skipped_at_end: int | None) -> dict:
        end = {"frames": 1000, "late_frames": 4, "dropped_frames": 0}
        if skipped_at_end is not None:
            end["skipped_frames"] = skipped_at_end
        start = {"frames": 500, "late_frames": 2, "dropped_frames": 0, "skipped_frames": 0}
        return {
            "server": {"stats": end}, "server_stats_at_start": start, "fps": 25.0, "max_gap_ms": 50.0,
            "client_late_percent": 0.0, "onset_latency_ms": [150.0] * 20, "onsets_unmeasured": 0,
        }

    clean = session(None)
    load.judge(clean, 20.0)
    assert clean["server_window"]["skipped_frames"] == 0 and clean["late_percent"] == 0.4 and clean["ok"]
    skipping = session(10)
    load.judge(skipping, 20.0)
    assert skipping["server_window"]["skipped_frames"] == 10
    assert skipping["late_percent"] == 2.4 and not skipping["ok"]  # (2 late + 10 skipped) / 500


def test_warm_up_talks_like_the_largest_scenario() -> None:
    """The warm-up takes the largest scenario's sessions and talk mode: a conversational scenario's
    sessions all talking at once would overload the device with what the scenario never asks."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    scenarios = load.parse_scenarios("16:all,26:conversational,20:all", "ws", 20.0)
    assert load.warmup_scenario(scenarios, 8.0) == {"sessions": 26, "talk": "conversational", "mode": "ws", "duration": 8.0}
    assert load.warmup_scenario(scenarios, 8.0, sessions=4)["sessions"] == 4
    only_all = load.parse_scenarios("14:all,16:all", "webrtc", 20.0)
    assert load.warmup_scenario(only_all, 5.0) == {"sessions": 16, "talk": "all", "mode": "webrtc", "duration": 5.0}


def test_worker_sim_counts_late_and_skipped_frames(tmp_path: Path) -> None:
    """bench/worker_sim.py (the real EngineWorker before a modelled GPU): an idle device makes
    every frame on time; one far too slow (50 ms per frame for 4 sessions) makes them late
    without skipping, and sheds them with the server's policy."""
    from bench import worker_sim

    out = tmp_path / "sim.json"
    worker_sim.main(
        ["--scenarios", "4:all", "--policies", "none,batch", "--seconds", "3", "--warmup", "1",
         "--base-ms", "0", "--per-frame-ms", "0.1", "--json", str(out)]
    )
    idle = json.loads(out.read_text())
    assert [r["degraded_pct"] for r in idle] == [0.0, 0.0], idle
    worker_sim.main(
        ["--scenarios", "4:all", "--policies", "none,batch", "--seconds", "3", "--warmup", "1",
         "--base-ms", "0", "--per-frame-ms", "50", "--json", str(out)]
    )
    none, batch = json.loads(out.read_text())
    assert none["late_pct"] > 50 and none["skipped_pct"] == 0, none
    assert batch["skipped_pct"] > 10, batch


def test_worker_sim_overlapped_engine_hides_the_host_side(tmp_path: Path) -> None:
    """--engines / --host-ms: with 30 ms of host side per batch before 8 ms per frame of device
    time, an engine that waits for each batch leaves the device idle through the host side and
    its frames miss the 110 ms budget; an overlapped one prepares the next batch meanwhile."""
    from bench import worker_sim

    out = tmp_path / "sim.json"
    worker_sim.main(
        ["--scenarios", "4:all", "--policies", "batch", "--engines", "waited,overlapped", "--seconds", "3",
         "--warmup", "1", "--base-ms", "0", "--per-frame-ms", "8", "--whisper-ms", "0", "--host-ms", "30",
         "--json", str(out)]
    )
    waited, overlapped = json.loads(out.read_text())
    assert (waited["engine"], overlapped["engine"]) == ("waited", "overlapped")
    assert waited["degraded_pct"] > 20, waited
    assert overlapped["degraded_pct"] < waited["degraded_pct"] / 4, (waited, overlapped)


@pytest.mark.parametrize(("argv", "says"), [(["--engines", "fast"], "unknown engines"), (["--host-ms", "-1"], "--host-ms")])
def test_worker_sim_refuses_unknown_engines_and_negative_host_time(argv: list[str], says: str, capsys) -> None:
    from bench import worker_sim

    with pytest.raises(SystemExit) as stopped:
        worker_sim.main(argv)
    assert stopped.value.code == 2 and says in capsys.readouterr().err


def test_worker_sim_hands_frames_over_in_feature_passes(tmp_path: Path) -> None:
    """--handovers passes / bursts: frames reach the worker in feature passes (one by one, or as
    one burst); every frame is still made and counted, and the process's GIL switch interval is
    left as it was."""
    from bench import worker_sim

    out = tmp_path / "sim.json"
    before = sys.getswitchinterval()
    worker_sim.main(
        ["--scenarios", "4:all", "--policies", "batch", "--handovers", "passes,bursts", "--seconds", "3",
         "--warmup", "1", "--base-ms", "0", "--per-frame-ms", "0.1", "--json", str(out)]
    )
    rows = json.loads(out.read_text())
    assert [r["handover"] for r in rows] == ["passes", "bursts"]
    assert all(r["degraded_pct"] == 0.0 and r["mean_batch"] >= 1.0 for r in rows), rows
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scenarios", "16:chatty"], "talk must be"),
        (["--policies", "never"], "unknown policies"),
        (["--handovers", "carrier-pigeon"], "unknown hand-overs"),
        (["--gather-ms", "-1"], "--gather-ms must be >= 0"),
    ],
)
def test_worker_sim_rejects_bad_scenarios_and_policies(argv: list[str], message: str, capsys) -> None:
    from bench import worker_sim

    with pytest.raises(SystemExit) as exit_info:
        worker_sim.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_vae_compile_names_an_unknown_variant_before_writing_anything(tmp_path: Path) -> None:
    from bench import vae_compile

    models, out = tmp_path / "models", tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        vae_compile.main(["--variants", "default,fastest", "--models", str(models), "--out", str(out), "--tiny"])
    assert "unknown variant(s) fastest: choose from default, eager, pointwise, coordinate" in str(exit_info.value.code)
    assert not models.exists() and not out.exists()  # no weights written, no output folder


@pytest.mark.parametrize("argv", [["--streams", "0"], ["--seconds", "0"], ["--switch-interval-ms", "0"]])
def test_device_frame_cost_refuses_empty_runs_before_starting_anything(argv: list[str], capsys) -> None:
    """bench/device_frame_cost.py: no streams or no time would divide by zero after spawning a
    device process; it is refused first, with exit 2."""
    from bench import device_frame_cost

    with pytest.raises(SystemExit) as exit_info:
        device_frame_cost.main(argv)
    assert exit_info.value.code == 2 and "--streams must be >= 1" in capsys.readouterr().err


def test_server_loop_cost_measures_sessions_through_a_real_feed(avatars_root: Path, tmp_path: Path) -> None:
    """bench/server_loop_cost.py: real sessions fed like the WebSocket, a stub device, real
    feeds; the voiced test signal makes frames with speech, and the figures come back."""
    from bench import server_loop_cost

    out = tmp_path / "cost.json"
    assert server_loop_cost.main(["--sessions", "2", "--seconds", "1.5", "--talk", "all", "--no-freeze",
                                  "--avatars", str(avatars_root), "--json", str(out), "--gil-rivals", "1"]) == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("gil-rival")]  # stopped and joined
    (result,) = json.loads(out.read_text())
    assert result["sessions"] == 2 and 60 <= result["frames"] <= 90  # 2 x 25 fps x 1.5 s
    assert result["active_frames"] > 0  # the buzz is speech to the VAD: pictures were made
    assert result["cpu_us_per_frame"] > 0 and result["loop_lag_ms"]["samples"] > 0
    assert result["sent_ms_p95_median"] is not None and len(result["gc"]["collections"]) == 3


@pytest.mark.parametrize("argv", [["--sessions", "0"], ["--sessions", "x"], ["--seconds", "0"]])
def test_server_loop_cost_refuses_bad_arguments(argv: list[str], capsys) -> None:
    from bench import server_loop_cost

    with pytest.raises(SystemExit) as exit_info:
        server_loop_cost.main(argv)
    assert exit_info.value.code == 2 and "--sessions" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--switch-ms", "0"], ["--gil-rivals", "-1"]])
def test_server_loop_cost_refuses_a_bad_switch_interval_or_rival_count(argv: list[str], capsys) -> None:
    from bench import server_loop_cost

    with pytest.raises(SystemExit) as exit_info:
        server_loop_cost.main(argv)
    assert exit_info.value.code == 2 and "--switch-ms must be > 0 and --gil-rivals >= 0" in capsys.readouterr().err


def test_a_mouth_rise_far_from_its_sound_is_not_the_utterances_onset() -> None:
    """Talk "all": the mouth is still moving from one utterance when the next is sent, so the
    first rise from rest after it is a later word's. Frames carry their own audio, so such a rise
    (far from the utterance's returned sound) is not taken as its latency; the sound plus the
    session's plausible A/V offset is, and the odd offset is still listed."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    import load
    from tests.rtc_client import RATE

    latency, fps = 0.15, 25
    sent = {0: 1.0, 1: 2.6}  # two utterances of 1.5 s, the second sent before the first played out
    sounding = [(1.0 + latency, 2.5 + latency), (2.6 + latency, 4.1 + latency)]
    moving = [(1.0 + latency, 3.3), (3.4, 4.1 + latency)]  # no rest at the second onset; a pause later
    times = np.arange(0, 6.0, 1 / fps)
    frames = [np.full((8, 8, 3), 100 if any(a <= t < b for a, b in moving) else 0, np.uint8) for t in times]
    clock = np.arange(int(6.0 * RATE)) / RATE
    signal = np.where([any(a <= t < b for a, b in sounding) for t in clock], np.sin(2 * np.pi * 300 * clock), 0.0)
    recording = SimpleNamespace(
        frames=frames, video_arrival=list(times + 0.05), video_pts=list(range(len(times))),
        video_times=lambda: times, audio_signal=lambda: (signal.astype(np.float32), 0.0),
        video_clock=SimpleNamespace(unwrap=lambda x: x, rtp=lambda p: p, first_arrival={p: t + 0.04 for p, t in enumerate(times)}),
    )
    plan = [load.Utterance(0.5, 0, 0.0, 1.5), load.Utterance(2.1, 0, 0.0, 1.5)]
    out = load.analyse(SimpleNamespace(recording=recording), plan, sent, 0.5, 5.9)
    assert out["latency_ms"] == [pytest.approx(160, abs=20)]  # the first onset, by the mouth
    assert out["onset_latency_ms"] == [pytest.approx(160, abs=20), pytest.approx(150, abs=20)]
    assert out["onset_latency_by_audio"] == 1
    assert max(out["av_offset_ms"]) > 500  # the later word's rise, kept where an A/V fault would show
    assert abs(out["av_offset_ms_used"]) < 50


def test_a_stand_in_onset_takes_the_cross_correlated_delay_of_its_sound() -> None:
    """Talk "all" again, with speech-like utterances sent as audio: the second utterance starts
    softly, so the returned audio's envelope crosses its threshold late, while the
    cross-correlated delay finds the frame that carries its first sound. The stand-in is that
    delay plus the session's offset of the mouth against it (from the first utterance)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    import load
    from tests.rtc_client import RATE

    latency, lead, fps = 0.2, -0.06, 25  # the sound 200 ms after sending; the mouth 60 ms before it
    rng = np.random.default_rng(5)
    t16 = np.arange(int(1.5 * 16000)) / 16000
    syllables = np.clip(np.sin(2 * np.pi * 3.1 * t16 + rng.uniform(0, 6)), 0, None) ** 2
    sentence = (0.5 * syllables * np.sin(2 * np.pi * 170 * t16)).astype(np.float32)
    soft = sentence * np.clip(t16 / 0.45, 0.0, 1.0) ** 2  # a quiet first 450 ms: the threshold fires late
    sent = {0: 1.0, 1: 2.6}
    plan = [load.Utterance(0.5, 0, 0.0, 1.5), load.Utterance(2.1, 1, 0.0, 1.5)]
    clock = np.arange(int(6.0 * RATE)) / RATE
    signal = np.zeros(len(clock), np.float32)
    for (k, u), audio in zip(sent.items(), (sentence, soft), strict=True):
        at = int((u + latency) * RATE)
        signal[at : at + 3 * len(audio)] += np.repeat(audio, 3)
    moving = [(1.0 + latency + lead, 3.3), (3.4, 4.1 + latency)]  # no rest at the second onset
    times = np.arange(0, 6.0, 1 / fps)
    frames = [np.full((8, 8, 3), 100 if any(a <= x < b for a, b in moving) else 0, np.uint8) for x in times]
    recording = SimpleNamespace(
        frames=frames, video_arrival=list(times + 0.05), video_pts=list(range(len(times))),
        video_times=lambda: times, audio_signal=lambda: (signal, 0.0),
        video_clock=SimpleNamespace(unwrap=lambda x: x, rtp=lambda p: p, first_arrival={p: x + 0.04 for p, x in enumerate(times)}),
    )
    client = SimpleNamespace(recording=recording)
    with_echo = load.analyse(client, plan, sent, 0.5, 5.9, [(sentence, 16000), (soft, 16000)])
    assert with_echo["echo_latency_ms"] == [pytest.approx(200, abs=4), pytest.approx(200, abs=4)]
    assert with_echo["onset_latency_by_echo"] == 1
    mouth = with_echo["onset_latency_ms"][0]
    assert mouth == pytest.approx(140, abs=40)  # a frame's resolution
    # the second onset: its sound's delay plus the mouth's lead over the sound in the first
    assert with_echo["onset_latency_ms"][1] == pytest.approx(200 + mouth - with_echo["echo_latency_ms"][0], abs=4)
    by_threshold = load.analyse(client, plan, sent, 0.5, 5.9)
    assert by_threshold["onset_latency_by_echo"] == 0
    assert by_threshold["onset_latency_ms"][1] > with_echo["onset_latency_ms"][1] + 30  # fired late


def test_a_cut_first_utterance_is_no_resting_mouth() -> None:
    """A conversational session may join mid-sentence: that cut utterance is sent but has no
    onset, and its frames must not count as the resting mouth (they did on 2026-12-04: the
    moving mouth set the motion threshold and six sessions of 29 had no onset measured)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    import load
    from tests.rtc_client import RATE

    latency, fps, t_talk = 0.15, 25, 0.5
    plan = [load.Utterance(0.5, 0, 0.8, 1.7), load.Utterance(3.5, 1, 0.0, 1.5)]  # cut first, then a whole one
    sent = {1: t_talk + 3.5}
    moving = [(t_talk + 0.5 + latency, t_talk + 2.2 + latency), (sent[1] + latency, sent[1] + 1.5 + latency)]
    times = np.arange(0, 7.0, 1 / fps)
    rng = np.random.default_rng(1)
    # a talking mouth changes every frame; a resting one hardly at all
    frames = [
        (rng.uniform(60, 140, (8, 8, 3)) if any(a <= t < b for a, b in moving) else np.full((8, 8, 3), 100.0) + rng.normal(0, 0.2, (8, 8, 3))).astype(np.uint8)
        for t in times
    ]
    recording = SimpleNamespace(
        frames=frames, video_arrival=list(times + 0.05), video_pts=list(range(len(times))),
        video_times=lambda: times, audio_signal=lambda: (np.zeros(int(7.0 * RATE), np.float32), 0.0),
        video_clock=SimpleNamespace(unwrap=lambda x: x, rtp=lambda p: p, first_arrival={p: t + 0.04 for p, t in enumerate(times)}),
    )
    out = load.analyse(SimpleNamespace(recording=recording), plan, sent, t_talk, 6.9)
    assert out["latency_ms"] == [pytest.approx(160, abs=45)], out


def test_conversational_plans_talk_half_the_time_at_every_moment() -> None:
    """Independent callers seen from any moment: about half talk, from the window's first
    seconds to its last, not a burst of first sentences (56 % talking 4-8 s in before
    2026-12-04, 5 % in the first 2 s); and every plan stays inside its window."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    durations = [0.8, 1.2, 1.6, 2.0, 2.5, 3.0, 3.5, 3.9, 4.5]
    seconds, step = 24.0, 0.04
    grid = np.arange(0, seconds, step)
    talking = np.zeros(len(grid))
    cut = 0
    plans = 1500
    for seed in range(plans):
        plan = load.make_plan("conversational", durations, seconds, seed)
        for u in plan:
            assert 1.0 <= durations[u.index] <= 4.0  # the conversation's sentences
            assert u.skip + u.length <= durations[u.index] + 1e-9 and u.length > 0
            assert u.start >= load.LEAD_SECONDS and u.start + u.length <= seconds - 0.2 + 1e-9
            talking += (grid >= u.start) & (grid < u.start + u.length)
        cut += not plan[0].onset
        starts = [u.start for u in plan]
        assert starts == sorted(starts)
    share = talking / plans
    for begin in np.arange(2.0, seconds - 2.0, 2.0):
        window = share[(grid >= begin) & (grid < begin + 2.0)].mean()
        assert 0.45 < window < 0.55, (begin, window)
    assert share[(grid >= load.LEAD_SECONDS) & (grid < load.LEAD_SECONDS + 0.5)].mean() > 0.4  # talking from the start
    assert 0.35 < cut / plans < 0.65  # about half join mid-sentence
    # all talking: whole sentences, one after another with a short pause
    plan = load.make_plan("all", durations, seconds, 3)
    assert all(u.onset and u.length == durations[u.index] for u in plan)
    for a, b in zip(plan, plan[1:], strict=False):
        assert b.start == pytest.approx(a.start + a.length + load.PAUSE_ALL, abs=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # --client-nice takes 0-19 (what os.nice can add without privileges)
        (["--client-nice", "-1"], "--client-nice"),
        (["--client-nice", "20"], "--client-nice"),
        (["--client-nice", "x"], "--client-nice"),
        (["--client-cpus", "x"], "not a CPU list"),
        (["--client-cpus", "0-"], "not a CPU list"),
        (["--client-cpus", "4096"], "are not this process's to use"),
        (["--server-cpus", "0"], "--server-cpus goes with --spawn-server"),
    ],
)
def test_bad_client_placement_is_refused_before_anything_starts(argv: list[str], message: str, capsys) -> None:
    """A niceness or CPU list the clients or the server cannot take exits 2, naming what is
    wrong, before a client is started."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    with pytest.raises(SystemExit) as stopped:
        load.parse_args(["--sessions", "1", *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_echo_delay_finds_the_returned_utterance_to_a_step() -> None:
    """The returned audio's delay by envelope cross-correlation: the sent utterance comes back at
    another rate, quieter, with noise and other speech before it; found to within one step (2 ms).
    Noise alone is not an echo."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    rng = np.random.default_rng(3)
    t = np.arange(int(1.2 * 16000)) / 16000
    syllables = np.clip(np.sin(2 * np.pi * 3.3 * t + rng.uniform(0, 6)), 0, None) ** 2  # ~3 per second
    sent = (0.5 * syllables * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    for delay in (0.137, 0.2584, 0.9):
        returned = 0.01 * rng.standard_normal(int(3.5 * 48000)).astype(np.float32)
        at = int((0.4 + delay) * 48000)
        returned[at : at + 3 * len(sent)] += 0.4 * np.repeat(sent, 3)  # 48 kHz
        returned[: int(0.3 * 48000)] += 0.3 * np.sin(2 * np.pi * 240 * np.arange(int(0.3 * 48000)) / 48000)
        found = load.echo_delay(sent, 16000, returned, 48000, 0.4, 1.5)
        assert found is not None and abs(found[0] - delay) <= load.ECHO_STEP, (delay, found)
        assert found[1] > 0.9
    noise = 0.1 * rng.standard_normal(int(3.5 * 48000)).astype(np.float32)
    assert load.echo_delay(sent, 16000, noise, 48000, 0.4, 1.5) is None
    assert load.echo_delay(sent, 16000, noise[:48000], 48000, 0.4, 1.5) is None  # too little returned


@pytest.mark.parametrize("windows", ["trimmed,crop:5", "cropped:abc", "cropped:0.1", "cropped:31"])
def test_whisper_agreement_refuses_unknown_windows_before_loading_anything(windows: str, capsys) -> None:
    """bench/whisper_agreement.py: a --windows kind it does not know (before, any unknown kind ran
    as trimmed) is refused with exit 2, naming it, before the audio or weights are read."""
    from bench import whisper_agreement

    with pytest.raises(SystemExit) as exit_info:
        whisper_agreement.main(["--whisper-dir", "/nonexistent", "--audio", "/nonexistent.wav", "--windows", windows])
    assert exit_info.value.code == 2 and "is not padded, trimmed or cropped:SECONDS" in capsys.readouterr().err
    assert whisper_agreement.window_kinds("padded,cropped:5") == [("padded", None), ("cropped:5", 250)]


def test_gil_release_cost_times_every_step_alone_and_beside_a_rival(capsys) -> None:
    """bench/gil_release_cost.py prints each per-chunk step's cost alone and beside a thread
    that wants the GIL; it refuses zero calls with exit 2."""
    from bench import gil_release_cost

    assert gil_release_cost.main(["--calls", "30"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "(PyAV)" in line or "(numpy" in line or "(polyphase)" in line]
    assert len(rows) == 5 and all(len(row.split()) >= 3 for row in rows)
    with pytest.raises(SystemExit) as exit_info:
        gil_release_cost.main(["--calls", "0"])
    assert exit_info.value.code == 2 and "--calls must be >= 1" in capsys.readouterr().err


def test_a_spawned_server_that_ended_is_reported_with_its_signal_or_code() -> None:
    """bench/load.py checks its server before each scenario: one that died (a crash between two
    scenarios) stops the run with how it ended, instead of clients failing to connect."""
    sys.path.insert(0, str(ROOT / "bench"))
    import load

    server = object.__new__(load.SpawnedServer)
    server.process = None
    assert server.gone() is None
    for code, said in (
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
        ("raise SystemExit(3)", "exited with code 3"),
    ):
        server.process = subprocess.Popen([sys.executable, "-c", code])
        server.process.wait(timeout=60)
        assert server.gone() == said
    server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert server.gone() is None
    finally:
        server.process.kill()
        server.process.wait()
