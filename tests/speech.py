"""Test material made on the spot: espeak-ng speech with silence around it, and tones.

Nothing is downloaded and nothing comes from ../shared, so a fresh clone can run every test.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SpeechClip:
    path: Path
    sample_rate: int
    samples: np.ndarray  # float32 mono
    speech_start: float  # seconds: where espeak's speech was placed
    speech_end: float

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def espeak(text: str, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Speech from espeak-ng as float32 mono (its native 22050 Hz unless resampled)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed; `make test` installs it")
    raw = subprocess.run([exe, "--stdout", "-s", "150", text], check=True, capture_output=True).stdout
    with wave.open(io.BytesIO(raw)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    audio = pcm.astype(np.float32) / 32768.0
    # espeak pads its own output with a little silence; trim it so speech_start is exact.
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    audio = audio[loud[0] : loud[-1] + 1] if len(loud) else audio
    if sample_rate and sample_rate != rate:
        t_old = np.arange(len(audio)) / rate
        t_new = np.arange(int(len(audio) * sample_rate / rate)) / sample_rate
        audio = np.interp(t_new, t_old, audio).astype(np.float32)
        rate = sample_rate
    return audio, rate


def write_wav(path: Path, samples: np.ndarray, sample_rate: int, channels: int = 1) -> Path:
    pcm = np.clip(samples * 32767.0, -32768, 32767).astype(np.int16)
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


def speech_clip(
    path: Path,
    text: str = "Hello there. I am a talking avatar, and my lips move with my words.",
    silence_before: float = 1.0,
    silence_after: float = 1.0,
    sample_rate: int | None = None,
    channels: int = 1,
) -> SpeechClip:
    audio, rate = espeak(text, sample_rate)
    pre = np.zeros(int(silence_before * rate), dtype=np.float32)
    post = np.zeros(int(silence_after * rate), dtype=np.float32)
    samples = np.concatenate([pre, audio, post])
    write_wav(path, samples, rate, channels)
    return SpeechClip(path, rate, samples, silence_before, silence_before + len(audio) / rate)
