"""Session outputs beyond WebRTC: RTMP streams and MP4 recordings.

Shape of the work for one session::

    session frames --(asyncio task: picture at release time, idle if superseded)--> FrameFeed
      FrameFeed --(encoder thread: one H.264 + AAC encode)--> packets
        packets --> each output's inbox --(its own thread)--> FLV over RTMP | MP4 file

- One encode per session and format, shared: two RTMP URLs and a recording of one session cost
  one x264 encode. The encoder only runs while some output is taking packets.
- Nothing here blocks the event loop: encoding, muxing and network/disk writes run in threads.
  Every hand-over is bounded. A slow encoder drops pictures (never audio) before encoding; a
  slow output drops its own backlog and restarts at a fresh keyframe: the WebRTC viewers and the
  other outputs of the session never wait for it. Drops are counted per output.
- An RTMP output reconnects after a refusal, a drop or a server restart, with capped
  exponential backoff (``rtmp.*``), each time with a new FLV stream that starts on a keyframe.
  States: connecting -> live -> retrying -> ... -> failed | stopped.
- A recording is muxed into a temporary file renamed to ``<recordings.dir>/<session>/<id>.mp4``
  when finished: on DELETE, when the session ends, and at shutdown (the drain ends sessions).
  Its size limit and the disk's free-space floor stop it with an error state, never the session.
  States: starting -> recording -> stopped | failed.
- State changes go to the session's WebSocket listeners (``output_state`` events), to the logs
  and to Prometheus.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import LipstreamError
from pipeline.live.session import LiveSession
from pipeline.media.live_encode import (
    ByteSink,
    EncodeSettings,
    LiveEncoder,
    MediaPacket,
    Mp4File,
    PacketMuxer,
)
from pipeline.media.rtmp import RtmpError, RtmpPublisher, RtmpUrl, parse_rtmp_url
from server.config import Settings
from server.metrics import Metrics
from server.webrtc import output_audio, output_picture

if TYPE_CHECKING:
    from server.sessions import ServerSession, SessionManager

log = logging.getLogger("lipstream.outputs")

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
INBOX_PACKETS = 250  # ~3.5 s of video + audio packets an output may fall behind before dropping
FEED_PICTURES = 25  # pictures waiting for the encoder before the oldest is dropped (1 s)
FEED_ITEMS = 250  # frames (with audio) waiting at most: 10 s
ACTIVE_STATES = {"starting", "connecting", "live", "retrying", "recording"}


class OutputNotFound(LipstreamError):
    http_status = 404


class OutputConflict(LipstreamError):
    """The request clashes with the output's state (a recording still running, too many outputs)."""

    http_status = 409


class InsufficientStorage(LipstreamError):
    http_status = 507


# ---------------------------------------------------------------------------------- frame feed
@dataclass
class FrameItem:
    index: int
    image: np.ndarray | None  # None: dropped before encoding (its audio still goes out)
    audio: np.ndarray  # int16, one frame's worth at 48 kHz


_EMPTY = object()


