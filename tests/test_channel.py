"""The message channel between the server and its worker processes (pipeline/ipc/channel.py).

Both ends live in this process here (a multiprocessing Pipe works within one process), so the
tests see exactly what crosses the pipe."""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe

from pipeline.ipc.channel import Channel

WAIT = 10.0  # liveness bound only


def test_a_burst_crosses_as_one_write_and_arrives_message_by_message() -> None:
    """While the writer is blocked (the reader has not read a large message yet), 50 messages
    queue up; they then cross in one write (or in the large message's, if they were queued before
    the writer woke), and a listening channel hands them on one by one, in order."""
    ours, theirs = Pipe(duplex=True)
    channel = Channel(ours, "test")
    big = ("big", b"x" * (1 << 20))  # larger than the pipe holds: the writer blocks on it
    channel.send(big)
    burst = [("frame", i, b"y" * 100) for i in range(50)]
    for message in burst:
        channel.send(message)
    writes = [theirs.recv()]  # only now can the writer finish the big one and see the queue
    while sum(len(w) if isinstance(w, list) else 1 for w in writes) < 51:
        writes.append(theirs.recv())
    assert len(writes) <= 2, [type(w) for w in writes]  # not 51 writes
    assert [m for w in writes for m in (w if isinstance(w, list) else [w])] == [big, *burst]

    # the same burst, read by a channel: handlers never see the batch
    got: list = []
    done = threading.Event()
    reader = Channel(theirs, "reader")
    reader.listen_in_thread(lambda m: (got.append(m), len(got) == 51 and done.set()), lambda: None)
    channel.send(big)
    for message in burst:
        channel.send(message)
    assert done.wait(WAIT)
    assert got == [big, *burst]
    channel.close()
    reader.close()


def test_a_message_that_cannot_be_pickled_costs_only_itself() -> None:
    """A batch holding a message that cannot be pickled is resent message by message: the others
    arrive, in order, and the channel keeps working."""
    ours, theirs = Pipe(duplex=True)
    channel = Channel(ours, "test")
    channel.send(("big", b"x" * (1 << 20)))
    channel.send(("a", 1))
    channel.send(("bad", threading.Lock()))  # locks cannot be pickled
    channel.send(("b", 2))
    assert theirs.recv()[0] == "big"
    assert theirs.recv() == ("a", 1)
    assert theirs.recv() == ("b", 2)
    channel.send(("c", 3))
    assert theirs.recv() == ("c", 3)
    channel.close()


def test_close_sends_what_was_queued_first() -> None:
    ours, theirs = Pipe(duplex=True)
    channel = Channel(ours, "test")
    channel.send(("big", b"x" * (1 << 20)))
    for i in range(5):
        channel.send(("m", i))
    closer = threading.Thread(target=channel.close)
    closer.start()
    received = [theirs.recv()]
    while True:
        try:
            received.append(theirs.recv())
        except EOFError:
            break
    closer.join(WAIT)
    flat = [m for r in received for m in (r if isinstance(r, list) else [r])]
    assert [m[0] for m in flat] == ["big", "m", "m", "m", "m", "m"] and [m[1] for m in flat[1:]] == list(range(5))


def test_a_batch_listener_gets_a_burst_as_lists_in_order() -> None:
    """``listen_batches_in_thread`` hands the messages that crossed together as one list (a
    device process queues a burst of frames with one lock and one wake-up of its feature thread)."""
    ours, theirs = Pipe(duplex=True)
    channel = Channel(ours, "test")
    reader = Channel(theirs, "reader")
    lists: list[list] = []
    done = threading.Event()

    def handle(messages: list) -> None:
        lists.append(messages)
        if sum(len(m) for m in lists) == 51:
            done.set()

    reader.listen_batches_in_thread(handle, lambda: None)
    big = ("big", b"x" * (1 << 20))
    channel.send(big)  # the writer blocks on it while the burst queues up
    burst = [("frame", i) for i in range(50)]
    for message in burst:
        channel.send(message)
    assert done.wait(WAIT)
    assert all(isinstance(m, list) for m in lists)
    assert len(lists) <= 3, [len(m) for m in lists]  # the big one, then the burst in one or two lists
    assert [m for received in lists for m in received] == [big, *burst]
    channel.close()
    reader.close()


