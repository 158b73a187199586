"""A microphone delayed on its way catches up with real time in its pauses, never in its speech."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.audio.catch_up import MAX_LEAD_SECONDS, QUIET_SECONDS, SETTLE_SECONDS, PauseShortener
from tests.speech import espeak

RATE = 48000
CHUNK = RATE // 50  # 20 ms: what a browser's Opus packet decodes to


@pytest.fixture(scope="module")
def word() -> np.ndarray:
    audio, _ = espeak("hello there, how are you", sample_rate=RATE)
    return audio


def room(seconds: float, seed: int = 0) -> np.ndarray:
    """A quiet room: low noise, not digital silence (a real microphone never sends zeros)."""
    return (np.random.default_rng(seed).standard_normal(int(seconds * RATE)) * 3e-4).astype(np.float32)


def chunks(audio: np.ndarray) -> list[np.ndarray]:
    """20 ms stereo planar chunks, as aiortc decodes a browser's microphone."""
    whole = len(audio) - len(audio) % CHUNK
    return [np.stack([audio[i : i + CHUNK]] * 2) for i in range(0, whole, CHUNK)]


def feed(shortener: PauseShortener, pieces: list[np.ndarray], lead: float, rate: int = RATE, start: float = 0.0) -> list[bool]:
    """A steady stream: each piece arrives as the clock reaches it, so the lead holds at ``lead``
    (less what was left out)."""
    decisions, now = [], start
    for piece in pieces:
        decision = shortener.leave_out(piece, rate, lead, now)
        decisions.append(decision)
        lead -= piece.shape[1] / rate if decision else 0.0
        now += piece.shape[1] / rate
    return decisions


def test_speech_is_never_left_out_however_far_ahead(word: np.ndarray) -> None:
    shortener = PauseShortener(settle_seconds=0.0)
    feed(shortener, chunks(room(1.0)), lead=0.0)  # a long pause before
    decisions = [shortener.leave_out(chunk, RATE, 5.0, 1.0) for chunk in chunks(word)]
    assert sum(decisions) <= 2  # at most a chunk of the silence espeak leaves around a word edge
    assert not any(decisions[5:-5])


def test_a_pause_plays_its_first_part_then_is_shortened_while_ahead() -> None:
    shortener = PauseShortener(settle_seconds=0.0)
    decisions = feed(shortener, chunks(room(1.0)), lead=0.3)
    kept_first = decisions.index(True)
    assert kept_first * CHUNK / RATE == pytest.approx(QUIET_SECONDS, abs=0.021)
    assert sum(decisions) == round((0.3 - MAX_LEAD_SECONDS) / 0.02)  # down to the allowance, no further
    assert all(decisions[kept_first : kept_first + sum(decisions)])


def test_nothing_is_left_out_at_real_time_or_past_what_is_ahead() -> None:
    shortener = PauseShortener(settle_seconds=0.0)
    assert not any(feed(shortener, chunks(room(1.0)), lead=MAX_LEAD_SECONDS))
    # ahead by less than a chunk: leaving it out would make the clock wait for audio (and pad)
    big = np.stack([room(0.1)] * 2)
    assert not shortener.leave_out(big, RATE, 0.09, 1.0)
    assert shortener.leave_out(big, RATE, 0.11, 1.1)


def test_a_one_off_stall_is_given_back_once_settled_a_jittery_link_keeps_its_room() -> None:
    """A burst makes the lead jump: after a one-off, the pause is shortened from 2 s on; a link
    whose packets come in bursts every second keeps the lead as jitter room."""
    once = PauseShortener()
    decisions = feed(once, chunks(room(0.1)), lead=0.0)
    decisions += feed(once, chunks(room(4.0)), lead=0.3, start=0.1)  # jumped from 0 to 0.3 at 0.1 s
    first = decisions.index(True)
    assert first * 0.02 == pytest.approx(0.1 + SETTLE_SECONDS, abs=0.03)

    jittery = PauseShortener()
    lead, left_out = 0.1, 0
    for second in range(6):
        pieces = chunks(room(1.0, seed=second))
        left_out += sum(feed(jittery, pieces[:1], lead=lead + 0.1, start=second))  # a burst: +0.1
        lead += 0.1
        left_out += sum(feed(jittery, pieces[1:], lead=lead, start=second + 0.02))
    assert left_out == 0


