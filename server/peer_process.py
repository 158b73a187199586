"""A peer process: WebRTC peer connections, VP8/Opus encoding and RTP, away from the server's loop.

Why a separate process: measured on the lite engine (docs/design-notes.md, "Process model"),
a session's WebRTC output costs the server ~4x what generating its frames does: VP8 encoding,
RTP packetisation, SRTP and ICE run Python per packet, and all of it shared one event loop and
one GIL with the API, the session clocks and the engine's dispatch. The server keeps sessions,
clocks and engines; each peer process runs the peers of the sessions assigned to it. Per frame it
gets a message with a :class:`~pipeline.ipc.frame_ring.FrameRing` slot (the picture, in shared
memory) and the frame's 40 ms of audio, sent by the server at the frame's release time, and
hands them to every track of that session. Microphone audio goes the other way as PCM messages.

The commands (tuples, first item the kind):

- server -> process: ``open(request, peer, session, sdp, send_media, receive_audio)``,
  ``close(request, peer)``, ``ring(session, name, shape, slots, pixel_format)``, ``audio(session, index,
  pcm, release)``, ``frame(session, index, slot)``, ``drop(session)``, ``stop()``;
- process -> server: ``reply(request, error, value)``, ``state(peer, connection_state)``,
  ``mic(peer, planar, rate, layout)``.

``release`` is a ``time.monotonic()`` instant: CLOCK_MONOTONIC is one clock for every process
of the machine, so both processes agree on when a frame is due.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass, field
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from pipeline.audio.decode import frame_to_planar, layout_name
from pipeline.live.gc_pauses import freeze_startup
from pipeline.live.session import FRAME_SECONDS, OUTPUT_RATE
from server.config import WebRtcConfig
from pipeline.ipc.frame_ring import FrameRing
from pipeline.ipc.channel import Channel
from server.webrtc import (
    AUDIO_CHUNK,
    VIDEO_CLOCK,
    answer,
    apply_offer,
    configure_host_addresses,
    limit_audio_prefetch,
    new_peer,
    use_numpy_audio_level,
)

log = logging.getLogger("lipstream.peers")

QUEUE_FRAMES = 8  # frames a track may fall behind before the oldest is dropped (encoder overload)


class _QueueTrack(MediaStreamTrack):
    """An outgoing track fed by the process's message handler."""

    def __init__(self, feed: _Feed) -> None:
        super().__init__()
        self.feed = feed
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_FRAMES)
        self.dropped = 0

    def offer(self, item: Any) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)

    async def _next(self) -> Any:
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        return item

    def stop(self) -> None:
        super().stop()
        self.feed.tracks.discard(self)


class FeedVideoTrack(_QueueTrack):
    kind = "video"

    async def recv(self) -> av.VideoFrame:
        return await self._next()


class FeedAudioTrack(_QueueTrack):
    """Each frame's 40 ms in two 20 ms Opus frames, the second one 20 ms after the first."""

    kind = "audio"

    def __init__(self, feed: _Feed) -> None:
        super().__init__(feed)
        self._second: tuple[int, np.ndarray, float] | None = None

    async def recv(self) -> av.AudioFrame:
        if self._second is not None:
            index, pcm, release = self._second
            self._second = None
            delay = release + FRAME_SECONDS / 2 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            return _audio_frame(pcm[AUDIO_CHUNK:], index * 2 * AUDIO_CHUNK + AUDIO_CHUNK)
        index, pcm, release = await self._next()
        self._second = (index, pcm, release)
        return _audio_frame(pcm[:AUDIO_CHUNK], index * 2 * AUDIO_CHUNK)


