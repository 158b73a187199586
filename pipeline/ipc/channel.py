"""A message channel between the server process and a worker process (peers, a device).

Why threads on both ends: a pipe holds ~64 KiB; if the other side is slow, ``Connection.send``
blocks, and on the event loop that would stall every session of the process. And the pipe must
stay a *blocking* file descriptor: registering it with the loop (``add_reader``) lets uvloop
(libuv) switch it to non-blocking, after which a full pipe makes a send fail with EAGAIN and a
half-arrived message makes a receive fail, silently cutting the channel (seen on the GPU load
test: every peer request timed out once 30 sessions filled the pipe). So one thread writes
queued messages in order, another reads and hands each message to the loop with
``call_soon_threadsafe`` (or, for a device's channel, handles it right there: resolving a
frame's future needs no loop).

Messages are small tuples (commands, 40 ms of audio, a frame's ring slot): pictures never travel
through the pipe, they go through :class:`~pipeline.ipc.frame_ring.FrameRing` shared memory.
Messages queued while the writer was busy go as one batch (a device's batch of 24 pictures
otherwise meant 24 pickles, writes and reader wake-ups); the reader hands them on one by one,
so handlers never see a batch. A message can bring work for the sending thread (``send(message,
before=...)``): the server's feeds copy each picture into its ring there, just before the
message naming the slot goes, instead of on the event loop (at 26 sessions on an H200 those
786 KB copies were 23 % of the loop thread's samples; numpy copies without the GIL). bench/channel_batching.py: in bursts of 24 the sender's CPU per
message fell from 12.7 to 2.3 us, in bursts of 8 both ends' by about a third.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("lipstream.peers")

_STOP = object()
#: Most queued messages the sender writes as one (one pickle, one write, one wake-up of the reader).
MAX_BATCH = 64
#: Longest a coalescing channel holds a loop turn's first message before queueing what it has (s).
COALESCE_SECONDS = 0.002


class _Prepared:
    """A queued message whose sending thread runs ``before`` first (:meth:`Channel.send`)."""

    __slots__ = ("before", "message")

    def __init__(self, before: Callable[[], object], message: Any) -> None:
        self.before = before
        self.message = message


_DROPPED = object()


class _Batch(list):
    """Messages that were queued together, sent as one; the receiver hands them on one by one."""


class _Group(list):
    """Items one loop turn queued (``coalesce``): one item of the outbox, unpacked in order."""


class _Deaf(Exception):
    """The receiving end has nobody to hand messages to any more."""


class Channel:
    """One end of a duplex pipe: ``send`` from anywhere, ``handler(message)`` on the loop."""

    def __init__(self, conn: Connection, name: str, coalesce: bool = False) -> None:
        self.conn = conn
        self.name = name
        self.closed = False
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # coalesce: what an event loop's thread sends during one turn of it is queued at the
        # turn's end, as one item (see send)
        self._coalesce = coalesce
        self._pending: list[Any] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._pending_since = 0.0
        self._flush_scheduled = False
        self._lock = threading.Lock()
        self._sender = threading.Thread(target=self._send_loop, name=f"channel-out-{name}", daemon=True)
        self._sender.start()
        self._receiver: threading.Thread | None = None

    def listen(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Callable[[Any], None],
        on_closed: Callable[[], None],
        prepare: Callable[[Any], Any] | None = None,
    ) -> None:
        """Call ``handler`` on ``loop`` for every message; ``on_closed`` once the other end is gone.

        ``prepare``, if given, runs on the receiving thread for each message, in order, as it
        arrives; what it returns is handed to ``handler`` (None: nothing is). Work that need not
        run on the loop goes there (a peer process copies each frame out of shared memory the
        moment its message arrives). The messages that arrived together reach the loop in one
        callback: one wake-up of the loop per arrival, not per message."""

        def deliver(messages: list[Any]) -> None:
            for message in messages:
                try:
                    handler(message)
                except Exception:  # a bad message must not stop the channel
                    log.exception("%s: handling %r failed", self.name, message[:1])

        def closed() -> None:
            try:
                loop.call_soon_threadsafe(on_closed)
            except RuntimeError:  # the loop is closed
                pass

        def hand_over(messages: list[Any]) -> None:
            if prepare is not None:
                ready = []
                for message in messages:
                    try:
                        message = prepare(message)
                    except Exception:  # a bad message must not stop the channel
                        log.exception("%s: preparing %r failed", self.name, message[:1])
                        continue
                    if message is not None:
                        ready.append(message)
                messages = ready
            if not messages:
                return
            try:
                loop.call_soon_threadsafe(deliver, messages)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                raise _Deaf from None

        self.listen_batches_in_thread(hand_over, closed)

    def listen_in_thread(self, handler: Callable[[Any], None], on_closed: Callable[[], None]) -> None:
        """Call ``handler`` for every message on the receiving thread itself, in order; for ends
        without an event loop, or whose handling is quick and thread-safe (resolving futures)."""

        def each(messages: list[Any]) -> None:
            for message in messages:
                try:
                    handler(message)
                except _Deaf:
                    raise
                except Exception:  # a bad message must not stop the channel
                    log.exception("%s: handling %r failed", self.name, message[:1])

        self.listen_batches_in_thread(each, on_closed)

    def listen_batches_in_thread(self, handler: Callable[[list[Any]], None], on_closed: Callable[[], None]) -> None:
        """Like :meth:`listen_in_thread`, but ``handler`` gets the messages that arrived together
        as one list (in order): an end that does one thing per message (a device process queueing
        frames for its feature thread) can then do it once per arrival, with one lock and one
        wake-up of the thread it feeds instead of one per message. A handler that raises loses
        the rest of its list (logged); it should guard each message itself."""

        def receive() -> None:
            while True:
                try:
                    received = self.conn.recv()
                except (EOFError, OSError):
                    break
                try:
                    handler(received if isinstance(received, _Batch) else [received])
                except _Deaf:
                    return
                except Exception:  # a bad message must not stop the channel
                    log.exception("%s: handling a batch of messages failed", self.name)
            self.closed = True
            on_closed()

        self._receiver = threading.Thread(target=receive, name=f"channel-in-{self.name}", daemon=True)
        self._receiver.start()

    def send(self, message: Any, before: Callable[[], object] | None = None) -> None:
        """Queue ``message``; ``before``, if given, runs on the sending thread just before the
        message is written (after every message queued earlier): work the message announces
        that need not hold up the caller, such as copying a frame into the shared memory the
        message names. If ``before`` raises, the message is dropped (and the error logged)."""
        if self.closed:
            return
        item = message if before is None else _Prepared(before, message)
        loop = asyncio._get_running_loop() if self._coalesce else None  # (a C call: no exception when none)
        with self._lock:
            if loop is not None:
                # Every put wakes the sending thread (a futex wake, across cores in a VM): the
                # server's loop sends ~1,600 messages a second at 26 sessions, a few per session
                # per turn, so a turn's messages go as one item when the turn ends.
                # A long turn (tens of ms on a loaded server) must not hold early messages back
                # for all of it: what waited COALESCE_SECONDS goes now.
                now = time.monotonic()
                if self._pending and (self._pending_loop is not loop or now - self._pending_since > COALESCE_SECONDS):
                    self._queue_pending()
                self._pending.append(item)
                if len(self._pending) == 1:
                    self._pending_since = now
                    if self._pending_loop is not loop or not self._flush_scheduled:
                        self._pending_loop = loop
                        self._flush_scheduled = True
                        loop.call_soon(self._flush_at_turn_end)
                return
            self._queue_pending()  # keep the order of what a loop sent before
            self._outbox.put(item)

    def _flush_at_turn_end(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            self._queue_pending()

    def flush(self) -> None:
        """Queue what the current loop turn sent so far (``coalesce``) now, not at the turn's end."""
        with self._lock:
            self._queue_pending()

    def _queue_pending(self) -> None:
        if self._pending:
            self._outbox.put(_Group(self._pending))
            self._pending = []

    def _send_loop(self) -> None:
        """Writes what is queued in order; whatever queued up meanwhile goes as one batch (a
        device's batch of pictures, a feature pass's frames): one pickle and one write instead
        of up to ``MAX_BATCH``, and one wake-up of the reader."""
        while True:
            batch = self._unpack(self._outbox.get())
            while (not batch or batch[-1] is not _STOP) and len(batch) < MAX_BATCH:
                try:
                    batch.extend(self._unpack(self._outbox.get_nowait()))
                except queue.Empty:
                    break
            stop = bool(batch) and batch[-1] is _STOP
            if stop:
                batch.pop()
            batch = [message for message in map(self._prepare, batch) if message is not _DROPPED]
            if batch and not self._write(batch):
                return
            if stop:
                return

    @staticmethod
    def _unpack(item: Any) -> list[Any]:
        """The messages of one queued item (a loop turn's group, or one message)."""
        return list(item) if isinstance(item, _Group) else [item]

    def _prepare(self, item: Any) -> Any:
        """The message to write for a queued item: a prepared one's work done first."""
        if not isinstance(item, _Prepared):
            return item
        try:
            item.before()
        except Exception:  # noqa: BLE001 - the message would announce work that did not happen
            log.exception("%s: preparing %r failed; not sent", self.name, item.message[:1])
            return _DROPPED
        return item.message

    def _write(self, batch: list[Any]) -> bool:
        """False once the pipe is gone. A batch that cannot be pickled is sent message by
        message, so only the bad message is lost (and logged)."""
        try:
            self.conn.send(_Batch(batch) if len(batch) > 1 else batch[0])
            return True
        except (OSError, ValueError):
            self.closed = True
            return False
        except Exception:
            if len(batch) == 1:
                log.exception("%s: cannot send %r", self.name, batch[0][:1])
                return True
        return all(self._write([message]) for message in batch)

    def close(self) -> None:
        """Stop sending (after what is queued), then end the receiver and close the pipe.

        The receiving thread is woken (a shutdown of the socket) and joined before the file
        descriptor is closed: closed under a thread blocked in ``recv``, its number could be
        reused by the next pipe opened, whose bytes that thread would then steal (seen in the
        tests as a message arriving empty, or never)."""
        self.flush()
        self._outbox.put(_STOP)
        self._sender.join(timeout=2)
        self.closed = True
        try:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as end:
                end.shutdown(socket.SHUT_RDWR)  # the whole socket: recv returns, the other end sees EOF
        except OSError:  # not a socket (a one-way pipe), or already gone
            pass
        if self._receiver is not None and self._receiver is not threading.current_thread():
            self._receiver.join(timeout=2)
        self.conn.close()