def test_any_rate_is_judged(word: np.ndarray) -> None:
    """44.1 kHz (no rate webrtcvad takes): speech kept, a long pause shortened."""
    at44 = np.interp(np.arange(len(word) * 441 // 480) * (480 / 441), np.arange(len(word)), word).astype(np.float32)
    shortener = PauseShortener(settle_seconds=0.0)
    step = 882  # 20 ms
    pause = [room(1.0)[None, i : i + step] for i in range(0, 44100 - step, step)]
    speech = [at44[None, i : i + step] for i in range(0, len(at44) - step, step)]
    assert any(feed(shortener, pause, lead=0.3, rate=44100))
    assert not any(feed(shortener, speech[5:-5], lead=5.0, rate=44100, start=1.0))
    assert not shortener.leave_out(np.zeros((1, 100), np.float32), 44100, 5.0, 3.0)  # too short to judge


# --- a live session fed by a microphone that stalls once ----------------------------------------

STALL = 0.3  # seconds of microphone audio that arrive in one burst, late
PAUSE = 2.5  # between the words: long enough to settle after the stall, then catch up
JITTER = 0.02


async def call(demo_avatar, word: np.ndarray, catch_up: bool):  # noqa: ANN001, ANN201
    """Pushes a microphone in real time: a word, a stall in its middle (its audio then comes at
    once), a 2.5 s pause and a second word. What the second word's frames show: the session's
    lead over real time at the end, its frames' latency, and the frames themselves."""
    from pipeline.engines.lite import LiteEngine
    from pipeline.live.session import LiveSession
    from pipeline.live.worker import EngineWorker

    engine = LiteEngine()
    worker = EngineWorker(engine, batch_size=8, name="cpu")
    session = LiveSession(
        demo_avatar, worker, engine.new_featurizer(), jitter_seconds=JITTER, processing_seconds=0.05,
        live_catch_up=catch_up,
    )
    frames = session.subscribe()
    out: list = []

    async def watch() -> None:  # a viewer: drains the frames as they come
        while (frame := await frames.get()) is not None:
            out.append(frame)

    session.start()
    viewer = asyncio.create_task(watch())
    loop = asyncio.get_running_loop()
    first, stall_at = chunks(np.concatenate([room(0.5), word])), 25 + 15  # the stall: inside the word
    second = chunks(np.concatenate([room(PAUSE, seed=1), word, room(0.6, seed=2)]))
    second_word_from = len(chunks(room(PAUSE)))
    plan = first + second
    start = loop.time()
    latencies_second_word: list[float] = []
    try:
        for k, chunk in enumerate(plan):
            due = start + k * 0.02
            if stall_at <= k < stall_at + STALL / 0.02:
                continue  # held on the way: sent with the first chunk after the stall
            await asyncio.sleep(max(0.0, due - loop.time()))
            if k == stall_at + STALL / 0.02:
                for held in plan[stall_at:k]:
                    session.push(held, RATE, "stereo", live=True)
            session.push(chunk, RATE, "stereo", live=True)
            if k == len(first) + second_word_from:
                session.stats.latencies.clear()  # from here on: the second word's frames
        lead = session.timeline_end_seconds - (loop.time() - session.t0)
        await asyncio.sleep(session.delay + 0.1)
        latencies_second_word = list(session.stats.latencies)
        aligned = (session._out_start + len(session._out_audio)) - 3 * session.timeline_end_seconds * 16000
    finally:
        await session.close()
        await viewer
        worker.close()
    return lead, float(np.median(latencies_second_word)), session.stats, out, aligned


def test_a_stalled_microphone_catches_up_in_its_next_pause(demo_avatar, word: np.ndarray) -> None:
    lead, latency, stats, frames, aligned = asyncio.run(call(demo_avatar, word, catch_up=True))
    behind, latency_behind, stats_behind, _, _ = asyncio.run(call(demo_avatar, word, catch_up=False))

    # without: the stall (less the jitter allowance) stays in every later frame's latency
    assert behind > STALL - JITTER - 0.05
    assert latency_behind > latency + STALL - JITTER - 0.06
    assert stats_behind.shortened_seconds == 0
    # with: back within the allowance, by leaving out about the stall's worth of the pause
    assert lead <= MAX_LEAD_SECONDS + 0.01
    assert STALL - JITTER - 0.06 <= stats.shortened_seconds <= PAUSE - SETTLE_SECONDS
    # picture and sound lost the same span: the 48 kHz output audio stays level with the 16 kHz
    # timeline the frames are made from (within the resamplers' delays), and the second word's
    # first loud frame is the one its mouth opens on
    assert abs(aligned) < 1920 / 4
    loud = [f.index for f in frames if np.abs(f.audio).max() > 3000]
    speaking = [f.index for f in frames if f.speaking]
    second_loud = next(i for a, i in zip(loud, loud[1:]) if i - a > 20)
    second_speaking = next(i for a, i in zip(speaking, speaking[1:]) if i - a > 20)
    assert abs(second_loud - second_speaking) <= 2


# --- over the audio WebSocket: only a producer that says it relays live audio ---------------------


@pytest.mark.parametrize("live", [True, False])
def test_a_websocket_producer_catches_up_only_when_it_says_live(avatars_root, live: bool) -> None:
    """1 s of a quiet room sent at once, then 4 s more in real time, in 20 ms messages: a live
    relay is 1 s behind real time after the burst and, once on time for 2 s, leaves out that
    much of the pause; a TTS's audio is buffered, all of it."""
    import time

    from tests.live_server import ready_test_client

    pcm = (np.clip(room(5.0)[::3], -1, 1) * 32767).astype(np.int16)  # 16 kHz
    with ready_test_client(avatars_root) as http:
        session = http.post("/v1/sessions", json={}).json()["id"]
        with http.websocket_connect(f"/v1/sessions/{session}/audio") as ws:
            ws.send_json({"type": "start", "format": "pcm_s16le", "sample_rate": 16000, "channels": 1, "live": live})
            ready = ws.receive_json()
            assert ready["type"] == "ready" and ready["format"].get("live", False) is live
            began = time.monotonic()
            for k, start in enumerate(range(0, len(pcm), 320)):
                if k >= 50:  # after the first second's burst: one 20 ms message every 20 ms
                    time.sleep(max(0.0, began + (k - 50) * 0.02 - time.monotonic()))
                ws.send_bytes(pcm[start : start + 320].tobytes())
            ws.send_json({"type": "ping"})
            while ws.receive_json()["type"] != "pong":
                pass
            stats = http.get(f"/v1/sessions/{session}").json()["stats"]
        metrics = http.get("/metrics").text
        http.delete(f"/v1/sessions/{session}")
    counted = next(line for line in metrics.splitlines() if line.startswith("lipstream_input_shortened_seconds_total"))
    assert float(counted.split()[-1]) == pytest.approx(stats["shortened_seconds"], abs=0.001)
    if live:
        assert 0.8 <= stats["shortened_seconds"] <= 1.0
        assert stats["buffered_seconds"] < 0.3
    else:
        assert stats["shortened_seconds"] == 0
        assert stats["buffered_seconds"] > 0.8
