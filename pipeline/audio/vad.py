"""Streaming voice activity detection with webrtcvad (10 ms decisions on 16 kHz audio)."""

from __future__ import annotations

import numpy as np
import webrtcvad

SAMPLE_RATE = 16000
VAD_FRAME = 160  # 10 ms at 16 kHz: the finest step webrtcvad accepts


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as the int16 PCM webrtcvad reads (clipped, not wrapped)."""
    return np.clip(samples * 32768.0, -32768, 32767).astype(np.int16)


class StreamingVad:
    """Feeds audio in any chunk size, keeps one speech flag per 10 ms of audio received.

    Flags are kept only from the last :meth:`trim` on: a live session lasts as long as its
    caller likes (a kiosk for days), and one flag per 10 ms for ever grew by ~70 MB a day.
    """

    def __init__(self, aggressiveness: int = 2) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError("VAD aggressiveness must be 0..3")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._pending = np.zeros(0, dtype=np.int16)
        self.flags: list[bool] = []  # flags[k] covers samples [160 (first_block + k), ... + 160)
        self.first_block = 0  # blocks dropped by trim()

    def push(self, samples: np.ndarray) -> None:
        pcm = pcm16(samples)
        data = np.concatenate([self._pending, pcm])
        whole = len(data) - len(data) % VAD_FRAME
        for start in range(0, whole, VAD_FRAME):
            chunk = data[start : start + VAD_FRAME]
            self.flags.append(bool(chunk.any()) and self._vad.is_speech(chunk.tobytes(), SAMPLE_RATE))
        self._pending = data[whole:]

    def push_silence(self, n: int) -> None:
        """As ``push(np.zeros(n))``, without running the detector over blocks that are all zero
        (a live session pads every missing frame of its input with silence)."""
        if n <= 0:
            return
        if len(self._pending):  # the block that started with real samples is judged as a whole
            fill = min(n, VAD_FRAME - len(self._pending))
            self.push(np.zeros(fill, np.float32))
            n -= fill
        whole = n - n % VAD_FRAME
        self.flags.extend([False] * (whole // VAD_FRAME))
        self._pending = np.zeros(n - whole, dtype=np.int16)

    def speech_between(self, start_sample: int, end_sample: int) -> bool:
        """True if any 10 ms block overlapping [start, end) was speech (blocks not yet seen or
        trimmed: no)."""
        first = max(0, start_sample // VAD_FRAME - self.first_block)
        last = min(len(self.flags), -(-end_sample // VAD_FRAME) - self.first_block)
        return any(self.flags[first:last])

    def trim(self, before_sample: int) -> None:
        """Forget the blocks that end at or before ``before_sample`` (no later question reaches them)."""
        drop = min(len(self.flags), before_sample // VAD_FRAME - self.first_block)
        if drop > 0:
            del self.flags[:drop]
            self.first_block += drop

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)
        self.flags.clear()
        self.first_block = 0
