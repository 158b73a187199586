"""End to end: espeak speech -> the real lite engine on the demo avatar -> an MP4 whose mouth moves.

The one test that would catch a pipeline that is "correct" in every unit but produces a still
face: it decodes the file a user would get and measures motion in the mouth region, which must
be still during the silences around the speech and clearly moving during it.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.render import render_to_file
from tests.speech import SpeechClip

pytestmark = pytest.mark.slow

MOUTH = slice(48, 68)  # iBUG 68-point indices of the outer and inner lips
PAD = 12  # pixels around the lips' bounding box: the jaw opens below it


def test_lite_render_moves_the_mouth_only_during_speech(
    tmp_path: Path, demo_avatar, speech: SpeechClip
) -> None:
    from pipeline.engines.registry import create_engine

    engine = create_engine("lite")
    out = tmp_path / "talk.mp4"
    try:
        result = render_to_file(demo_avatar, speech.path, out, engine)
    finally:
        engine.close()

    expected_frames = len(speech.samples) * 25 // speech.sample_rate  # floor(duration * 25)
    assert result.frames == expected_frames
    assert result.active_frames > 0

    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert abs(float(audio.duration * audio.time_base) - speech.duration) <= 0.04  # one frame
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    assert len(frames) == expected_frames

    # Mouth region of the avatar frame each output frame was built on (the demo is a still, but
    # take the per-frame landmarks so the test stays right for video avatars).
    height, width = frames[0].shape[:2]
    lips = demo_avatar.landmarks[:, MOUTH]
    x1 = max(int(lips[..., 0].min()) - PAD, 0)
    y1 = max(int(lips[..., 1].min()) - PAD, 0)
    x2 = min(int(np.ceil(lips[..., 0].max())) + PAD, width)
    y2 = min(int(np.ceil(lips[..., 1].max())) + 2 * PAD, height)
    mouth = np.stack([f[y1:y2, x1:x2].astype(np.float32) for f in frames])

    from_first = np.abs(mouth - mouth[0]).mean(axis=(1, 2, 3))  # [frames]
    step = np.concatenate([[0.0], np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2, 3))])

    t0 = np.arange(len(frames)) / 25.0  # frame i covers [t0, t0 + 40 ms)
    lead = (t0 + 0.04) <= speech.speech_start - 0.2
    trail = t0 >= speech.speech_end + 0.4
    silent = lead | trail
    speaking = (t0 >= speech.speech_start) & ((t0 + 0.04) <= speech.speech_end)
    assert lead.sum() >= 15 and trail.sum() >= 10 and speaking.sum() >= 50

    lead_rest, trail_rest = from_first[lead].mean(), from_first[trail].mean()
    speaking_from_first = from_first[speaking].mean()
    silent_step, speaking_step = step[silent].mean(), step[speaking].mean()
    report = (
        f"difference from the first frame: lead silence {lead_rest:.3f}, speech "
        f"{speaking_from_first:.3f}, trail silence {trail_rest:.3f}; frame-to-frame: silence "
        f"{silent_step:.3f}, speech {speaking_step:.3f}"
    )
    # Silence: the idle avatar, still. Before any speech only H.264 noise separates the frames
    # from the first; after speech, x264 may keep some residue of the last mouth shape in
    # skipped blocks until the next keyframe, so there the bound is relative to the speech.
    assert lead_rest < 1.0, report
    assert silent_step < 0.5, report
    # Speech: the mouth is away from rest and keeps moving (an engine that returns one constant
    # face moves it once and then fails the frame-to-frame bound).
    assert speaking_from_first > max(5 * lead_rest, 2.0), report
    assert speaking_step > max(5 * silent_step, 0.5), report
    assert (from_first[speaking] > 1.0).mean() > 0.5, report  # most speech frames, not outliers
    # Back to rest after the speech.
    assert trail_rest < max(0.3 * speaking_from_first, 1.0), report
