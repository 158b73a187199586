"""WebRTC plumbing over aiortc: ICE set-up, peers from config, SDP checks, and what a frame shows.

The peers themselves run in peer processes (:mod:`server.peer_process`); the server releases
frame ``i`` of a session at its scheduled time on the session clock (:mod:`server.peer_pool`),
video and audio alike, so RTCP sender reports map both RTP clocks to the same wall clock and
the receiver plays them in sync. A frame of an older interrupt epoch becomes the idle picture
and silence at release time, which is what makes an interrupt visible within a frame.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math

import aioice.ice
import aiortc.rtcrtpreceiver
import aiortc.rtp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from pipeline.errors import InputError
from pipeline.live.session import (
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


# ---------------------------------------------------------------------------- RTP audio level
def audio_level_dbov(frame: av.AudioFrame) -> int:
    """RFC 6465's level of an s16 frame in -dBov, as aiortc's ``compute_audio_level_dbov``
    computes it for the ssrc-audio-level header of every packet it sends, but in numpy.

    Why: aiortc's version is a Python loop over the samples, on the peer process's event loop:
    ~60 us per 20 ms frame on the development CPU, 50 times a second per session, and 13 % of
    the samples holding a peer process's GIL on an H200 (run 181148). This one takes ~5 us."""
    samples = np.frombuffer(frame.planes[0], dtype=np.int16).astype(np.int64)
    energy = float(np.dot(samples, samples))
    rms = math.sqrt(energy / (frame.samples * 32767 * 32767))
    return round(min(max(20 * math.log10(rms), -127), 0)) if rms > 0 else -127


def use_numpy_audio_level() -> None:
    """Make aiortc's senders in this process take :func:`audio_level_dbov` (they look it up in
    ``aiortc.rtp`` for every audio frame)."""
    aiortc.rtp.compute_audio_level_dbov = audio_level_dbov


# ------------------------------------------------------------------ microphone jitter buffer
_AiortcJitterBuffer = aiortc.rtcrtpreceiver.JitterBuffer


def limit_audio_prefetch(packets: int) -> None:
    """Make aiortc's audio receivers in this process hold ``packets`` 20 ms packets after the
    one they release (aiortc holds 4: 80 ms before a microphone's audio reaches the session).

    Why: that hold smooths playback on a speaker, which we have none of; the session has its
    own jitter allowance (``sessions.jitter_seconds``). Each packet held is 20 ms more between
    a caller's words and the avatar's mouth. Reordered packets are still put in order (the
    buffer waits for a missing one whatever the hold), and a lost one still costs what it did.
    Video receivers hold nothing in aiortc and are not touched."""

    class MicJitterBuffer(_AiortcJitterBuffer):
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
            super().__init__(capacity, prefetch if is_video else min(prefetch, packets), is_video)

    aiortc.rtcrtpreceiver.JitterBuffer = MicJitterBuffer


# ---------------------------------------------------------------------------------- output
async def output_picture(session: LiveSession, out: OutputFrame) -> np.ndarray:
    """Frame ``out``'s picture as every output shows it at its release time (see
    :func:`ready_picture`), once it is made. Shared by the WebRTC feeds and the RTMP/recording
    outputs."""
    pending = picture_pending(out)
    if pending is not None:
        # wait() never raises for the awaited future, so a cancelled frame (interrupt) cannot be
        # mistaken for the caller being cancelled. Only when not done: wait() costs a loop turn.
        await asyncio.wait([pending])
    return ready_picture(session, out)


def ready_picture(session: LiveSession, out: OutputFrame) -> np.ndarray:
    """Frame ``out``'s picture, which must be made (not a pending future): the composed frame, or
    the idle frame if generating it failed or was cancelled, or if an interrupt (a newer epoch)
    superseded it."""
    image = out.image
    if isinstance(image, asyncio.Future):
        if image.cancelled() or image.exception() is not None:
            return session.idle_image(out)
        image = image.result()
    if out.epoch != session.epoch:
        return session.idle_image(out)
    return image


def picture_pending(out: OutputFrame) -> asyncio.Future | None:
    """Frame ``out``'s picture future while it is still being made, else None."""
    image = out.image
    return image if isinstance(image, asyncio.Future) and not image.done() else None


def output_audio(session: LiveSession, out: OutputFrame) -> np.ndarray:
    """Frame ``out``'s audio as outputs send it: silence if an interrupt superseded it."""
    if out.epoch != session.epoch:
        return np.zeros(OUTPUT_SAMPLES_PER_FRAME, np.int16)
    return out.audio