class FrameFeed:
    """Bounded hand-over from the event loop to an encoder thread; drops pictures, keeps audio."""

    def __init__(self, max_pictures: int = FEED_PICTURES, max_items: int = FEED_ITEMS) -> None:
        self._items: collections.deque[FrameItem] = collections.deque()
        self._cond = threading.Condition()
        self._pictures = 0
        self._max_pictures = max_pictures
        self._max_items = max_items
        self.closed = False
        self.dropped = 0

    def put(self, item: FrameItem) -> int:
        """Queues a frame; returns how many pictures were dropped to make room."""
        dropped = 0
        with self._cond:
            if self.closed:
                return 0
            if self._pictures >= self._max_pictures:
                for queued in self._items:
                    if queued.image is not None:
                        queued.image = None
                        self._pictures -= 1
                        dropped += 1
                        break
            if len(self._items) >= self._max_items:
                lost = self._items.popleft()
                if lost.image is not None:
                    self._pictures -= 1
                    dropped += 1
            self._items.append(item)
            self._pictures += item.image is not None
            self.dropped += dropped
            self._cond.notify()
        return dropped

    def get(self, timeout: float) -> Any:
        """The next frame; None once closed and empty; ``_EMPTY`` after ``timeout``."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            if self._items:
                item = self._items.popleft()
                self._pictures -= item.image is not None
                return item
            return None if self.closed else _EMPTY

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


# ---------------------------------------------------------------------------------- the encode
class Encoding:
    """One H.264 + AAC encode of a session, shared by every output attached to it."""

    def __init__(self, owner: SessionOutputs, settings: EncodeSettings) -> None:
        self.owner = owner
        self.settings = settings
        self.live: LiveSession = owner.session.live
        self.feed = FrameFeed()
        self.lock = threading.Lock()
        self.encoder: LiveEncoder | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.dropped_pictures = 0
        self._sinks: list[Output] = []
        self._want_key = False
        self._feeder: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._run, name=f"encode-{owner.session.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._feeder = self.owner.manager.sessions.track(self.owner.session, self._feed(), "output-feed")
        self.owner.manager.metrics.encodes.inc()

    async def stop(self, wait: float = 5.0) -> None:
        """Ends the feed (the encoder flushes, attached outputs get the end of the stream)."""
        if self._feeder is not None and not self._feeder.done():
            self._feeder.cancel()
        self.feed.close()
        await asyncio.to_thread(self._thread.join, wait)

    async def finish(self, wait: float) -> None:
        """The session closed: let the feeder pass on the frames still queued, then the end."""
        if self._feeder is not None:
            await asyncio.wait([self._feeder], timeout=wait)
        await self.stop(wait)

    # ---- outputs joining and leaving (any thread) ----------------------------------------
    def attach(self, sink: Output) -> None:
        with self.lock:
            if sink not in self._sinks:
                self._sinks.append(sink)
            self._want_key = True

    def detach(self, sink: Output) -> None:
        with self.lock:
            if sink in self._sinks:
                self._sinks.remove(sink)

    def request_keyframe(self) -> None:
        with self.lock:
            self._want_key = True

    def new_muxer(self, factory: Any) -> Any:
        """Builds an output's container from the encoder's codec parameters (after ``ready``)."""
        with self.lock:
            if self.encoder is None or self.done.is_set():
                raise RuntimeError(self.error or "the session's encoder has stopped")
            return factory(self.encoder)

    # ---- the loop side -------------------------------------------------------------------
    async def _feed(self) -> None:
        """Session frames -> the encoder thread, each at its release time, as viewers see it."""
        queue = self.live.subscribe()
        loop = asyncio.get_running_loop()
        metrics = self.owner.manager.metrics
        try:
            while True:
                out = await queue.get()
                if out is None:
                    break
                delay = out.release - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                image = await output_picture(self.live, out)
                dropped = self.feed.put(FrameItem(out.index, image, output_audio(self.live, out)))
                if dropped:
                    self.dropped_pictures += dropped
                    with self.lock:
                        sinks = list(self._sinks)
                    for sink in sinks:
                        sink.count_dropped(dropped)
                    metrics.dropped_frames.inc(dropped)
        finally:
            self.live.unsubscribe(queue)
            self.feed.close()

    # ---- the encoder thread --------------------------------------------------------------
    def _run(self) -> None:
        metrics = self.owner.manager.metrics
        try:
            encoder = LiveEncoder(self.settings)
        except Exception as exc:  # noqa: BLE001 - reported to every output
            self.error = f"cannot start the H.264/AAC encoder: {exc}"
            log.error("%s", self.error, extra={"session_id": self.owner.session.id})
            self.ready.set()
            self.done.set()
            metrics.encodes.dec()
            return
        with self.lock:
            self.encoder = encoder
        self.ready.set()
        idle = True
        try:
            while True:
                item = self.feed.get(timeout=1.0)
                if item is _EMPTY:
                    continue
                if item is None:
                    break
                with self.lock:
                    sinks = list(self._sinks)
                    want_key, self._want_key = self._want_key, False
                if not sinks:
                    idle = True  # nobody takes packets: skip the work entirely
                    continue
                if idle or want_key:
                    encoder.request_keyframe()
                    idle = False
                started = time.perf_counter()
                packets = encoder.encode(item.index, item.image, item.audio)
                metrics.encode_seconds.observe(time.perf_counter() - started)
                for sink in sinks:
                    sink.offer(packets)
            if not idle:
                tail = encoder.flush()
                with self.lock:
                    sinks = list(self._sinks)
                for sink in sinks:
                    sink.offer(tail)
        except Exception as exc:
            self.error = f"encoding failed: {exc}"
            log.exception("output encoding failed", extra={"session_id": self.owner.session.id})
        finally:
            with self.lock:
                sinks = list(self._sinks)
                self.done.set()
                encoder.close()
            for sink in sinks:
                sink.end_of_stream()
            metrics.encodes.dec()


# ---------------------------------------------------------------------------------- outputs
class Output:
    """Base of an output: an inbox of packets from the encoder and a thread that writes them."""

    kind = "output"

    def __init__(self, owner: SessionOutputs, encoding: Encoding) -> None:
        self.owner = owner
        self.encoding = encoding
        self.id = secrets.token_urlsafe(8)
        self.created = time.time()
        self.state = "starting"
        self.bytes = 0
        self.frames = 0
        self.dropped_frames = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.first_frame: int | None = None  # session frame index of the output's first frame
        self.finished = threading.Event()
        self._inbox: collections.deque[MediaPacket] = collections.deque()
        self._cond = threading.Condition()
        self._resync = False
        self._eos = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"{self.kind}-{self.id}", daemon=True)
        owner.manager.metrics.on_output_state(self.kind, None, self.state)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    async def join(self, timeout: float) -> None:
        await asyncio.to_thread(self._thread.join, timeout)

    # ---- from the encoder thread ---------------------------------------------------------
    def offer(self, packets: list[MediaPacket]) -> None:
        if not packets:
            return
        with self._cond:
            if len(self._inbox) + len(packets) > INBOX_PACKETS:
                # This output fell behind: its backlog goes, it restarts at a fresh keyframe.
                lost = sum(p.kind == "video" for p in self._inbox)
                self._inbox.clear()
                self._resync = True
                self.count_dropped(lost)
                self.encoding.request_keyframe()
            self._inbox.extend(packets)
            self._cond.notify()

    def end_of_stream(self) -> None:
        with self._cond:
            self._eos = True
            self._cond.notify_all()

    def count_dropped(self, frames: int) -> None:
        if frames:
            self.dropped_frames += frames
            self.owner.manager.metrics.output_dropped_frames.labels(self.kind).inc(frames)

    # ---- on the output's thread ----------------------------------------------------------
    def _take(self, timeout: float, draining: bool = False) -> tuple[list[MediaPacket], bool, bool]:
        """(packets, resync needed, end of stream); waits up to ``timeout`` for packets unless
        stopped (``draining``: waits anyway, for the last packets)."""
        with self._cond:
            if not self._inbox and not self._eos and (draining or not self._stop.is_set()):
                self._cond.wait(timeout)
            packets = list(self._inbox)
            self._inbox.clear()
            resync, self._resync = self._resync, False
            return packets, resync, self._eos

    def _clear_inbox(self) -> None:
        with self._cond:
            self._inbox.clear()
            self._resync = False

    def _main(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log.exception("%s output %s crashed", self.kind, self.id, extra={"session_id": self.owner.session.id})
            self._set_state("failed", f"internal error: {exc}")
        finally:
            self.encoding.detach(self)
            if self.state in ACTIVE_STATES:
                self._set_state("stopped")
            self.finished.set()
            self.owner.on_output_finished(self)

    def _run(self) -> None:
        raise NotImplementedError

    def _wait_encoder(self) -> bool:
        while not self.encoding.ready.wait(0.2):
            if self._stop.is_set():
                return False
        if self.encoding.encoder is None or self.encoding.done.is_set():
            self._set_state("failed", self.encoding.error or "the session's encoder has stopped")
            return False
        return True

    def _set_state(self, state: str, error: str | None = None) -> None:
        old, self.state = self.state, state
        if error is not None:
            self.last_error = error
        if old == state and error is None:
            return
        metrics = self.owner.manager.metrics
        if old != state:
            metrics.on_output_state(self.kind, old, state)
        if error is not None and state in ("retrying", "failed"):
            metrics.output_errors.labels(self.kind).inc()
        level = logging.WARNING if state in ("retrying", "failed") else logging.INFO
        log.log(
            level, "%s output %s: %s%s", self.kind, self.id, state, f" ({error})" if error else "",
            extra={"session_id": self.owner.session.id},
        )
        event = {
            "type": "output_state",
            "output_id": self.id,
            "kind": self.kind,
            "state": state,
            "error": error,
            "reconnects": self.reconnects,
        }
        self.owner.notify(event)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "created": self.created,
            "bytes": self.bytes,
            "frames": self.frames,
            "dropped_frames": self.dropped_frames,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            "first_frame": self.first_frame,
        }


class RtmpOutput(Output):
    kind = "rtmp"

    def __init__(self, owner: SessionOutputs, encoding: Encoding, url: RtmpUrl) -> None:
        super().__init__(owner, encoding)
        self.url = url
        self.cfg = owner.manager.settings.rtmp
        self._publisher: RtmpPublisher | None = None

    def stop(self) -> None:
        super().stop()
        publisher = self._publisher
        if publisher is not None and self.state != "live":
            publisher.abort()  # connecting or backing off: break off at once

    async def join(self, timeout: float) -> None:
        await super().join(min(timeout, 2.0))  # a polite end takes a moment at most
        if self._thread.is_alive() and self._publisher is not None:
            self._publisher.abort()  # stuck in a network write: cut the socket
            await super().join(timeout)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url.redacted}

    def _run(self) -> None:
        if not self._wait_encoder():
            return
        self._set_state("connecting")
        failures = 0
        sent_before = 0
        while not self._stop.is_set():
            publisher = RtmpPublisher(self.url, timeout=self.cfg.timeout_seconds)
            self._publisher = publisher
            error: RtmpError | None = None
            try:
                publisher.connect()
                failures = 0
                self._set_state("live")
                self._stream(publisher, sent_before)
            except RtmpError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - e.g. a muxer error: this connection is lost
                error = RtmpError(f"streaming failed: {exc}")
            finally:
                if error is not None:
                    publisher.abort()  # no goodbye on a broken connection
                publisher.close()
                sent_before += publisher.bytes_sent
                self.bytes = sent_before
                self._clear_inbox()
            if error is None or self._stop.is_set():
                return  # stopped, or the session ended
            failures += 1
            if self.cfg.max_retries and failures > self.cfg.max_retries:
                self._set_state("failed", f"{error} (gave up after {failures} failed attempts)")
                return
            self._set_state("retrying", str(error))
            delay = min(self.cfg.reconnect_initial_seconds * 2 ** (failures - 1), self.cfg.reconnect_max_seconds)
            if self._stop.wait(delay):
                return
            self.reconnects += 1
            self.owner.manager.metrics.output_reconnects.inc()

    def _stream(self, publisher: RtmpPublisher, sent_before: int) -> None:
        sink = ByteSink()
        muxer: PacketMuxer = self.encoding.new_muxer(
            lambda encoder: PacketMuxer(encoder, sink, "flv", {"flvflags": "no_duration_filesize", "flush_packets": "1"})
        )
        metrics = self.owner.manager.metrics
        self.encoding.attach(self)
        try:
            while True:
                packets, resync, eos = self._take(0.5)
                if resync:
                    muxer.resync()
                written = 0
                for packet in packets:
                    if muxer.write(packet) and packet.kind == "video":
                        written += 1
                if written:
                    if self.first_frame is None:
                        self.first_frame = muxer.first_frame
                    self.frames += written
                    metrics.output_frames.labels(self.kind).inc(written)
                if self._stop.is_set() or eos:
                    muxer.close()
                data = sink.take()
                before = publisher.bytes_sent
                if data:
                    publisher.send_flv(data)
                else:
                    publisher.poll()
                metrics.output_bytes.labels(self.kind).inc(publisher.bytes_sent - before)
                self.bytes = sent_before + publisher.bytes_sent
                if self._stop.is_set() or eos:
                    return
        finally:
            self.encoding.detach(self)
            muxer.abort()


class RecordingOutput(Output):
    kind = "record"

    def __init__(self, owner: SessionOutputs, encoding: Encoding, folder: Path) -> None:
        super().__init__(owner, encoding)
        self.path = folder / f"{self.id}.mp4"
        self.cfg = owner.manager.settings.recordings
        self.duration: float | None = None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "path": str(self.path),
            "download": f"/v1/sessions/{self.owner.session.id}/outputs/record/{self.id}",
            "finished": self.finished.is_set() and self.path.is_file(),
            "duration_seconds": self.duration,
        }

    def _run(self) -> None:
        if not self._wait_encoder():
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            recording: Mp4File = self.encoding.new_muxer(lambda encoder: Mp4File(encoder, self.path))
        except Exception as exc:  # noqa: BLE001 - e.g. the directory is not writable
            self._set_state("failed", f"cannot create the recording: {exc}")
            return
        metrics = self.owner.manager.metrics
        limit: str | None = None
        self.encoding.attach(self)
        self._set_state("recording")
        spf = self.encoding.settings.samples_per_frame
        # room kept for the last frame's audio (200 ms of AAC) when the size limit stops the video
        reserve = self.encoding.settings.audio_bitrate // 40 + 512
        try:
            next_check = 0.0
            audio_end: int | None = None  # closing: the sample where the last frame's audio ends
            drain_until = 0.0
            while True:
                packets, resync, eos = self._take(0.1 if audio_end is not None else 0.5, draining=audio_end is not None)
                if resync:
                    recording.muxer.resync()
                if audio_end is None and (self._stop.is_set() or limit):
                    # No more pictures; the audio of the last one is still in the AAC encoder
                    # for a frame or two: take it, so that both tracks end together.
                    last = recording.muxer.last_frame
                    audio_end = 0 if last is None else (last + 1) * spf
                    drain_until = time.monotonic() + (1.0 if last is not None else 0.0)
                written = 0
                for packet in packets:
                    size = recording.size_estimate() + len(packet.data)
                    if audio_end is None and packet.kind == "video" and size + reserve > self.cfg.max_bytes:
                        limit = f"size limit reached: recordings.max_bytes is {self.cfg.max_bytes} bytes"
                        last = recording.muxer.last_frame
                        audio_end = 0 if last is None else (last + 1) * spf
                        drain_until = time.monotonic() + 1.0
                    if audio_end is not None:
                        if packet.kind == "video":
                            continue
                        if packet.pts >= audio_end or size > self.cfg.max_bytes:
                            drain_until = 0.0  # the audio is complete (or cannot fit)
                            continue
                    if recording.muxer.write(packet) and packet.kind == "video":
                        written += 1
                if written:
                    if self.first_frame is None:
                        self.first_frame = recording.muxer.first_frame
                    self.frames += written
                    metrics.output_frames.labels(self.kind).inc(written)
                size = recording.size_estimate()
                metrics.output_bytes.labels(self.kind).inc(max(0, size - self.bytes))
                self.bytes = size
                if limit is None and time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    free = shutil.disk_usage(self.path.parent).free
                    if free < self.cfg.min_free_bytes:
                        limit = (
                            f"disk almost full: {free} bytes free, recordings.min_free_bytes is {self.cfg.min_free_bytes}"
                        )
                if eos or (audio_end is not None and time.monotonic() >= drain_until):
                    break
            self.encoding.detach(self)
            recording.finish()
        except Exception as exc:  # noqa: BLE001 - a full disk or an I/O error fails this recording only
            recording.abort()
            self._set_state("failed", f"recording failed: {getattr(exc, 'strerror', None) or exc}")
            return
        finally:
            self.encoding.detach(self)
        self.bytes = self.path.stat().st_size
        self.duration = round(self.frames / self.encoding.settings.fps, 3)
        if limit:
            self._set_state("failed", f"{limit}; the file holds what was recorded until then")
        else:
            self._set_state("stopped")


# ---------------------------------------------------------------------------------- per session
class SessionOutputs:
    """The outputs of one session (held as ``ServerSession.outputs``)."""

    def __init__(self, manager: OutputManager, session: ServerSession) -> None:
        self.manager = manager
        self.session = session
        self.outputs: dict[str, Output] = {}
        self.encodings: dict[EncodeSettings, Encoding] = {}
        self.closed = False
        self._loop = asyncio.get_running_loop()

    @property
    def active(self) -> bool:
        return any(o.active for o in self.outputs.values())

    def notify(self, event: dict[str, Any]) -> None:
        """From any thread: an event to the session's WebSocket listeners."""
        try:
            self._loop.call_soon_threadsafe(self.session.broadcast, event)
        except RuntimeError:
            pass  # the loop is gone (process exit)

    def on_output_finished(self, output: Output) -> None:
        try:
            self._loop.call_soon_threadsafe(self._release_idle_encodings)
        except RuntimeError:
            pass

    def _release_idle_encodings(self) -> None:
        """Stops an encode no active output uses (an output that failed holds nothing)."""
        if self.closed:
            return
        for key, encoding in list(self.encodings.items()):
            if not any(o.active and o.encoding is encoding for o in self.outputs.values()):
                del self.encodings[key]
                self.manager.sessions.track(self.session, encoding.stop(), "output-encode-stop")

    def _encoding(self) -> Encoding:
        cfg = self.manager.settings.rtmp
        width, height = self.session.live.avatar.size
        settings = EncodeSettings(
            width=int(width),
            height=int(height),
            video_bitrate=cfg.video_bitrate,
            gop_seconds=cfg.gop_seconds,
            preset=cfg.preset,
            audio_bitrate=cfg.audio_bitrate,
        )
        encoding = self.encodings.get(settings)
        if encoding is None:
            encoding = self.encodings[settings] = Encoding(self, settings)
            encoding.start()
        return encoding

    def _check_open(self) -> None:
        if self.closed or self.session.ended:
            raise OutputConflict(f"session '{self.session.id}' has ended")
        limit = self.manager.settings.rtmp.max_outputs_per_session
        if sum(o.active for o in self.outputs.values()) >= limit:
            raise OutputConflict(f"session '{self.session.id}' already has {limit} active outputs (rtmp.max_outputs_per_session)")

    def add_rtmp(self, url: str) -> RtmpOutput:
        parsed = parse_rtmp_url(url)
        self._check_open()
        output = RtmpOutput(self, self._encoding(), parsed)
        self.outputs[output.id] = output
        output.start()
        log.info("rtmp output %s added: %s", output.id, parsed.redacted, extra={"session_id": self.session.id})
        return output

    def add_recording(self) -> RecordingOutput:
        self._check_open()
        cfg = self.manager.settings.recordings
        folder = Path(cfg.dir) / self.session.id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as exc:
            raise InsufficientStorage(f"cannot use the recordings directory '{folder}': {exc.strerror or exc}") from None
        if free < cfg.min_free_bytes:
            raise InsufficientStorage(
                f"not enough disk space to record: {free} bytes free in '{cfg.dir}', "
                f"recordings.min_free_bytes is {cfg.min_free_bytes}"
            )
        output = RecordingOutput(self, self._encoding(), folder)
        self.outputs[output.id] = output
        self.manager.recordings[(self.session.id, output.id)] = output
        output.start()
        return output

    def get(self, kind: str, output_id: str) -> Output:
        output = self.outputs.get(output_id)
        if output is None or output.kind != kind:
            raise OutputNotFound(f"unknown {kind} output '{output_id}' of session '{self.session.id}'")
        return output

    async def remove(self, kind: str, output_id: str) -> Output:
        """Stops an output (a recording is finished and kept on disk) and forgets it."""
        output = self.get(kind, output_id)
        output.stop()
        await output.join(self.manager.settings.rtmp.timeout_seconds + 5)
        self._forget(output)
        self._release_idle_encodings()
        return output

    def _forget(self, output: Output) -> None:
        if self.outputs.pop(output.id, None) is not None:
            self.manager.metrics.on_output_state(output.kind, output.state, None)

    def describe(self) -> list[dict[str, Any]]:
        return [o.describe() for o in self.outputs.values()]

    async def close(self) -> None:
        """The session ended: outputs get every frame it made, recordings are finished."""
        if self.closed:
            return
        self.closed = True
        encodings = list(self.encodings.values())
        self.encodings.clear()
        # The session's frames end with a marker; the encoders flush, outputs see the end.
        await asyncio.gather(*(e.finish(wait=5.0) for e in encodings))
        for output in self.outputs.values():
            output.stop()
        await asyncio.gather(*(o.join(self.manager.settings.rtmp.timeout_seconds + 5) for o in self.outputs.values()))
        for output in list(self.outputs.values()):
            self._forget(output)


