"""Cuts a 16 kHz mono stream into per-video-frame audio windows, as soon as each is complete.

Video frame ``i`` (25 fps) starts at ``t_i = i * 40 ms`` and is driven by the audio window
``[t_i - 80 ms, t_i + 120 ms)`` (MuseTalk v1.5's Whisper window; the lite engine uses the same
one). So frame ``i`` can be computed once audio up to ``t_i + 120 ms`` has arrived: that 120 ms
lookahead is the floor of our audio-to-frame latency. Samples outside the stream read as zero.

The same class serves offline render (push everything, then :meth:`finish`) and live sessions
(push chunks as they arrive), so both produce identical frames for identical audio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.audio.vad import StreamingVad

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
WINDOW_BEFORE = 2 * SAMPLES_PER_FRAME  # 80 ms
WINDOW_AFTER = 3 * SAMPLES_PER_FRAME  # 120 ms past the frame start
WINDOW = WINDOW_BEFORE + WINDOW_AFTER  # 200 ms = 3200 samples
# VAD looks at the frame's own 40 ms plus one frame either side, so a syllable's edge is not
# cut by the 10 ms grid; smoothing in the featurizers handles the rest.
VAD_MARGIN = SAMPLES_PER_FRAME


def frame_count(n_samples: int) -> int:
    """Video frames for ``n_samples`` of 16 kHz audio: floor(duration * 25)."""
    return n_samples // SAMPLES_PER_FRAME


@dataclass(frozen=True)
class AudioFrame:
    index: int  # video frame number on the stream's clock
    window: np.ndarray  # float32 [WINDOW]: samples [t_i - 80 ms, t_i + 120 ms)
    speech: bool  # VAD found speech around this frame


class FrameWindower:
    """Accumulates a stream and emits each :class:`AudioFrame` once its lookahead is there."""

    def __init__(self, vad_aggressiveness: int = 2, first_frame: int = 0) -> None:
        """``first_frame``: the clock's frame number of this stream's sample 0 (a live session
        that restarts its input after an interrupt keeps counting frames on its own clock)."""
        self._vad = StreamingVad(vad_aggressiveness)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # stream sample index of _buffer[0]
        self._received = 0  # samples pushed so far
        self.next_frame = first_frame
        self._origin = first_frame  # frame index that stream sample 0 maps to

    @property
    def received_samples(self) -> int:
        return self._received

    def push(self, samples: np.ndarray) -> list[AudioFrame]:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._vad.push(samples)
        self._buffer = np.concatenate([self._buffer, samples])
        self._received += len(samples)
        return self._emit(final=False)

    def push_silence(self, n: int) -> list[AudioFrame]:
        """As ``push(np.zeros(n))``: the VAD skips the all-zero blocks."""
        n = max(0, int(n))
        self._vad.push_silence(n)
        self._buffer = np.concatenate([self._buffer, np.zeros(n, np.float32)])
        self._received += n
        return self._emit(final=False)

    def finish(self) -> list[AudioFrame]:
        """Emit the remaining frames of a stream that has ended (lookahead reads as silence)."""
        return self._emit(final=True)

    @property
    def origin(self) -> int:
        return self._origin

    def reset(self, first_frame: int | None = None) -> None:
        """Drop everything received (interrupt); the next stream starts at ``first_frame``
        (default: the next frame this windower would have emitted)."""
        self._vad.reset()
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0
        self._received = 0
        self.next_frame = self.next_frame if first_frame is None else first_frame
        self._origin = self.next_frame

    def _emit(self, final: bool) -> list[AudioFrame]:
        out: list[AudioFrame] = []
        total = frame_count(self._received) + self._origin
        while self.next_frame < total:
            local = self.next_frame - self._origin
            start = local * SAMPLES_PER_FRAME - WINDOW_BEFORE
            end = start + WINDOW
            if end > self._received and not final:
                break
            out.append(
                AudioFrame(
                    index=self.next_frame,
                    window=self._slice(start, end),
                    speech=self._vad.speech_between(
                        local * SAMPLES_PER_FRAME - VAD_MARGIN,
                        (local + 1) * SAMPLES_PER_FRAME + VAD_MARGIN,
                    ),
                )
            )
            self.next_frame += 1
        self._trim(self.next_frame - self._origin)
        return out

    def _slice(self, start: int, end: int) -> np.ndarray:
        window = np.zeros(WINDOW, dtype=np.float32)
        lo, hi = max(start, self._buffer_start), min(end, self._received)
        if hi > lo:
            window[lo - start : hi - start] = self._buffer[lo - self._buffer_start : hi - self._buffer_start]
        return window

    def _trim(self, next_local: int) -> None:
        keep_from = max(0, next_local * SAMPLES_PER_FRAME - WINDOW_BEFORE)
        drop = keep_from - self._buffer_start
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start = keep_from
        # the next frame's VAD question starts VAD_MARGIN before it, after keep_from
        self._vad.trim(keep_from)
