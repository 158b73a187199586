"""A WebRTC client for tests, on loopback only: sends speech as a microphone, records what returns.

Timing is measured the way a player synchronises: each received RTP stream's timestamps are
mapped to the sender's wall clock. aiortc does not expose RTCP sender reports, so the mapping is
estimated from packet arrivals on loopback: ``offset = min(arrival - rtp_time)`` over packets
(the least-delayed packet), which is what a sender report states up to network delay, i.e. ~0
here. Decoded frames carry their RTP timestamp as pts, so every frame and audio sample gets a
send time on one clock, independent of the receiver's jitter buffers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from fractions import Fraction

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from server.webrtc import configure_host_addresses

RATE = 48000
CHUNK = 960  # 20 ms

# Tests keep every packet on loopback: aioice would otherwise offer only this machine's other
# interfaces (it skips 127.0.0.1), and the server, configured loopback-only, drops those.
configure_host_addresses(["127.0.0.1"])


class SpeechTrack(MediaStreamTrack):
    """A microphone that plays ``samples`` (48 kHz mono float32) in real time, then silence."""

    kind = "audio"

    def __init__(self, samples: np.ndarray, start_delay: float = 0.0) -> None:
        super().__init__()
        self.samples = samples
        self.start_delay = start_delay
        self._index = 0
        self._t0: float | None = None
        self.started_at: float | None = None  # wall time the first sample was sent

    async def recv(self) -> av.AudioFrame:
        if self._t0 is None:
            self._t0 = time.monotonic() + self.start_delay
        due = self._t0 + self._index * CHUNK / RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        start = self._index * CHUNK
        chunk = self.samples[start : start + CHUNK]
        if len(chunk) < CHUNK:
            chunk = np.pad(chunk, (0, CHUNK - len(chunk)))
        if self._index == 0:
            self.started_at = time.monotonic()
        pcm = np.clip(chunk * 32767, -32768, 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = start
        frame.time_base = Fraction(1, RATE)
        self._index += 1
        return frame


@dataclass
class StreamClock:
    """RTP timestamp -> sender wall time, from the least-delayed packet seen."""

    clock_rate: int
    offset: float | None = None
    _origin: int | None = None
    mapper: object | None = None  # the receiver's TimestampMapper: decoded pts = rtp - its origin
    #: when the first packet of each (unwrapped) RTP timestamp arrived: a frame's network arrival,
    #: before the jitter buffer and the decoder
    first_arrival: dict[int, float] = field(default_factory=dict)

    def unwrap(self, timestamp: int) -> int:
        if self._origin is None:
            self._origin = timestamp
        diff = (timestamp - self._origin) % (1 << 32)
        return diff - (1 << 32) if diff > (1 << 31) else diff

    def observe(self, timestamp: int, arrival: float) -> None:
        unwrapped = self.unwrap(timestamp)
        self.first_arrival.setdefault(unwrapped, arrival)
        candidate = arrival - unwrapped / self.clock_rate
        self.offset = candidate if self.offset is None else min(self.offset, candidate)

    def wall(self, timestamp: int) -> float:
        """Sender wall time of an RTP timestamp."""
        assert self.offset is not None, "no packet seen"
        return self.unwrap(timestamp) / self.clock_rate + self.offset

    def rtp(self, pts: int) -> int:
        """The RTP timestamp of a decoded frame (aiortc rebases pts to its first frame)."""
        origin = self.mapper._origin  # type: ignore[union-attr]
        return (pts + origin) % (1 << 32)

    def wall_of_pts(self, pts: int) -> float:
        return self.wall(self.rtp(pts))


@dataclass
class Recording:
    video_pts: list[int] = field(default_factory=list)
    video_arrival: list[float] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # BGR crops of the region of interest
    audio_pts: list[int] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # mono float32 chunks at 48 kHz
    video_clock: StreamClock = field(default_factory=lambda: StreamClock(90000))
    audio_clock: StreamClock = field(default_factory=lambda: StreamClock(RATE))

    def video_times(self) -> np.ndarray:
        return np.array([self.video_clock.wall_of_pts(p) for p in self.video_pts])

    def audio_signal(self) -> tuple[np.ndarray, float]:
        """The received audio laid on the sender clock: (samples, wall time of sample 0)."""
        if not self.audio:
            return np.zeros(0, np.float32), 0.0
        starts = [self.audio_clock.unwrap(self.audio_clock.rtp(p)) for p in self.audio_pts]
        total = max(s + len(a) for s, a in zip(starts, self.audio, strict=True)) - starts[0]
        signal = np.zeros(total, np.float32)
        for s, a in zip(starts, self.audio, strict=True):
            signal[s - starts[0] : s - starts[0] + len(a)] = a
        return signal, self.audio_clock.wall_of_pts(self.audio_pts[0])


def _hook_rtp(receiver, clock: StreamClock) -> None:
    """Observe every RTP packet's arrival before the jitter buffer holds it back."""
    clock.mapper = receiver._RTCRtpReceiver__timestamp_mapper
    original = receiver._handle_rtp_packet

    async def handle(packet, arrival_time_ms):  # noqa: ANN001
        clock.observe(packet.timestamp, time.monotonic())
        return await original(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle


class Client:
    """One peer connection to the server, recording the tracks it receives."""

    def __init__(self, roi: tuple[int, int, int, int] | None = None) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.roi = roi  # (x1, y1, x2, y2) of received video to keep
        self.recording = Recording()
        self._tasks: list[asyncio.Task] = []
        self.full_frames: list[np.ndarray] = []  # a few whole frames, for looking at
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        for transceiver in self.pc.getTransceivers():
            if transceiver.receiver.track is track:
                clock = self.recording.video_clock if track.kind == "video" else self.recording.audio_clock
                _hook_rtp(transceiver.receiver, clock)
        reader = self._read_video if track.kind == "video" else self._read_audio
        self._tasks.append(asyncio.ensure_future(reader(track)))

    async def _frames(self, track: MediaStreamTrack):
        """Every frame of a received track until it ends."""
        while True:
            try:
                yield await track.recv()
            except MediaStreamError:
                return

    async def _read_video(self, track: MediaStreamTrack) -> None:
        rec = self.recording
        async for frame in self._frames(track):
            image = frame.to_ndarray(format="bgr24")
            if len(self.full_frames) < 3 or len(rec.frames) % 25 == 0:
                self.full_frames = (self.full_frames + [image])[-5:]
            if self.roi is not None:
                x1, y1, x2, y2 = self.roi
                image = image[y1:y2, x1:x2].copy()
            rec.video_pts.append(frame.pts)
            rec.video_arrival.append(time.monotonic())
            rec.frames.append(image)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        rec = self.recording
        async for frame in self._frames(track):
            data = frame.to_ndarray().astype(np.float32) / 32768.0
            channels = len(frame.layout.channels)
            mono = data.reshape(-1, channels).mean(axis=1) if not frame.format.is_planar else data.mean(axis=0)
            rec.audio_pts.append(frame.pts)
            rec.audio.append(mono)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def call(self, http: httpx.AsyncClient, microphone: MediaStreamTrack, **extra) -> str:
        """The call page's flow: microphone in, avatar back; returns the session id."""
        self.pc.addTrack(microphone)
        self.pc.addTransceiver("video", direction="recvonly")
        response = await http.post("/v1/calls", json={"sdp": await self.offer(), "type": "offer", **extra})
        response.raise_for_status()
        body = response.json()
        await self.accept(body["sdp"])
        return body["session_id"]

    async def watch(self, http: httpx.AsyncClient, session_id: str) -> str:
        """WHEP: receive a session's video and audio; returns the viewer's Location."""
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        response = await http.post(
            f"/v1/sessions/{session_id}/whep", content=await self.offer(), headers={"content-type": "application/sdp"}
        )
        assert response.status_code == 201, response.text
        await self.accept(response.text)
        return response.headers["location"]

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()


# ---------------------------------------------------------------------------------- analysis
def motion(frames: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each frame's region from the resting mouth."""
    ref = reference.astype(np.int16)
    return np.array([np.abs(f.astype(np.int16) - ref).mean() for f in frames])


def envelope(signal: np.ndarray, rate: int = RATE, step: float = 0.01) -> np.ndarray:
    n = int(rate * step)
    usable = len(signal) // n * n
    return np.sqrt((signal[:usable].reshape(-1, n) ** 2).mean(axis=1))


def onsets(values: np.ndarray, times: np.ndarray, threshold: float, min_gap: float = 0.3) -> list[float]:
    """Times where ``values`` rise above ``threshold`` after at least ``min_gap`` s below it."""
    found: list[float] = []
    last_above = -np.inf
    for value, t in zip(values, times, strict=True):
        if value > threshold:
            if t - last_above > min_gap:
                found.append(float(t))
            last_above = t
    return found
