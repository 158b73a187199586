"""A live session: audio in on a media clock, one composed video frame + its audio out every 40 ms.

The clock. Session time starts at ``t0`` (when the session starts). Input audio is laid on a
timeline whose sample ``s`` (16 kHz) is session time ``s / 16000``. Video frame ``i`` covers
``[i * 40 ms, (i + 1) * 40 ms)`` and is *released* to every output at ``t0 + i * 40 ms + delay``,
together with exactly the audio samples of that span. Both tracks of every output therefore
carry timestamps from the same clock, and the audio that leaves with frame ``i`` is the audio
that drove its lips: sync is by construction, not by correction.

Gaps and floods. Frame ``i`` needs its audio window up to ``i * 40 ms + 120 ms``. If that audio
has not arrived ``jitter`` seconds after it was due, the timeline is filled with silence up to
that point, so a slow or paused producer yields idle frames, never a stalled video. A producer
faster than real time is buffered up to ``max_buffer_seconds`` ahead of the clock; past that,
:meth:`LiveSession.push` refuses the chunk with :class:`BufferFull` (never a silent drop). A live
input (a microphone) that runs ahead only because its audio was delayed on the way gets part of
its pauses left out until it is back to real time (pipeline/audio/catch_up.py).

Interrupt. Drops all buffered audio and queued engine work, and bumps an *epoch*: outputs
replace frames of an older epoch that are still waiting to go out with the idle frame and
silence, so the avatar is idle again at the next released frame.

Features. A featurizer that declares ``blocking`` (a neural encoder) is never called on the
event loop when the session has a :class:`~pipeline.live.feature_worker.FeatureWorker`: frame
``i`` is published at once, in order, with a future for its picture, and the chain features ->
(active? engine : idle frame) completes that future off the loop. Feature results come back in
frame order, so speaking events and statistics still follow the frames in order.

Device processes. A session bound to a device that runs in a process of its own gets a
:class:`~pipeline.live.device_link.RemoteStream` instead of a featurizer and workers: each
frame's audio window goes there with its avatar frame, deadline and whether anyone watches, the
whole chain runs in that process, and the session hears the frame's ``active`` flag (in order)
and then its picture, exactly as from the local chain.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline.audio.catch_up import PauseShortener
from pipeline.audio.decode import Resampler16k
from pipeline.audio.upsample import OutputResampler
from pipeline.audio.windows import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    WINDOW_AFTER,
    AudioFrame,
    FrameWindower,
)
from pipeline.avatar.model import Avatar
from pipeline.engines.base import Featurizer, FrameFeatures, FrameRequest
from pipeline.errors import LipstreamError
from pipeline.live.device_link import RemoteStream
from pipeline.live.faults import DeviceFailed
from pipeline.live.feature_worker import FeatureWorker
from pipeline.live.worker import SKIPPED, EngineWorker

log = logging.getLogger("lipstream.session")

FRAME_SECONDS = SAMPLES_PER_FRAME / SAMPLE_RATE  # 0.04
#: Time constant of a session's measured talk fraction (the device pool's demand estimate).
TALK_SECONDS = 10.0
LOOKAHEAD_SECONDS = WINDOW_AFTER / SAMPLE_RATE  # 0.12
#: A frame its device skipped (could not be on time) shows the session's last picture if that
#: one is at most this many frames older; an older one would be a stale mouth: the idle frame.
HOLD_FRAMES = 3
OUTPUT_RATE = 48000  # WebRTC (Opus), RTMP and MP4 outputs all take 48 kHz
OUTPUT_SAMPLES_PER_FRAME = OUTPUT_RATE * SAMPLES_PER_FRAME // SAMPLE_RATE  # 1920
RATIO = OUTPUT_RATE // SAMPLE_RATE  # 3

EventSink = Callable[[dict[str, Any]], None]


class SessionObserver(Protocol):
    """Where a session reports what metrics want (the server's Prometheus metrics)."""

    def on_frame(self, active: bool) -> None: ...

    def on_latency(self, seconds: float) -> None: ...

    def on_dropped(self) -> None: ...

    def on_shortened(self, seconds: float) -> None: ...


class _NoObserver:
    def on_frame(self, active: bool) -> None:
        pass

    def on_latency(self, seconds: float) -> None:
        pass

    def on_dropped(self) -> None:
        pass

    def on_shortened(self, seconds: float) -> None:
        pass


class BufferFull(LipstreamError):
    """The producer is further ahead of real time than the configured buffer allows."""

    http_status = 429


@dataclass
class OutputFrame:
    """Frame ``index`` of the session: its picture (maybe still being generated) and its audio."""

    index: int
    epoch: int
    release: float  # loop time at which outputs send it
    avatar_index: int  # avatar frame shown (idle picture if this frame is superseded)
    image: np.ndarray | asyncio.Future
    audio: np.ndarray  # int16 mono, OUTPUT_SAMPLES_PER_FRAME samples at OUTPUT_RATE
    speaking: bool
    # Its device skipped it (it could not be on time) and it shows a held picture: counted as
    # skipped, never also as late, so a session's late + skipped frames are distinct frames.
    held: bool = False

    @property
    def pts_seconds(self) -> float:
        return self.index * FRAME_SECONDS


@dataclass
class SessionStats:
    frames: int = 0
    active_frames: int = 0
    late_frames: int = 0  # released after their time (counted by outputs)
    dropped_frames: int = 0  # not delivered to a slow output
    skipped_frames: int = 0  # speech frames the device could not make on time (the last picture held)
    padded_seconds: float = 0.0  # silence inserted for gaps in the input
    shortened_seconds: float = 0.0  # pauses of a live input left out to catch up with real time
    received_seconds: float = 0.0
    # Share of recent frames that needed the engine (speech), as an exponential average over
    # ~TALK_SECONDS: the device pool counts a session's demand by it (starts at 0).
    talk_fraction: float = 0.0
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return float(np.quantile(np.asarray(self.latencies), q) * 1000)


class LiveSession:
    """Drives one avatar from one audio input; any number of outputs subscribe to its frames."""

    def __init__(
        self,
        avatar: Avatar,
        worker: EngineWorker | None,
        featurizer: Featurizer | None,
        *,
        vad_aggressiveness: int = 2,
        max_buffer_seconds: float = 30.0,
        jitter_seconds: float = 0.04,
        processing_seconds: float = 0.06,
        on_event: EventSink | None = None,
        observer: SessionObserver | None = None,
        subscriber_queue: int = 50,
        speaking_hangover_seconds: float = 0.4,
        feature_worker: FeatureWorker | None = None,
        remote: RemoteStream | None = None,
        live_catch_up: bool = True,
    ) -> None:
        """Either ``worker`` and ``featurizer`` (and ``feature_worker`` for a blocking one), or
        ``remote``: the session's stream on a device process. ``live_catch_up``: a live input's
        pauses are shortened while it runs ahead of real time (pipeline/audio/catch_up.py)."""
        if remote is None and (worker is None or featurizer is None):
            raise ValueError("a live session needs a worker and a featurizer, or a remote stream")
        self.avatar = avatar
        self.worker = worker
        self.featurizer = featurizer
        self.remote = remote
        # None, or a featurizer cheap enough for the loop (lite): features are computed inline
        self.feature_worker = feature_worker if getattr(featurizer, "blocking", False) else None
        self.max_buffer_seconds = max_buffer_seconds
        self.jitter = jitter_seconds
        # Release delay after a frame's start: its lookahead, the jitter allowance, then compute.
        self.delay = LOOKAHEAD_SECONDS + jitter_seconds + processing_seconds
        self.on_event = on_event
        self.observer = observer or _NoObserver()
        self.stats = SessionStats()
        self.epoch = 0
        self.speaking = False
        # Events describe utterances, not syllables: a pause shorter than this inside speech
        # does not end it (the frames themselves still follow the audio exactly).
        self._hangover_frames = round(speaking_hangover_seconds / FRAME_SECONDS)
        self._quiet_since: int | None = None
        self._last_picture: tuple[int, np.ndarray | None] = (-1, None)  # (frame index, picture)
        self.t0: float | None = None
        self._windower = FrameWindower(vad_aggressiveness)
        self._pauses = PauseShortener(vad_aggressiveness) if live_catch_up else None
        self._to16k = Resampler16k()
        self._to48k = OutputResampler(OUTPUT_RATE)
        self._out_audio = np.zeros(0, dtype=np.int16)
        self._out_start = 0  # output-rate sample index of _out_audio[0]
        self._ready: collections.deque[AudioFrame] = collections.deque()
        self._arrivals: collections.deque[tuple[int, float]] = collections.deque()  # (16 kHz end pos, time)
        self._new_audio = asyncio.Event()
        self._subscribers: list[asyncio.Queue[OutputFrame]] = []
        # Frames wait in a subscriber's queue until their release, up to ``delay`` after they are
        # made: the queue must hold that many frames or a long processing budget drops frames.
        self._subscriber_queue = max(subscriber_queue, math.ceil(self.delay / FRAME_SECONDS) + 25)
        self._task: asyncio.Task | None = None
        self._closed = False
        self._next_index = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        self._task = loop.create_task(self._run(), name=f"session-clock-{id(self):x}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.remote is not None:
            self.remote.close()
        if self.worker is not None:
            self.worker.cancel(self)
        if self.feature_worker is not None:
            self.feature_worker.cancel(self)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for queue in self._subscribers:
            queue.put_nowait(None)  # type: ignore[arg-type]  # end-of-stream marker for outputs
        self._subscribers.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def media_time(self) -> float:
        """Session time of the next frame to be produced."""
        return self._next_index * FRAME_SECONDS

    # ------------------------------------------------------------------ input
    def check_room(self, seconds: float = 0.0) -> None:
        """Raises BufferFull if ``seconds`` more audio would exceed the buffer limit."""
        if self.buffered_seconds + seconds > self.max_buffer_seconds:
            raise BufferFull(
                f"audio buffer full: {self.buffered_seconds:.1f} s queued, limit {self.max_buffer_seconds:g} s; "
                "push in real time or wait for speaking_stopped"
            )

    def push(
        self, planar: np.ndarray, sample_rate: int, layout: str, enforce_limit: bool = True, live: bool = False
    ) -> None:
        """Append float32 ``[channels, n]`` audio; raises BufferFull when too far ahead (unless
        the caller already checked room before consuming its input, see ``check_room``).

        ``live``: the audio comes as it is spoken (a microphone), so running ahead of real time
        means it was delayed on the way; part of its next long pause is then left out."""
        if self._closed:
            raise LipstreamError("session is closed")
        seconds = planar.shape[1] / sample_rate
        if enforce_limit:
            self.check_room(seconds)
        self.stats.received_seconds += seconds
        if live and self._pauses is not None and self.t0 is not None:
            now = asyncio.get_running_loop().time()
            if self._pauses.leave_out(planar, sample_rate, self.timeline_end_seconds + seconds - (now - self.t0), now):
                self.stats.shortened_seconds += seconds
                self.observer.on_shortened(seconds)
                return
        self._append(self._to16k.push_planar(planar, sample_rate, layout), self._to48k.push_planar(planar, sample_rate, layout))

    def end_of_input(self) -> None:
        """The producer finished an utterance: release the resamplers' tails now."""
        self._append(self._to16k.flush(), self._to48k.flush())

    def interrupt(self) -> None:
        """Drop every queue of this session; the avatar is idle from the next released frame."""
        self.epoch += 1
        if self.worker is not None:
            self.worker.cancel(self)
        self._windower.reset(first_frame=self._next_index)
        self._to16k = Resampler16k()
        self._to48k = OutputResampler(OUTPUT_RATE)
        self._out_audio = np.zeros(0, dtype=np.int16)
        self._out_start = self._next_index * OUTPUT_SAMPLES_PER_FRAME
        self._ready.clear()
        self._arrivals.clear()
        if self.remote is not None:
            self.remote.reset()  # in order, in the device process
        elif self.feature_worker is not None:
            self.feature_worker.reset(self.featurizer, self)  # in order, on the worker's thread
        else:
            self.featurizer.reset()
        self._quiet_since = None
        self._last_picture = (-1, None)
        if self.speaking:
            self._set_speaking(False, self.media_time)

    @property
    def timeline_end_seconds(self) -> float:
        """Session time up to which input audio (or silence for its gaps) is on the timeline."""
        return (self._windower.origin * SAMPLES_PER_FRAME + self._windower.received_samples) / SAMPLE_RATE

    @property
    def buffered_seconds(self) -> float:
        """Audio received but not yet turned into frames."""
        consumed = (self._next_index - self._windower.origin) * SAMPLES_PER_FRAME
        return max(0, self._windower.received_samples - consumed) / SAMPLE_RATE

    def _append(self, mono16k: np.ndarray, mono48k: np.ndarray) -> None:
        if len(mono48k):
            pcm = np.clip(mono48k * 32767.0, -32768, 32767).astype(np.int16)
            self._out_audio = np.concatenate([self._out_audio, pcm])
        if len(mono16k):
            self._ready.extend(self._windower.push(mono16k))
            self._arrivals.append((self._windower.received_samples, time.monotonic()))
            self._new_audio.set()

    # ------------------------------------------------------------------ output
    def subscribe(self) -> asyncio.Queue[OutputFrame]:
        """Frames from the next one on; ``None`` marks the end of the session."""
        queue: asyncio.Queue[OutputFrame] = asyncio.Queue(self._subscriber_queue)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[OutputFrame]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def idle_image(self, frame: OutputFrame) -> np.ndarray:
        return self.avatar.frames[frame.avatar_index]

    # ------------------------------------------------------------------ the clock
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.t0 is not None
        while not self._closed:
            index = self._next_index
            # Never ahead of the clock: audio pushed faster than real time stays buffered (and
            # counted against the limit) instead of turning into frames nobody can show yet.
            earliest = self.t0 + index * FRAME_SECONDS + LOOKAHEAD_SECONDS
            wait = earliest - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            audio_due = earliest + self.jitter
            frame = await self._audio_frame(index, audio_due, loop)
            self._produce(frame, self.t0 + index * FRAME_SECONDS + self.delay)
            self._next_index += 1

    async def _audio_frame(self, index: int, due: float, loop: asyncio.AbstractEventLoop) -> AudioFrame:
        while True:
            while self._ready and self._ready[0].index < index:
                self._ready.popleft()  # superseded by an interrupt
            if self._ready:
                return self._ready.popleft()
            wait = due - loop.time()
            if wait <= 0:
                break
            self._new_audio.clear()
            try:
                await asyncio.wait_for(self._new_audio.wait(), wait)
            except TimeoutError:
                pass
        self._pad_silence_through(index)
        return self._ready.popleft()

    def _pad_silence_through(self, index: int) -> None:
        """The input is late: fill the timeline with silence so frame ``index`` can be made now."""
        local = index - self._windower.origin
        needed = local * SAMPLES_PER_FRAME + WINDOW_AFTER - self._windower.received_samples
        # Keep the output audio level with the 16 kHz timeline (resampler delays differ a little).
        out_needed = (self._windower.received_samples + needed) * RATIO - (
            self._out_start - self._windower.origin * OUTPUT_SAMPLES_PER_FRAME + len(self._out_audio)
        )
        if out_needed > 0:
            self._out_audio = np.concatenate([self._out_audio, np.zeros(out_needed, np.int16)])
        self.stats.padded_seconds += needed / SAMPLE_RATE
        self._ready.extend(self._windower.push_silence(needed))

    def _take_output_audio(self, index: int) -> np.ndarray:
        start = index * OUTPUT_SAMPLES_PER_FRAME - self._out_start
        chunk = self._out_audio[max(0, start) : start + OUTPUT_SAMPLES_PER_FRAME]
        if start < 0 or len(chunk) < OUTPUT_SAMPLES_PER_FRAME:
            chunk = np.pad(chunk, (0, OUTPUT_SAMPLES_PER_FRAME - len(chunk)))
        drop = min(len(self._out_audio), max(0, start + OUTPUT_SAMPLES_PER_FRAME))
        self._out_audio = self._out_audio[drop:]
        self._out_start += drop
        return chunk

    def _produce(self, frame: AudioFrame, release: float) -> None:
        avatar_index = self.avatar.cycle_index(frame.index)
        self._record_latency(frame.index, release)
        audio = self._take_output_audio(frame.index)
        if self.remote is not None:
            out = self._produce_remote(frame, avatar_index, release, audio)
        elif self.feature_worker is None:
            features = self.featurizer.features([frame])[0]
            image = self._image(features, frame.index, avatar_index, release)
            out = OutputFrame(frame.index, self.epoch, release, avatar_index, image, audio, features.active)
            if isinstance(image, asyncio.Future):  # through _picture_made (a skipped frame)
                picture: asyncio.Future = image.get_loop().create_future()
                picture.add_done_callback(_consume_cancellation)
                out.image = picture
                image.add_done_callback(lambda made: self._picture_made(made, out, picture))
        else:
            loop = asyncio.get_running_loop()
            picture: asyncio.Future = loop.create_future()
            picture.add_done_callback(_consume_cancellation)
            out = OutputFrame(frame.index, self.epoch, release, avatar_index, picture, audio, False)
            arrived = time.monotonic()
            pending = asyncio.wrap_future(self.feature_worker.submit(self.featurizer, [frame], self), loop=loop)
            pending.add_done_callback(lambda done: self._features_ready(done, out, picture, arrived))
        self.stats.frames += 1
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                self.stats.dropped_frames += 1
                self.observer.on_dropped()
            queue.put_nowait(out)

    def _produce_remote(self, frame: AudioFrame, avatar_index: int, release: float, audio: np.ndarray) -> OutputFrame:
        assert self.remote is not None
        loop = asyncio.get_running_loop()
        picture: asyncio.Future = loop.create_future()
        picture.add_done_callback(_consume_cancellation)
        out = OutputFrame(frame.index, self.epoch, release, avatar_index, picture, audio, False)
        features, image = self.remote.submit(frame, avatar_index, monotonic_of(release), bool(self._subscribers))
        image.add_done_callback(_consume_thread_cancellation)
        _on_loop_when_done(features, loop, lambda done: self._remote_features_ready(done, out, picture, image))
        return out

    def _remote_features_ready(
        self, done: concurrent.futures.Future, out: OutputFrame, picture: asyncio.Future, image: Any
    ) -> None:
        """The device process's verdict on frame ``out`` (in frame order): account for it and
        chain its picture (None from there: the idle frame)."""
        if picture.done():
            return
        if done.cancelled() or out.epoch != self.epoch or self._closed:
            picture.cancel()
            return
        if done.exception() is not None:
            if not isinstance(done.exception(), DeviceFailed):  # that one ends the session anyway
                log.error("frame %d failed on its device: %s", out.index, done.exception())
            active = False
        else:
            active = bool(done.result())
        out.speaking = active
        self._account(active, out.index)
        idle = self.avatar.frames[out.avatar_index]
        if not active:
            picture.set_result(idle)
            return
        self.stats.active_frames += 1
        _on_loop_when_done(image, picture.get_loop(), lambda made: self._picture_made(made, out, picture))

    def _account(self, active: bool, index: int) -> None:
        """A frame's features, in frame order: speaking events, metrics, the talk fraction."""
        self._track_speaking(active, index)
        self.observer.on_frame(active)
        self.stats.talk_fraction += (FRAME_SECONDS / TALK_SECONDS) * (active - self.stats.talk_fraction)

    def _image(
        self, features: FrameFeatures, index: int, avatar_index: int, release: float, arrived: float | None = None
    ) -> np.ndarray | asyncio.Future:
        """Account for a frame's features (in frame order) and start its picture. ``arrived``:
        when its audio went to the feature worker (the device's stage times)."""
        self._account(features.active, index)
        if features.active and self._subscribers:
            request = FrameRequest(self.avatar, avatar_index, features.data)
            wall_deadline = monotonic_of(release)
            try:
                submitted = self.worker.submit(request, wall_deadline, self, arrived=arrived)
            except DeviceFailed:  # the device is out of rotation; the server is ending this session
                return self.avatar.frames[avatar_index]
            image = asyncio.wrap_future(submitted)
            image.add_done_callback(_consume_cancellation)
            self.stats.active_frames += 1
            return image
        return self.avatar.frames[avatar_index]

    def _features_ready(
        self, done: asyncio.Future, out: OutputFrame, picture: asyncio.Future, arrived: float | None = None
    ) -> None:
        """Frame ``out``'s features arrived (callbacks run in frame order): chain its picture."""
        if picture.done():
            return
        if done.cancelled() or out.epoch != self.epoch or self._closed:
            picture.cancel()  # interrupted or closed: outputs show the idle frame
            return
        if done.exception() is not None:
            log.error("features of frame %d failed: %s", out.index, done.exception())
            features = FrameFeatures(active=False, data=None)
        else:
            features = done.result()[0]
        out.speaking = features.active
        try:
            image = self._image(features, out.index, out.avatar_index, out.release, arrived)
        except Exception as exc:  # noqa: BLE001 - e.g. the worker closed during shutdown
            picture.set_exception(exc)
            return
        if isinstance(image, asyncio.Future):
            image.add_done_callback(lambda result: self._picture_made(result, out, picture))
        else:
            picture.set_result(image)

    def _picture_made(
        self, made: asyncio.Future | concurrent.futures.Future, out: OutputFrame, picture: asyncio.Future
    ) -> None:
        """Frame ``out``'s picture came back from its device: pass it on. None (not made) is the
        idle frame; SKIPPED (it could not be on time) holds the session's last picture if it
        belongs to the frames just before, else the idle frame."""
        if picture.done():
            return
        if made.cancelled():
            picture.cancel()
            return
        if made.exception() is not None:
            picture.set_exception(made.exception())  # type: ignore[arg-type]
            return
        image = made.result()
        if image is SKIPPED:
            self.stats.skipped_frames += 1
            out.held = True
            last_index, last = self._last_picture
            recent = last is not None and 0 < out.index - last_index <= HOLD_FRAMES
            image = last if recent else None
        elif image is not None:
            self._last_picture = (out.index, image)
        picture.set_result(self.avatar.frames[out.avatar_index] if image is None else image)

    def _record_latency(self, index: int, release: float) -> None:
        """Audio-to-frame latency: from the arrival of a frame's last input sample to its release."""
        end = (index - self._windower.origin + 1) * SAMPLES_PER_FRAME
        while self._arrivals and self._arrivals[0][0] < end:
            self._arrivals.popleft()
        if self._arrivals:
            arrived = self._arrivals[0][1]
            release_wall = monotonic_of(release)
            latency = max(0.0, release_wall - arrived)
            self.stats.latencies.append(latency)
            self.observer.on_latency(latency)

    def _track_speaking(self, active: bool, index: int) -> None:
        if active:
            self._quiet_since = None
            if not self.speaking:
                self._set_speaking(True, index * FRAME_SECONDS)
        elif self.speaking:
            if self._quiet_since is None:
                self._quiet_since = index
            if index - self._quiet_since + 1 >= self._hangover_frames:
                self._set_speaking(False, self._quiet_since * FRAME_SECONDS)
                self._quiet_since = None

    def _set_speaking(self, speaking: bool, media_time: float) -> None:
        self.speaking = speaking
        if self.on_event is not None:
            kind = "speaking_started" if speaking else "speaking_stopped"
            self.on_event({"type": kind, "media_time": round(media_time, 3)})


def monotonic_of(loop_time: float) -> float:
    """A time on the running loop's clock as ``time.monotonic()``: the clock worker threads and
    other processes share. uvloop's clock is libuv's cached millisecond one, not the same."""
    return time.monotonic() + (loop_time - asyncio.get_running_loop().time())


def _on_loop_when_done(future: concurrent.futures.Future, loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    """``callback(future)`` on ``loop`` once a device's future is done, in the order they finish.

    One loop turn after the future's thread resolves it, where ``asyncio.wrap_future`` takes two
    (a turn to copy the state into its asyncio future, another for that future's callbacks).
    With 26 sessions on an H200 a turn took ~20 ms, and a silent frame's picture waited for the
    features' callback and then for the output's: each saved turn is that much less late."""

    def hand_over(done: concurrent.futures.Future) -> None:
        try:
            loop.call_soon_threadsafe(callback, done)
        except RuntimeError:  # the loop is closed: nobody waits for this frame any more
            pass

    future.add_done_callback(hand_over)


def _consume_cancellation(future: asyncio.Future) -> None:
    """Cancelled (interrupted) frames are expected; keep asyncio from logging them as lost errors."""
    if not future.cancelled():
        future.exception()


def _consume_thread_cancellation(future: Any) -> None:
    """The same for a concurrent future nobody waits on (an interrupted remote frame)."""
    if not future.cancelled():
        future.exception()
