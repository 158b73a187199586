"""WebRTC plumbing over aiortc: peers from config, SDP checks, and tracks fed by a live session.

The outgoing tracks release frame ``i`` of the session at its scheduled time on the session
clock, video and audio alike, so RTCP sender reports map both RTP clocks to the same wall
clock and the receiver plays them in sync. A frame of an older interrupt epoch becomes the idle
picture and silence at release time, which is what makes an interrupt visible within a frame.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable
from fractions import Fraction

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from pipeline.audio.decode import frame_to_planar, layout_name
from pipeline.errors import InputError, LipstreamError
from pipeline.live.session import (
    FRAME_SECONDS,
    OUTPUT_RATE,
    OUTPUT_SAMPLES_PER_FRAME,
    LiveSession,
    OutputFrame,
)
from server.config import WebRtcConfig

log = logging.getLogger("lipstream.webrtc")

VIDEO_CLOCK = 90000
AUDIO_CHUNK = OUTPUT_SAMPLES_PER_FRAME // 2  # 20 ms, Opus' frame


class BadSdp(InputError):
    pass


# ---------------------------------------------------------------------------------- ICE set-up
_original_host_addresses = aioice.ice.get_host_addresses
_original_request_received = aioice.ice.Connection.request_received


def configure_host_addresses(addresses: list[str]) -> None:
    """Restrict ICE to ``addresses`` (aioice otherwise takes every interface except loopback).

    Process-wide, because aioice reads these from module scope. When every address is
    loopback, incoming connectivity checks from other addresses are ignored too: a browser
    checks from all its sockets, and aioice would otherwise learn a peer-reflexive candidate
    on another interface and send checks back to it.
    """
    if not addresses:
        aioice.ice.get_host_addresses = _original_host_addresses
        aioice.ice.Connection.request_received = _original_request_received
        return

    def fixed(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = fixed
    if all(_is_loopback(a) for a in addresses):

        def loopback_requests_only(self, message, addr, protocol):  # noqa: ANN001
            if _is_loopback(addr[0]):
                _original_request_received(self, message, addr, protocol)

        aioice.ice.Connection.request_received = loopback_requests_only
    else:
        aioice.ice.Connection.request_received = _original_request_received


def loopback_only(config: WebRtcConfig) -> bool:
    return bool(config.host_addresses) and all(_is_loopback(a) for a in config.host_addresses)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def new_peer(config: WebRtcConfig) -> RTCPeerConnection:
    servers = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in config.ice_servers]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


def check_offer(sdp: str, config: WebRtcConfig) -> str:
    """A usable offer, or BadSdp with the reason. Off-loopback candidates are dropped when the
    server is configured loopback-only, so no check is ever sent off the machine."""
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadSdp("the offer has no SDP")
    lines = sdp.replace("\r\n", "\n").strip().split("\n")
    if lines[0] != "v=0":
        raise BadSdp("malformed SDP: it must start with 'v=0'")
    if not any(line.startswith("m=") for line in lines):
        raise BadSdp("malformed SDP: no media section (m=audio / m=video)")
    if not any(line.startswith("a=fingerprint:") for line in lines):
        raise BadSdp("malformed SDP: no DTLS fingerprint (a=fingerprint)")
    if loopback_only(config):
        lines = [line for line in lines if not _off_loopback_candidate(line)]
    return "\r\n".join(lines) + "\r\n"


def _off_loopback_candidate(line: str) -> bool:
    if not line.startswith("a=candidate:"):
        return False
    parts = line.split()
    return len(parts) < 5 or not _is_loopback(parts[4])


async def apply_offer(peer: RTCPeerConnection, offer_sdp: str) -> None:
    """Sets the remote offer; add outgoing tracks after this, then :func:`answer`."""
    try:
        await peer.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadSdp(f"malformed SDP offer: {exc}") from None


async def answer(peer: RTCPeerConnection) -> str:
    """The answer, with every candidate gathered (aiortc does not trickle)."""
    try:
        await peer.setLocalDescription(await peer.createAnswer())
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadSdp(f"cannot answer this offer: {exc}") from None
    return peer.localDescription.sdp


# ---------------------------------------------------------------------------------- input
async def pump_microphone(
    track: MediaStreamTrack, session: LiveSession, on_audio: Callable[[], None] | None = None
) -> None:
    """Feeds a remote audio track (a browser's microphone, a WHIP sender) into the session.

    ``on_audio`` is called per frame: a sender streams audio continuously (silence included),
    so a pause in its packets is how a peer that vanished without a goodbye is noticed, long
    before ICE consent would fail.
    """
    while not session.closed:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if on_audio is not None:
            on_audio()
        try:
            session.push(frame_to_planar(frame), frame.sample_rate, layout_name(frame.layout))
        except LipstreamError as exc:
            log.warning("microphone audio refused: %s", exc)


# ---------------------------------------------------------------------------------- output
async def output_picture(session: LiveSession, out: OutputFrame) -> np.ndarray:
    """Frame ``out``'s picture as every output shows it at its release time: the composed frame,
    or the idle frame if generating it failed or was cancelled, or if an interrupt (a newer
    epoch) superseded it. Shared by the WebRTC tracks and the RTMP/recording outputs."""
    image = out.image
    if isinstance(image, asyncio.Future):
        # wait() never raises for the awaited future, so a cancelled frame (interrupt)
        # cannot be mistaken for the caller being cancelled.
        await asyncio.wait([image])
        if image.cancelled() or image.exception() is not None:
            return session.idle_image(out)
        image = image.result()
    if out.epoch != session.epoch:
        return session.idle_image(out)
    return image


def output_audio(session: LiveSession, out: OutputFrame) -> np.ndarray:
    """Frame ``out``'s audio as outputs send it: silence if an interrupt superseded it."""
    if out.epoch != session.epoch:
        return np.zeros(OUTPUT_SAMPLES_PER_FRAME, np.int16)
    return out.audio


class _SessionTrack(MediaStreamTrack):
    """A subscription to a session's frames, released on the session clock."""

    def __init__(self, session: LiveSession, on_late: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.session = session
        self._on_late = on_late
        self._queue = session.subscribe()
        self.sent = 0
        self.late = 0
        self._sent_times: collections.deque[float] = collections.deque(maxlen=50)

    async def _next_output(self) -> OutputFrame:
        out = await self._queue.get()
        if out is None:
            self.stop()
            raise MediaStreamError
        return out

    async def _wait_until(self, release: float) -> None:
        delay = release - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

    def _mark_sent(self, release: float) -> None:
        now = asyncio.get_running_loop().time()
        if now - release > FRAME_SECONDS:
            self.late += 1
            if self._on_late is not None:
                self._on_late()
        self.sent += 1
        self._sent_times.append(time.monotonic())

    @property
    def fps(self) -> float:
        times = self._sent_times
        if len(times) < 2 or time.monotonic() - times[-1] > 1.0:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    def stop(self) -> None:
        super().stop()
        self.session.unsubscribe(self._queue)


class SessionVideoTrack(_SessionTrack):
    kind = "video"

    async def recv(self) -> av.VideoFrame:
        out = await self._next_output()
        await self._wait_until(out.release)
        image = await self._picture(out)
        self._mark_sent(out.release)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
        frame.pts = out.index * (VIDEO_CLOCK // 25)
        frame.time_base = Fraction(1, VIDEO_CLOCK)
        return frame

    async def _picture(self, out: OutputFrame) -> np.ndarray:
        return await output_picture(self.session, out)


class SessionAudioTrack(_SessionTrack):
    kind = "audio"

    def __init__(self, session: LiveSession) -> None:
        super().__init__(session, on_late=None)
        self._halves: collections.deque[tuple[OutputFrame, int]] = collections.deque()

    async def recv(self) -> av.AudioFrame:
        if not self._halves:
            out = await self._next_output()
            self._halves.extend([(out, 0), (out, 1)])
        out, half = self._halves.popleft()
        release = out.release + half * FRAME_SECONDS / 2
        await self._wait_until(release)
        chunk = output_audio(self.session, out)[half * AUDIO_CHUNK : (half + 1) * AUDIO_CHUNK]
        if half == 0:
            self._mark_sent(release)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = OUTPUT_RATE
        frame.pts = out.index * OUTPUT_SAMPLES_PER_FRAME + half * AUDIO_CHUNK
        frame.time_base = Fraction(1, OUTPUT_RATE)
        return frame