def test_work_a_message_brings_runs_on_the_sending_thread_first() -> None:
    """``send(message, before=...)``: ``before`` runs on the channel's sending thread, after the
    messages queued earlier and before its own message is written; if it fails, only its message
    is dropped."""
    ours, theirs = Pipe(duplex=True)
    channel = Channel(ours, "test")
    ran: list[tuple[str, str]] = []

    def work(name: str) -> None:
        ran.append((name, threading.current_thread().name))

    def broken() -> None:
        raise RuntimeError("copy failed")

    channel.send(("a", 1))
    channel.send(("b", 2), before=lambda: work("b"))
    channel.send(("bad", 3), before=broken)
    channel.send(("c", 4))
    got = []
    while len(got) < 3:
        received = theirs.recv()
        got.extend(received if isinstance(received, list) else [received])
    assert got == [("a", 1), ("b", 2), ("c", 4)]
    assert ran == [("b", "channel-out-test")]
    channel.close()


def test_a_coalescing_channel_queues_a_loop_turns_messages_as_one_item_in_order() -> None:
    """``coalesce=True``: what an event loop's thread sends in one turn is queued when the turn
    ends (one wake-up of the sending thread, not one per message), after anything sent before it
    and before anything another thread sends later; ``flush()`` queues it at once."""
    import asyncio

    ours, theirs = Pipe(duplex=True)
    channel = Channel(ours, "test", coalesce=True)
    puts: list = []

    class Outbox:  # records what is queued for the sending thread
        def __init__(self, inner) -> None:
            self.inner = inner

        def put(self, item) -> None:
            puts.append(item)
            self.inner.put(item)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    channel._outbox = Outbox(channel._outbox)  # type: ignore[assignment]

    async def scenario() -> None:
        for i in range(5):
            channel.send(("turn", i))
        assert puts == []  # not yet: the turn has not ended
        await asyncio.sleep(0)
        assert len(puts) == 1 and list(puts[0]) == [("turn", i) for i in range(5)]
        channel.send(("next", 0))
        await asyncio.to_thread(channel.send, ("thread", 1))  # another thread: after the loop's
        channel.send(("flushed", 2))
        channel.flush()
        assert len(puts) == 4
        # a long turn does not hold its first messages back for all of it
        channel.send(("long", 0))
        time.sleep(0.003)  # the turn goes on, past COALESCE_SECONDS
        channel.send(("long", 1))
        assert len(puts) == 5 and list(puts[4]) == [("long", 0)]
        await asyncio.sleep(0)
        assert len(puts) == 6

    asyncio.run(scenario())
    got: list = []
    while len(got) < 10:
        received = theirs.recv()
        got.extend(received if isinstance(received, list) else [received])
    assert got == [*(("turn", i) for i in range(5)), ("next", 0), ("thread", 1), ("flushed", 2), ("long", 0), ("long", 1)]
    channel.close()


def test_listen_prepares_on_the_receiving_thread_and_wakes_the_loop_once_per_arrival() -> None:
    """``prepare`` sees every message in order on the receiving thread (a message it fails on, or
    answers None for, never reaches the loop); what arrived as one batch reaches the loop in one
    callback, still one message at a time to the handler."""
    import asyncio

    ours, theirs = Pipe(duplex=True)
    sender = Channel(ours, "test")

    async def scenario() -> tuple[list, list, set, int]:
        loop = asyncio.get_running_loop()
        handled: list = []
        prepared_on: set = set()
        wakeups = 0
        done = asyncio.Event()

        def prepare(message: tuple) -> tuple | None:
            prepared_on.add(threading.current_thread().name)
            if message[0] == "bad":
                raise ValueError("refused")
            return None if message[0] == "skip" else ("ready", *message[1:])

        def handle(message: tuple) -> None:
            handled.append(message)
            if message == ("ready", "last"):
                done.set()

        original = loop.call_soon_threadsafe

        def counting(callback, *args):  # noqa: ANN001, ANN202
            nonlocal wakeups
            wakeups += 1
            return original(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        reader = Channel(theirs, "reader")
        reader.listen(loop, handle, lambda: None, prepare=prepare)
        sender.send(("big", b"x" * (1 << 20)))  # the writer blocks on it: what follows queues up
        for i in range(20):
            sender.send(("frame", i))
        sender.send(("skip", 0))
        sender.send(("bad", 0))
        sender.send(("end", "last"))
        await asyncio.wait_for(done.wait(), WAIT)
        reader.close()
        return handled, [m for m in handled if m[1:2] != (b"x" * (1 << 20),)], prepared_on, wakeups

    handled, small, prepared_on, wakeups = asyncio.run(scenario())
    assert small == [*(("ready", i) for i in range(20)), ("ready", "last")]
    assert len(handled) == 22 and handled[0][0] == "ready"
    assert prepared_on == {"channel-in-reader"}
    assert wakeups <= 3  # 22 messages in at most a few arrivals, not one wake-up each
    sender.close()
