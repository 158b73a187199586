"""A message channel between the server process and a peer process, usable from asyncio.

Why a thread for sending: a pipe holds ~64 KiB; if the other side is slow, ``Connection.send``
blocks, and on the event loop that would stall every session of the process. Messages are put
on a queue and written (pickled) by one thread, in order. Receiving uses the loop's reader
callback on the pipe's file descriptor, so nothing polls.

Messages are small tuples (commands, 40 ms of audio, a frame's ring slot): pictures never travel
through the pipe, they go through :class:`~server.frame_ring.FrameRing` shared memory.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger("lipstream.peers")

_STOP = object()


class Channel:
    """One end of a duplex pipe: ``send`` from anywhere, ``handler(message)`` on the loop."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.closed = False
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"channel-{name}", daemon=True)
        self._sender.start()
        self._loop: asyncio.AbstractEventLoop | None = None

    def listen(
        self, loop: asyncio.AbstractEventLoop, handler: Callable[[Any], None], on_closed: Callable[[], None]
    ) -> None:
        """Call ``handler`` on ``loop`` for every message; ``on_closed`` once the other end is gone."""
        self._loop = loop

        def readable() -> None:
            try:
                while self.conn.poll():
                    message = self.conn.recv()
                    try:
                        handler(message)
                    except Exception:  # a bad message must not stop the channel
                        log.exception("%s: handling %r failed", self.name, message[:1])
            except (EOFError, OSError):
                self._reader_gone()
                on_closed()

        loop.add_reader(self.conn.fileno(), readable)

    def _reader_gone(self) -> None:
        if self._loop is not None and not self.conn.closed:
            try:
                self._loop.remove_reader(self.conn.fileno())
            except (ValueError, OSError):
                pass
        self.closed = True

    def send(self, message: Any) -> None:
        if not self.closed:
            self._outbox.put(message)

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message is _STOP:
                return
            try:
                self.conn.send(message)
            except (OSError, ValueError, BrokenPipeError):
                self.closed = True
                return

    def close(self) -> None:
        """Stop sending (after what is queued) and reading; close the pipe."""
        self._outbox.put(_STOP)
        self._sender.join(timeout=2)
        self._reader_gone()
        self.conn.close()
