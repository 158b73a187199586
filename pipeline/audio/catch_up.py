"""Bringing a live input back to real time by leaving out part of its pauses.

A live source (a microphone over WebRTC) sends audio as it is spoken. A session lays each chunk
on its timeline after what it already has. When a chunk is later than the jitter allowance, the
session's clock fills the gap with silence; the late audio, when it comes, goes after that
silence. From then on everything the source says plays that much later than it was spoken, so
every stall (a network hiccup, a busy process, a client that stalled and then sent a burst) added
to the latency for good. On an H200 with 16 calls, the calls that connected first, while the
later ones were negotiating, ended up 70 ms behind the last ones (docs/benchmarks.md, "Load test
on the H200: findings", 2026-12-04, evening). WebRTC's own receivers shorten pauses for the same
reason.

This leaves out whole chunks of a pause while the input is ahead of real time, and only after
the pause has lasted ``quiet_seconds``: the ends of words and short gaps inside speech always
play. The lead is also the input's jitter room: a link whose packets keep coming late (a
mobile network) needs it, and shortening it would only make its next late packet open a gap in
the speech. So a lead is given back only once the input has been on time for
``settle_seconds``: a one-off stall is undone in the next pause after that, a jittery link keeps
what it built up. Speech is never cut or sped up, and the chunk is left out before resampling, so the
picture and the sound that leave the session lose the same span and stay in sync.

A source that pushes faster than real time on purpose (TTS over the WebSocket) is not live: its
audio is buffered and always played. A WebSocket producer that relays live audio (a phone
bridge) says so with ``"live": true`` in its start message.
"""

from __future__ import annotations

import math

import numpy as np
import webrtcvad

from pipeline.audio.vad import pcm16

#: Rates webrtcvad judges directly; a chunk at any other rate is judged at 16 kHz.
VAD_RATES = (8000, 16000, 32000, 48000)
#: How far the input may run ahead of real time before its pauses are shortened (s). A healthy
#: microphone's chunk arrives just as it is due (ahead by 0-20 ms); two 20 ms packets that come
#: together put it 40 ms ahead for an instant.
MAX_LEAD_SECONDS = 0.04
#: How long a pause plays in full before any of it is left out (s).
QUIET_SECONDS = 0.2
#: How long the input must have come on time (its lead not jumping) before a lead is given back (s).
SETTLE_SECONDS = 2.0


class PauseShortener:
    """Decides, chunk by chunk, which chunks of a live input's pauses to leave out."""

    def __init__(
        self,
        aggressiveness: int = 2,
        max_lead_seconds: float = MAX_LEAD_SECONDS,
        quiet_seconds: float = QUIET_SECONDS,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self.max_lead = max_lead_seconds
        self.quiet_needed = quiet_seconds
        self.settle = settle_seconds
        self._quiet = 0.0  # seconds of non-speech input in a row, up to the last chunk
        self._lead = 0.0  # the lead after the last chunk (left out or not)
        self._late_at = -math.inf  # when the input last came late (its lead jumped past max_lead)

    def leave_out(self, planar: np.ndarray, sample_rate: int, lead_seconds: float, now: float) -> bool:
        """Whether to leave out this chunk (float32 ``[channels, n]``), given how far ahead of
        real time the input would be with it (``lead_seconds``) at ``now`` (s, any clock).

        In a steady stream the lead holds still: each chunk adds what the clock took since the
        last. It jumps when audio comes late, after the clock filled its gap, or in a burst."""
        seconds = planar.shape[1] / sample_rate
        if lead_seconds > self.max_lead and lead_seconds - self._lead > seconds / 2:
            self._late_at = now
        quiet_before = self._quiet
        self._lead = lead_seconds
        if self._is_speech(planar, sample_rate):
            self._quiet = 0.0
            return False
        self._quiet += seconds
        if (
            quiet_before >= self.quiet_needed
            and lead_seconds > self.max_lead
            and lead_seconds - seconds >= 0.0  # never so much that the clock would wait for more
            and now - self._late_at >= self.settle
        ):
            self._lead = lead_seconds - seconds
            return True
        return False

    def _is_speech(self, planar: np.ndarray, sample_rate: int) -> bool:
        """Any 10 ms block of the chunk that webrtcvad calls speech; a chunk shorter than a
        block counts as speech (kept)."""
        mono = planar.mean(axis=0) if planar.shape[0] > 1 else planar[0]
        if sample_rate not in VAD_RATES:  # linear interpolation: plenty for a speech/pause call
            n = len(mono) * 16000 // sample_rate
            mono = np.interp(np.arange(n) * (sample_rate / 16000), np.arange(len(mono)), mono)
            sample_rate = 16000
        block = sample_rate // 100
        if len(mono) < block:
            return True
        pcm = pcm16(mono)
        if not pcm.any():
            return False
        whole = len(pcm) - len(pcm) % block
        return any(
            self._vad.is_speech(pcm[start : start + block].tobytes(), sample_rate) for start in range(0, whole, block)
        )
