"""The server's side of the peer processes: which process serves which session, and the feeds.

Every WebRTC peer of a session (its call, its WHIP sender, its WHEP viewers) lives in the same
peer process (:mod:`server.peer_process`), chosen when the session gets its first peer (the
process with the fewest sessions), so one message per frame serves all of a session's viewers.
:class:`SessionFeed` releases a session's frames to that process on the session clock: the
audio at the frame's release time, the picture (through a :class:`~pipeline.ipc.frame_ring.FrameRing`)
as soon as it is composed, never before its release time. A peer process that dies takes its
peers with it (they read as ``failed``, so the sessions' watchdog ends what depended on them);
the next session gets a fresh process in its place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import LipstreamError
from pipeline.live.session import FRAME_SECONDS, LiveSession, OutputFrame, monotonic_of
from server.config import WebRtcConfig
from pipeline.ipc.frame_ring import FrameRing
from pipeline.ipc.channel import Channel
from server.webrtc import BadSdp, output_audio, picture_pending, ready_picture

log = logging.getLogger("lipstream.peers")

MicHandler = Callable[[np.ndarray, int, str], None]
#: Frames whose picture lags a feed keeps (10 s at 25 fps).
LAG_FRAMES = 250


class PeerProcessError(LipstreamError):
    http_status = 503


def default_processes() -> int:
    """One peer process per four cores (a process encodes on several threads), 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 4))


@dataclass
class RemotePeer:
    """A peer connection living in a peer process; reads like aiortc's for the watchdog."""

    id: str
    session_id: str
    worker: _Worker
    send_media: bool
    on_mic: MicHandler | None = None
    connectionState: str = "new"  # the name aiortc (and the watchdog) use
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connectionState = "closed"
        await self.worker.request("close", self.id)


class SessionFeed:
    """Releases one session's frames to its peer process, and counts the made frames that went out
    late (a held frame, skipped by its device, is counted as skipped instead)."""

    kind = "video"  # counted with the outgoing video tracks in session stats

    def __init__(self, session_id: str, live: LiveSession, worker: _Worker, on_late: Callable[[], None] | None) -> None:
        self.session_id = session_id
        self.live = live
        self.worker = worker
        self._on_late = on_late
        shape = live.avatar.frames[0].shape
        self.ring = FrameRing.create(shape)
        self.sent = 0
        self.late = 0
        self._sent_times: collections.deque[float] = collections.deque(maxlen=50)
        # Seconds after each frame's release time that its picture was ready / went to the peer
        # process (the last ~10 s): late frames say *that* a session runs late, these say where.
        self._ready_lags: collections.deque[float] = collections.deque(maxlen=LAG_FRAMES)
        self._send_lags: collections.deque[float] = collections.deque(maxlen=LAG_FRAMES)
        self._pictures: collections.deque[OutputFrame] = collections.deque()  # released, not yet sent
        self.closed = False
        worker.channel.send(("ring", session_id, *self.ring.describe()))
        self._queue = live.subscribe()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"feed-{session_id}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                out = await self._queue.get()
                if out is None:
                    return
                delay = out.release - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                release = monotonic_of(out.release)
                audio = output_audio(self.live, out)
                self.worker.channel.send(("audio", self.session_id, out.index, audio.tobytes(), release))
                # The picture may still be composing: it goes when ready, in frame order, while
                # the next frames' audio goes out on time.
                self._pictures.append(out)
                pending = picture_pending(out)
                if pending is None:
                    self._picture_done(out)
                else:
                    pending.add_done_callback(lambda _, out=out: self._picture_done(out))
        finally:
            self._pictures.clear()

    def _picture_done(self, out: OutputFrame) -> None:
        if self.closed:
            return
        self._ready_lags.append(asyncio.get_running_loop().time() - out.release)
        self._send_ready()

    def _send_ready(self) -> None:
        """Sends every released frame whose picture is made, in frame order, up to the first
        still composing. Called from the pictures' own callbacks: a frame that waited for an
        earlier one goes in the same loop turn as it. (One task per frame that awaited the one
        before cost two loop turns per frame; at 26 sessions on an H200 a turn took ~20 ms, so
        a session could not catch up once behind: its pictures went out ~0.7 s late at 23 fps.)"""
        loop = asyncio.get_running_loop()
        while self._pictures and not self.closed and picture_pending(self._pictures[0]) is None:
            out = self._pictures.popleft()
            image = ready_picture(self.live, out)
            try:
                self.ring.check(image)
            except ValueError as exc:  # a picture of another shape: the viewers keep the last one
                log.error("session %s frame %d not sent: %s", self.session_id, out.index, exc)
                continue
            # The copy into the ring runs on the channel's sending thread, just before the
            # message: off this loop, which every session's clock shares.
            write = functools.partial(self.ring.write, out.index, image)
            self.worker.channel.send(("frame", self.session_id, out.index, self.ring.slot_of(out.index)), before=write)
            now = loop.time()
            self._send_lags.append(now - out.release)
            if now - out.release > FRAME_SECONDS and not out.held:  # a held frame counts as skipped only
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

    def lags_ms(self) -> dict[str, float | None]:
        """Milliseconds after their release time that the recent frames' pictures were ready
        (``ready``: the device and the features) and sent (``sent``: after the frames before
        them, on this process's loop); negative: ahead of time."""
        out: dict[str, float | None] = {}
        for name, lags in (("ready", self._ready_lags), ("sent", self._send_lags)):
            values = np.asarray(lags) * 1000 if lags else None
            for label, q in (("p50", 0.5), ("p95", 0.95)):
                out[f"{name}_{label}"] = None if values is None else round(float(np.quantile(values, q)), 1)
            out[f"{name}_max"] = None if values is None else round(float(values.max()), 1)
        return out

    async def close(self) -> None:
        """Stop the feed, tell the peer process to drop it, close its ring: all of it even if the
        caller is cancelled on the way. Why: a session's end cancels its tasks, one of which
        can be a viewer's removal that is closing this feed; the end's own close found the feed
        already closing and returned. Cancelled in the wait, the ring stayed open and the peer
        process kept the session's mapping (two such rings in a GPU load test, 2026-12-04)."""
        if self.worker.feeds.get(self.session_id) is not self:
            return  # closed already, or being closed
        self.worker.feeds.pop(self.session_id, None)
        self.closed = True  # pictures that finish from now on are not sent: the ring goes away
        self._task.cancel()
        try:
            await asyncio.wait([self._task])
        finally:
            self.live.unsubscribe(self._queue)
            self.worker.channel.send(("drop", self.session_id))
            # The process drops its mapping on "drop"; unlinking now only removes the name. A
            # frame still queued for the ring is skipped by its write (the ring is closed).
            self.ring.close()