def _audio_frame(chunk: np.ndarray, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = OUTPUT_RATE
    frame.pts = pts
    frame.time_base = Fraction(1, OUTPUT_RATE)
    return frame


def microphone_pcm(frame: av.AudioFrame) -> tuple[np.ndarray, int, str]:
    """A decoded microphone frame as (float32 planar PCM, rate, layout) for the server.

    aiortc decodes Opus as stereo, also a browser's mono microphone (both channels the same).
    Stereo is mixed down here, as the mean of the channels: what libswresample's own stereo to
    mono does (the same 16 kHz features to 2e-8, tests/test_peer_processes.py). The server's
    48 kHz output of a mono 48 kHz stream is then a copy, not a libswresample call on its event
    loop (which lets go of the GIL on every chunk: bench/gil_release_cost.py), and the message
    is half the size."""
    planar, layout = frame_to_planar(frame), layout_name(frame.layout)
    if layout == "stereo":
        planar, layout = planar.mean(axis=0, keepdims=True, dtype=np.float32), "mono"
    return planar, frame.sample_rate, layout


@dataclass
class _Feed:
    """What the process's loop holds for one session: its outgoing tracks."""

    tracks: set[_QueueTrack] = field(default_factory=set)

    def picture(self, frame: av.VideoFrame) -> None:
        for track in list(self.tracks):
            if track.kind == "video":
                track.offer(frame)

    def audio(self, index: int, pcm: bytes, release: float) -> None:
        samples = np.frombuffer(pcm, dtype=np.int16)
        for track in list(self.tracks):
            if track.kind == "audio":
                track.offer((index, samples, release))

    def close(self) -> None:
        for track in list(self.tracks):
            track.offer(None)
        self.tracks.clear()


class _Rings:
    """The sessions' frame rings, used only on the channel's receiving thread: each frame is
    copied out of its slot there, the moment its message arrives (long before the ring wraps),
    instead of on the event loop that runs every peer's RTP. The copy is one (the slot is
    reused), wrapped without another: ``from_ndarray`` copied twice under the GIL on the loop
    (47 % of the samples holding a peer process's GIL on an H200, run 181148). An I420 slot
    goes to the VP8 encoder as it is; BGR is converted there."""

    def __init__(self) -> None:
        self._rings: dict[str, FrameRing] = {}

    def prepare(self, message: tuple) -> tuple | None:
        """What of ``message`` the loop should see (a channel ``prepare``)."""
        kind = message[0]
        if kind == "frame":
            session, index, slot = message[1:]
            ring = self._rings.get(session)
            if ring is None:
                return None
            frame = av.VideoFrame.from_numpy_buffer(ring.view(slot).copy(), format=ring.pixel_format)
            frame.pts = index * (VIDEO_CLOCK // 25)
            frame.time_base = Fraction(1, VIDEO_CLOCK)
            return ("picture", session, frame)
        if kind == "ring":
            session, name, shape, slots, pixel_format = message[1:]
            self.drop(session)
            self._rings[session] = FrameRing.attach(name, shape, slots, pixel_format)
            return None
        if kind == "drop":
            self.drop(message[1])
        return message

    def drop(self, session: str) -> None:
        ring = self._rings.pop(session, None)
        if ring is not None:
            ring.close()

    def close(self) -> None:
        for session in list(self._rings):
            self.drop(session)


@dataclass
class _Peer:
    connection: RTCPeerConnection
    tracks: list[_QueueTrack] = field(default_factory=list)
    tasks: set[asyncio.Task] = field(default_factory=set)


class PeerProcess:
    """The process's state: peers by id, feeds by session id."""

    def __init__(self, conn: Connection, webrtc: WebRtcConfig) -> None:
        self.channel = Channel(conn, "peer-process")
        self.webrtc = webrtc
        self.peers: dict[str, _Peer] = {}
        self.feeds: dict[str, _Feed] = collections.defaultdict(_Feed)  # by session id
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._rings = _Rings()

    async def serve(self) -> None:
        self.channel.listen(asyncio.get_running_loop(), self.handle, self._done.set, prepare=self._rings.prepare)
        await self._done.wait()
        await asyncio.gather(*(self._close_peer(peer_id) for peer_id in list(self.peers)), return_exceptions=True)
        for feed in self.feeds.values():
            feed.close()
        self.channel.close()
        self._rings.close()  # (a copy still running keeps its mapping: closing then raises nothing)

    def handle(self, message: tuple) -> None:
        kind, args = message[0], message[1:]
        if kind in ("picture", "audio"):
            feed = self.feeds.get(args[0])  # none: no viewer yet, or the session was dropped
            if feed is not None:
                (feed.picture if kind == "picture" else feed.audio)(*args[1:])
        elif kind == "open":
            self._spawn(self._open(*args))
        elif kind == "close":
            self._spawn(self._close(*args))
        elif kind == "drop":
            feed = self.feeds.pop(args[0], None)
            if feed is not None:
                feed.close()
        elif kind == "stop":
            self._done.set()
        else:
            log.error("unknown command %r", kind)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, request: int, peer_id: str, session: str, sdp: str, send_media: bool, receive_audio: bool) -> None:
        connection = new_peer(self.webrtc)
        peer = self.peers[peer_id] = _Peer(connection)

        @connection.on("connectionstatechange")
        def _state() -> None:
            self.channel.send(("state", peer_id, connection.connectionState))

        @connection.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio" and receive_audio:
                task = asyncio.get_running_loop().create_task(self._pump(peer_id, track))
                peer.tasks.add(task)
                task.add_done_callback(peer.tasks.discard)

        try:
            await apply_offer(connection, sdp)
            if send_media:
                feed = self.feeds[session]
                for track in (FeedVideoTrack(feed), FeedAudioTrack(feed)):
                    feed.tracks.add(track)
                    peer.tracks.append(track)
                    connection.addTrack(track)
            self.channel.send(("reply", request, None, await answer(connection)))
        except Exception as exc:  # noqa: BLE001 - the server maps the error to a status
            await self._close_peer(peer_id)
            self.channel.send(("reply", request, (type(exc).__name__, str(exc)), None))

    async def _pump(self, peer_id: str, track: MediaStreamTrack) -> None:
        """Microphone frames to the server, as planar PCM at the sender's rate."""
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.channel.send(("mic", peer_id, *microphone_pcm(frame)))

    async def _close(self, request: int, peer_id: str) -> None:
        await self._close_peer(peer_id)
        self.channel.send(("reply", request, None, None))

    async def _close_peer(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        for track in peer.tracks:
            track.stop()
        for task in list(peer.tasks):
            task.cancel()
        await peer.connection.close()


def run(conn: Connection, webrtc: WebRtcConfig, log_level: str) -> None:
    """The process's entry point (multiprocessing spawn target)."""
    import faulthandler
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us (Ctrl-C reaches the whole group)
    if webrtc.peer_nice:
        os.nice(webrtc.peer_nice)  # before any thread starts: threads inherit it (config.py says why)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the server asks when we stop answering
    faulthandler.enable(all_threads=True)  # a crash in native code leaves its stacks in the log
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if webrtc.host_addresses:
        configure_host_addresses(webrtc.host_addresses)
    use_numpy_audio_level()
    limit_audio_prefetch(webrtc.mic_prefetch_packets)
    # Imports (aiortc, PyAV, numpy: ~60k objects, an 11 ms walk on a 2-core box) live as long
    # as the process: out of the garbage collector's walks, which stop every session's sending.
    freeze_startup()
    asyncio.run(PeerProcess(conn, webrtc).serve())
