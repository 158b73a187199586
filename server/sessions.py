"""Sessions as the server sees them: a live pipeline plus its peers, sockets, viewers and life cycle.

A session ends, and frees everything, when its input goes away (the call's or WHIP sender's peer
connection, or the audio WebSocket) for ``vanish_timeout_seconds``, when it has had no input and
no viewer for ``idle_timeout_seconds``, on DELETE, or on shutdown. One watchdog task checks all
sessions four times a second; there is no per-session polling.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.avatar.ids import validate_avatar_id
from pipeline.avatar.store import AvatarStore
from pipeline.errors import LipstreamError
from pipeline.live.devices import AtCapacity, DevicePool
from pipeline.live.faults import DeviceFailed
from pipeline.live.session import LiveSession
from server.config import Settings
from server.metrics import Metrics
from server.peer_pool import PeerPool, RemotePeer

log = logging.getLogger("lipstream.sessions")


class SessionNotFound(LipstreamError):
    http_status = 404


class SessionExists(LipstreamError):
    http_status = 409


@dataclass
class Viewer:
    id: str
    peer: RemotePeer
    answer: str  # the answer SDP sent back to the viewer


@dataclass
class ServerSession:
    id: str
    avatar_id: str
    engine: str
    live: LiveSession
    created: float = field(default_factory=time.time)
    device: str = ""  # the engine device its frames are made on (pipeline/live/devices.py)
    input_kind: str | None = None  # "call" | "whip" | "websocket" once an input attached
    input_peer: RemotePeer | None = None
    websockets: int = 0
    viewers: dict[str, Viewer] = field(default_factory=dict)
    listeners: set[asyncio.Queue] = field(default_factory=set)
    tasks: set[asyncio.Task] = field(default_factory=set)
    input_lost_since: float | None = None
    last_input: float | None = None  # monotonic time of the last microphone frame
    last_activity: float = field(default_factory=time.monotonic)
    ended: bool = False
    outputs: Any = None  # server.outputs.SessionOutputs once an RTMP output or recording was added
    persistent: bool = False  # the `serve --rtmp` session: no idle/vanish timeout, only DELETE or shutdown
    peers: PeerPool | None = None  # where its WebRTC peers live

    def heard_input(self) -> None:
        self.last_input = time.monotonic()

    def broadcast(self, event: dict[str, Any]) -> None:
        event = {**event, "session_id": self.id}
        for queue in self.listeners:
            if not queue.full():
                queue.put_nowait(event)

    def output_tracks(self) -> list[Any]:
        """What sends its frames to WebRTC peers (one feed for the call and every viewer)."""
        feed = self.peers.feed(self.id) if self.peers is not None else None
        return [feed] if feed is not None else []

    def describe(self) -> dict[str, Any]:
        stats = self.live.stats
        videos = [t for t in self.output_tracks() if t.kind == "video"]
        return {
            "id": self.id,
            "avatar": self.avatar_id,
            "engine": self.engine,
            "device": self.device,
            "created": self.created,
            "state": "ended" if self.ended else ("speaking" if self.live.speaking else "idle"),
            "input": self.input_kind,
            "viewers": len(self.viewers),
            "media_time": round(self.live.media_time, 3),
            "stats": {
                "frames": stats.frames,
                "active_frames": stats.active_frames,
                "late_frames": sum(t.late for t in videos),
                "dropped_frames": stats.dropped_frames,
                "skipped_frames": stats.skipped_frames,
                "fps": round(max((t.fps for t in videos), default=0.0), 2),
                "buffered_seconds": round(self.live.buffered_seconds, 3),
                "received_seconds": round(stats.received_seconds, 3),
                "padded_seconds": round(stats.padded_seconds, 3),
                "shortened_seconds": round(stats.shortened_seconds, 3),
                "latency_ms_p50": _round(stats.latency_ms(0.5)),
                "latency_ms_p95": _round(stats.latency_ms(0.95)),
                "output_lag_ms": next((t.lags_ms() for t in videos if hasattr(t, "lags_ms")), None),
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        store: AvatarStore,
        pool: DevicePool,
        metrics: Metrics,
        peers: PeerPool | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pool = pool  # the engine devices sessions are bound to
        self.metrics = metrics
        self.peers = peers or PeerPool(settings.webrtc, settings.webrtc.peer_processes, settings.server.log_level)
        self.sessions: dict[str, ServerSession] = {}
        self._creating: set[str] = set()  # sessions being created: their device place is reserved
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task] = set()
        self.draining = False
        self._watchdog: asyncio.Task | None = None

    def start(self) -> None:
        self.peers.start()
        self._loop = asyncio.get_running_loop()
        self._watchdog = self._loop.create_task(self._watch(), name="session-watchdog")
        self.pool.add_failure_listener(self._on_device_failure)

    async def create(
        self,
        avatar_id: str | None = None,
        engine: str | None = None,
        session_id: str | None = None,
        persistent: bool = False,
    ) -> ServerSession:
        if self.draining:
            raise AtCapacity("server is shutting down; not taking new sessions")
        if engine is not None and engine != self.settings.engine.name:
            raise LipstreamError(f"engine {engine!r} is not loaded; this server runs {self.settings.engine.name!r}")
        in_use = len(self.sessions) + len(self._creating)
        if in_use >= self.settings.limits.max_sessions:
            raise AtCapacity(f"at capacity: {in_use} of {self.settings.limits.max_sessions} sessions in use")
        avatar_id = validate_avatar_id(avatar_id or self.settings.avatars.default)
        avatar = await asyncio.to_thread(self.store.load, avatar_id)
        cfg = self.settings.sessions
        if session_id is not None and (session_id in self.sessions or session_id in self._creating):
            raise SessionExists(f"session '{session_id}' already exists")
        session_id = session_id or secrets.token_urlsafe(12)
        # Choose a device and reserve the session's place there in one step (no await between):
        # concurrent creations cannot both take the last place.
        expected = cfg.expected_talk_fraction
        device = self.pool.admit(session_id, avatar_id, expected)
        self._creating.add(session_id)
        holder: dict[str, ServerSession] = {}
        parts: dict[str, Any] = {}
        try:
            await asyncio.to_thread(self.pool.load_avatar, device, avatar)
            if not device.ready:
                raise DeviceFailed(f"device {device.name} failed: {device.error}")
            if device.link is not None:  # the device runs in its own process
                parts = {"worker": None, "featurizer": None,
                                         "remote": device.link.open_stream(session_id, avatar)}
            elif device.worker is not None and device.engine is not None:
                parts = {"worker": device.worker, "featurizer": device.engine.new_featurizer(),
                         "feature_worker": device.feature_worker}
            else:
                raise DeviceFailed(f"device {device.name} failed: {device.error}")
            live = LiveSession(
                avatar,
                vad_aggressiveness=self.settings.engine.vad_aggressiveness,
                max_buffer_seconds=self.settings.limits.audio_buffer_seconds,
                jitter_seconds=cfg.jitter_seconds,
                processing_seconds=cfg.processing_seconds,
                live_catch_up=cfg.mic_catch_up,
                on_event=lambda event: holder["s"].broadcast(event),
                observer=self.metrics,
                **parts,
            )
        except BaseException:
            self.pool.release(session_id)
            if parts.get("remote") is not None:  # its featurizer in the device process goes too
                parts["remote"].close()
            raise
        finally:
            self._creating.discard(session_id)
        # its demand from now on: the expected talk fraction, or what it measurably talks if more
        self.pool.track(session_id, lambda: max(expected, live.stats.talk_fraction))
        session = holder["s"] = ServerSession(
            session_id, avatar_id, self.settings.engine.name, live, device=device.name, persistent=persistent,
            peers=self.peers,
        )
        self.sessions[session_id] = session
        live.start()
        self.metrics.sessions.set(len(self.sessions))
        log.info("session created (avatar=%s)", avatar_id, extra={"session_id": session_id})
        return session

    def get(self, session_id: str) -> ServerSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"unknown session '{session_id}'")
        return session

    def track(self, session: ServerSession, coro: Any, name: str) -> asyncio.Task:
        """Runs a task that belongs to a session and is cancelled when the session ends."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}-{session.id}")
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)
        return task

    def mean_fps(self) -> float:
        rates = [t.fps for s in self.sessions.values() for t in s.output_tracks() if t.kind == "video"]
        return sum(rates) / len(rates) if rates else 0.0

    async def open_peer(
        self, session: ServerSession, sdp: str, send_media: bool, microphone: bool
    ) -> tuple[RemotePeer, str]:
        """A WebRTC peer of ``session`` (in its peer process) from a checked offer, and the answer.

        SessionNotFound if the session ended before or while it was negotiated. Why here: its
        end released the session's peers, feed and peer process already, and opening one after
        that bound the session to a process again, with a new feed and frame ring that nothing
        would ever close (the peer was closed, the binding and any call's feed were not)."""
        if session.ended:
            raise SessionNotFound(f"session '{session.id}' ended")

        def heard(planar: Any, rate: int, layout: str) -> None:
            session.heard_input()
            try:
                session.live.push(planar, rate, layout, live=True)
            except LipstreamError as exc:
                log.warning("microphone audio refused: %s", exc, extra={"session_id": session.id})

        try:
            peer, answer = await self.peers.open(
                session.id, session.live, sdp, send_media,
                on_mic=heard if microphone else None, on_late=self.metrics.late_frames.inc,
            )
        except LipstreamError:
            if not session.ended:
                raise
            peer = None  # its end closed the peer under the negotiation: that is not the error
        if session.ended:  # ended while negotiating: everything the session had goes, this too
            if peer is not None:
                await self.peers.close_peer(peer)
            await self.peers.release(session.id)
            raise SessionNotFound(f"session '{session.id}' ended")
        return peer, answer

    async def add_viewer(self, session: ServerSession, sdp: str) -> Viewer:
        peer, answer = await self.open_peer(session, sdp, send_media=True, microphone=False)
        viewer = Viewer(secrets.token_urlsafe(8), peer, answer)
        session.viewers[viewer.id] = viewer
        session.last_activity = time.monotonic()
        return viewer

    async def remove_viewer(self, session: ServerSession, viewer_id: str) -> None:
        viewer = session.viewers.pop(viewer_id, None)
        if viewer is None:
            raise SessionNotFound(f"unknown viewer '{viewer_id}' of session '{session.id}'")
        await self.peers.close_peer(viewer.peer)

    async def end(self, session_id: str, reason: str) -> None:
        """End a session: its clock, outputs, peers and feed, its tasks. Once begun, the teardown
        finishes even if the caller is cancelled (a watchdog stopped at shutdown, a request
        task): it runs as a task of its own, shielded, because a teardown cut halfway leaves the
        session gone from the list but its peers, frame ring and outputs open."""
        session = self.sessions.pop(session_id, None)
        if session is None or session.ended:
            return
        session.ended = True
        await asyncio.shield(self._in_background(self._teardown(session, reason)))

    def _in_background(self, coro: Any) -> asyncio.Future:
        """Runs ``coro`` as a task the manager holds (not collected half-way) and shutdown waits for."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _teardown(self, session: ServerSession, reason: str) -> None:
        session_id = session.id
        self.pool.release(session_id)
        session.broadcast({"type": "session_ended", "reason": reason})
        for queue in list(session.listeners):
            queue.put_nowait(None)  # tells WebSocket handlers to close
        await session.live.close()
        if session.outputs is not None:  # RTMP outputs get the last frames, recordings are finished
            await session.outputs.close()
        await self.peers.release(session_id)  # the call's and viewers' peers, and the feed
        session.viewers.clear()
        for task in list(session.tasks):
            task.cancel()
        if session.tasks:
            await asyncio.wait(session.tasks, timeout=2)
        self.metrics.sessions.set(len(self.sessions))
        log.info("session ended: %s", reason, extra={"session_id": session_id})

    def _on_device_failure(self, name: str, reason: str) -> None:
        """A device went out of rotation (called from whichever thread saw the fault)."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._end_device_sessions, name, reason)

    def _end_device_sessions(self, name: str, reason: str) -> None:
        """End every session bound to the failed device, with the reason; others keep running."""
        for session in list(self.sessions.values()):
            if session.device == name:
                self._in_background(self.end(session.id, f"device {name} failed: {reason}"))

    async def shutdown(self) -> None:
        """Drain: refuse new sessions, close every peer and socket cleanly."""
        self.draining = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self.end(sid, "server shutting down") for sid in list(self.sessions)))
        if self._background:  # teardowns begun elsewhere (the watchdog's, a failed device's)
            await asyncio.wait(list(self._background), timeout=10)
        await self.peers.stop()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                reason = self._reason_to_end(session, now)
                if reason:
                    await self.end(session.id, reason)

    def _reason_to_end(self, session: ServerSession, now: float) -> str | None:
        cfg = self.settings.sessions
        if session.persistent:
            return None
        if session.input_kind in ("call", "whip"):
            state = session.input_peer.connectionState if session.input_peer else "closed"
            silent = session.last_input is not None and now - session.last_input >= cfg.vanish_timeout_seconds
            lost = state in ("failed", "closed", "disconnected") or silent
        elif session.input_kind == "websocket":
            # A producer may reconnect to the same session: while it is broadcast (RTMP,
            # recording), a closed socket is a pause, not the end; DELETE ends it.
            broadcast = session.outputs is not None and session.outputs.active
            lost, silent = session.websockets == 0 and not broadcast, False
        else:
            lost = silent = False
        if lost:
            session.input_lost_since = session.input_lost_since or now
            if silent or now - session.input_lost_since >= cfg.vanish_timeout_seconds:
                return f"{session.input_kind} input went away"
        else:
            session.input_lost_since = None
        for viewer_id, viewer in list(session.viewers.items()):
            if viewer.peer.connectionState in ("failed", "closed"):
                self.track(session, self.remove_viewer(session, viewer_id), "viewer-gone")
        busy = session.websockets or session.viewers or session.input_kind in ("call", "whip") or session.live.speaking
        busy = busy or (session.outputs is not None and session.outputs.active)  # RTMP/recording watchers
        if busy:
            session.last_activity = now
        elif now - session.last_activity >= cfg.idle_timeout_seconds:
            return "idle timeout"
        return None