# ---------------------------------------------------------------------------------- server-wide
class OutputManager:
    """Creates session outputs; remembers recordings, which outlive their session."""

    def __init__(self, settings: Settings, metrics: Metrics, sessions: SessionManager) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sessions = sessions
        self.recordings: dict[tuple[str, str], RecordingOutput] = {}

    def of(self, session: ServerSession) -> SessionOutputs:
        if session.outputs is None:
            session.outputs = SessionOutputs(self, session)
        return session.outputs

    async def drain(self, timeout: float = 120.0) -> None:
        """Shutdown: wait until every recording is finished on disk (the session drain has
        already asked them to finish), so the process never exits half way through one."""
        running = [r for r in self.recordings.values() if not r.finished.is_set()]
        if running:
            log.info("waiting for %d recording(s) to be finished", len(running))
            for recording in running:
                recording.stop()  # already stopping, unless the session drain was cut short
            await asyncio.gather(*(r.join(timeout) for r in running))

    def recording_file(self, session_id: str, output_id: str) -> Path:
        """A finished recording's file; 409 while it is still being written."""
        if not ID_PATTERN.fullmatch(session_id) or not ID_PATTERN.fullmatch(output_id):
            raise OutputNotFound("unknown recording")
        output = self.recordings.get((session_id, output_id))
        if output is not None and not output.finished.is_set():
            raise OutputConflict(
                f"recording '{output_id}' is still being written; DELETE the output (or end the session) to finish it"
            )
        path = Path(self.settings.recordings.dir) / session_id / f"{output_id}.mp4"
        if path.is_file():
            return path
        if output is not None and output.last_error:
            raise OutputNotFound(f"recording '{output_id}' has no file: {output.last_error}")
        raise OutputNotFound(f"unknown recording '{output_id}' of session '{session_id}'")


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not ID_PATTERN.fullmatch(session_id):
        from pipeline.errors import InputError

        raise InputError(f"invalid session id {session_id!r}: use 1 to 64 of A-Z a-z 0-9 _ -")
    return session_id


@dataclass(frozen=True)
class BootSession:
    """``lipstream serve --rtmp URL ... [--session-id ID]``: a session made at start-up."""

    session_id: str = "live"
    rtmp: tuple[str, ...] = ()


async def start_boot_session(sessions: SessionManager, outputs: OutputManager, boot: BootSession) -> ServerSession:
    """A session that lives as long as the server (no idle or vanish timeout: only DELETE or
    shutdown end it), with the given RTMP outputs; its audio is pushed to
    ``/v1/sessions/ID/audio`` and it can be watched over WHEP too."""
    session = await sessions.create(session_id=check_session_id(boot.session_id), persistent=True)
    for url in boot.rtmp:
        output = outputs.of(session).add_rtmp(url)
        log.info("boot session output %s -> %s", output.id, output.url.redacted, extra={"session_id": session.id})
    log.info(
        "session '%s' created at start-up: push audio to /v1/sessions/%s/audio (%d RTMP output%s)",
        session.id, session.id, len(boot.rtmp), "" if len(boot.rtmp) == 1 else "s",
        extra={"session_id": session.id},
    )
    return session
