"""Streaming voice activity detection with webrtcvad (10 ms decisions on 16 kHz audio)."""

from __future__ import annotations

import numpy as np
import webrtcvad

SAMPLE_RATE = 16000
VAD_FRAME = 160  # 10 ms at 16 kHz: the finest step webrtcvad accepts


class StreamingVad:
    """Feeds audio in any chunk size, keeps one speech flag per 10 ms of audio received."""

    def __init__(self, aggressiveness: int = 2) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError("VAD aggressiveness must be 0..3")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._pending = np.zeros(0, dtype=np.int16)
        self.flags: list[bool] = []  # flags[k] covers samples [160k, 160k + 160)

    def push(self, samples: np.ndarray) -> None:
        pcm = np.clip(samples * 32768.0, -32768, 32767).astype(np.int16)
        data = np.concatenate([self._pending, pcm])
        whole = len(data) - len(data) % VAD_FRAME
        for start in range(0, whole, VAD_FRAME):
            chunk = data[start : start + VAD_FRAME]
            self.flags.append(bool(chunk.any()) and self._vad.is_speech(chunk.tobytes(), SAMPLE_RATE))
        self._pending = data[whole:]

    def speech_between(self, start_sample: int, end_sample: int) -> bool:
        """True if any 10 ms block overlapping [start, end) was speech (blocks not yet seen: no)."""
        first = max(0, start_sample // VAD_FRAME)
        last = min(len(self.flags), -(-end_sample // VAD_FRAME))
        return any(self.flags[first:last])

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)
        self.flags.clear()