class _Worker:
    """One peer process and its channel."""

    def __init__(self, index: int, webrtc: WebRtcConfig, log_level: str) -> None:
        from server import peer_process

        self.index = index
        context = multiprocessing.get_context("spawn")  # no fork: the server holds threads (and CUDA)
        ours, theirs = context.Pipe(duplex=True)
        self.process = context.Process(
            target=peer_process.run, args=(theirs, webrtc, log_level), name=f"lipstream-peers-{index}", daemon=True
        )
        self.process.start()
        theirs.close()
        self.channel = Channel(ours, f"peers-{index}", coalesce=True)  # a loop turn's frames as one item
        self.peers: dict[str, RemotePeer] = {}
        self.sessions: set[str] = set()
        self.feeds: dict[str, SessionFeed] = {}
        self._replies: dict[int, asyncio.Future] = {}
        self._requests = itertools.count()
        self.alive = True
        self.stopping = False  # an orderly stop, not a crash
        self._dumped = False
        self._closing: set[asyncio.Task] = set()  # feeds being closed after the process died
        self.channel.listen(asyncio.get_running_loop(), self._handle, self._gone)

    async def request(self, kind: str, *args: Any, timeout: float = 20.0) -> Any:
        if not self.alive:
            raise PeerProcessError(f"peer process {self.index} is gone")
        request = next(self._requests)
        future = self._replies[request] = asyncio.get_running_loop().create_future()
        self.channel.send((kind, request, *args))
        try:
            error, value = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._dump_stacks()
            raise PeerProcessError(f"peer process {self.index} did not answer '{kind}' within {timeout:.0f} s") from None
        finally:
            self._replies.pop(request, None)
        if error is not None:
            name, text = error
            raise (BadSdp if name == "BadSdp" else PeerProcessError)(text)
        return value

    def _dump_stacks(self) -> None:
        """A stuck process: have it print every thread's stack into the log (once)."""
        if self.alive and not self._dumped and self.process.pid is not None:
            self._dumped = True
            with contextlib.suppress(OSError):
                os.kill(self.process.pid, signal.SIGUSR1)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "mic":
            peer = self.peers.get(message[1])
            if peer is not None and peer.on_mic is not None and not peer.closed:
                peer.on_mic(*message[2:])
        elif kind == "state":
            peer = self.peers.get(message[1])
            if peer is not None and not peer.closed:
                peer.connectionState = message[2]
        elif kind == "reply":
            future = self._replies.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2:])

    def _gone(self) -> None:
        """The process exited (crash, OOM kill): its peers failed; pending requests fail."""
        if not self.alive:
            return
        self.alive = False
        if self.stopping:
            return
        log.error("peer process %d exited (code %s); its %d peers failed", self.index, self.process.exitcode,
                  len(self.peers))
        for peer in self.peers.values():
            peer.connectionState = "failed"
        for future in self._replies.values():
            if not future.done():
                future.set_result((("PeerProcessError", f"peer process {self.index} exited"), None))
        # Nobody reads these sessions' rings any more: unlink them now. A session that opens a
        # new peer gets a new feed in the replacement process.
        loop = asyncio.get_running_loop()
        for feed in list(self.feeds.values()):
            task = loop.create_task(feed.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        self.stopping = True
        if self.alive:
            self.channel.send(("stop",))
        await asyncio.to_thread(self.process.join, 5)
        if self.process.is_alive():
            self.process.terminate()
            await asyncio.to_thread(self.process.join, 2)
        self.alive = False
        self.channel.close()


class PeerPool:
    """Starts the peer processes, assigns sessions to them, opens and closes peers."""

    def __init__(self, webrtc: WebRtcConfig, processes: int, log_level: str = "warning") -> None:
        self.webrtc = webrtc
        self.processes = processes or default_processes()
        self.log_level = log_level
        self._workers: list[_Worker] = []
        self._by_session: dict[str, _Worker] = {}
        self._stopped = False

    def start(self) -> None:
        self._workers = [_Worker(i, self.webrtc, self.log_level) for i in range(self.processes)]

    def _worker_for(self, session_id: str) -> _Worker:
        worker = self._by_session.get(session_id)
        if worker is not None and worker.alive:
            return worker
        if worker is not None:  # its process died: the session moves to a live one
            worker.sessions.discard(session_id)
        for i, candidate in enumerate(self._workers):
            if not candidate.alive:  # replace a process that died
                log.warning("starting a new peer process in place of process %d", candidate.index)
                self._workers[i] = _Worker(candidate.index, self.webrtc, self.log_level)
        worker = min(self._workers, key=lambda w: len(w.sessions))
        worker.sessions.add(session_id)
        self._by_session[session_id] = worker
        return worker

    async def open(
        self,
        session_id: str,
        live: LiveSession,
        sdp: str,
        send_media: bool,
        on_mic: MicHandler | None = None,
        on_late: Callable[[], None] | None = None,
    ) -> tuple[RemotePeer, str]:
        """A new peer of ``session_id`` from a checked offer; returns it and the answer SDP."""
        worker = self._worker_for(session_id)
        if send_media and session_id not in worker.feeds:
            worker.feeds[session_id] = SessionFeed(session_id, live, worker, on_late)
        peer = RemotePeer(secrets.token_urlsafe(8), session_id, worker, send_media, on_mic)
        worker.peers[peer.id] = peer
        try:
            answer_sdp = await worker.request("open", peer.id, session_id, sdp, send_media, on_mic is not None)
        except BaseException:
            worker.peers.pop(peer.id, None)
            peer.closed = True
            await self._stop_unwatched_feed(worker, session_id)
            raise
        return peer, answer_sdp

    def feed(self, session_id: str) -> SessionFeed | None:
        worker = self._by_session.get(session_id)
        return worker.feeds.get(session_id) if worker is not None else None

    async def close_peer(self, peer: RemotePeer) -> None:
        try:
            await peer.close()
        except (PeerProcessError, TimeoutError) as exc:
            log.warning("closing peer %s: %s", peer.id, exc)
        peer.worker.peers.pop(peer.id, None)
        await self._stop_unwatched_feed(peer.worker, peer.session_id)

    async def _stop_unwatched_feed(self, worker: _Worker, session_id: str) -> None:
        """Nobody left to send a session's frames to: stop copying them."""
        if any(p.session_id == session_id and p.send_media for p in worker.peers.values()):
            return
        feed = worker.feeds.get(session_id)
        if feed is not None:
            await feed.close()

    async def release(self, session_id: str) -> None:
        """The session ended: close its peers and its feed, forget its process."""
        worker = self._by_session.pop(session_id, None)
        if worker is None:
            return
        peers = [p for p in worker.peers.values() if p.session_id == session_id]
        await asyncio.gather(*(self.close_peer(p) for p in peers))
        await self._stop_unwatched_feed(worker, session_id)
        worker.sessions.discard(session_id)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for session_id in list(self._by_session):
            await self.release(session_id)
        await asyncio.gather(*(w.stop() for w in self._workers))

    @property
    def frame_rings(self) -> int:
        """Shared-memory rings in use (one per session with WebRTC viewers)."""
        return sum(len(w.feeds) for w in self._workers)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"index": w.index, "pid": w.process.pid, "alive": w.alive, "sessions": len(w.sessions), "peers": len(w.peers)}
            for w in self._workers
        ]
