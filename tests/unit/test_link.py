"""The worker <-> broker link over a real socketpair: batching and coalescing of writes."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from manydoors.node.link import Link
from manydoors.protocol.ipc import IpcParser, Kind


async def _pair(coalesce: float) -> tuple[Link, socket.socket]:
    mine, theirs = socket.socketpair()
    theirs.setblocking(False)
    link = Link(lambda *_: None, "test")
    link.COALESCE_S = coalesce
    await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=mine)
    return link, theirs


def _writes(sock: socket.socket) -> list[list[tuple[int, str]]]:
    """What arrived so far, one list of (kind, key) per read (a read is at least a write)."""
    reads = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return reads
        reads.append([(kind, key) for kind, key, _ in IpcParser().feed(data)])


def test_an_idle_link_writes_at_once_a_busy_one_once_per_coalesce_interval() -> None:
    async def main() -> None:
        link, peer = await _pair(coalesce=0.5)
        link.send(Kind.SUB, "a")
        link.send(Kind.SUB, "b")
        await asyncio.sleep(0.05)
        # Frames of one loop iteration go in one write, at once: the link was idle.
        assert _writes(peer) == [[(Kind.SUB, "a"), (Kind.SUB, "b")]]
        link.send(Kind.SUB, "c")
        await asyncio.sleep(0.05)
        link.send(Kind.SUB, "d")
        await asyncio.sleep(0.05)
        assert _writes(peer) == []  # written 0.1 s ago: these wait for the interval
        await asyncio.sleep(0.5)
        assert _writes(peer) == [[(Kind.SUB, "c"), (Kind.SUB, "d")]]
        await asyncio.sleep(0.55)
        link.send(Kind.SUB, "e")  # idle for longer than the interval: at once again
        await asyncio.sleep(0.05)
        assert _writes(peer) == [[(Kind.SUB, "e")]]
        peer.close()

    uvloop.run(main())


def test_at_flush_hook_runs_once_and_its_frames_end_that_write() -> None:
    async def main() -> None:
        link, peer = await _pair(coalesce=0.5)
        calls: list[int] = []

        def hook() -> None:
            calls.append(1)
            link.send(Kind.SYNC)

        link.at_flush(hook)  # nothing queued yet: the hook alone schedules the write
        await asyncio.sleep(0.05)
        assert calls == [1]
        assert _writes(peer) == [[(Kind.SYNC, "")]]
        link.send(Kind.USER_ON, "u1")
        link.at_flush(hook)
        link.send(Kind.USER_ON, "u2")
        link.at_flush(hook)  # set twice before the write: still one call
        await asyncio.sleep(0.6)
        assert calls == [1, 1]
        assert _writes(peer) == [[(Kind.USER_ON, "u1"), (Kind.USER_ON, "u2"), (Kind.SYNC, "")]]
        await asyncio.sleep(0.55)
        assert _writes(peer) == []  # the hook's frame scheduled no extra write
        peer.close()

    uvloop.run(main())


def test_a_message_frame_never_waits_and_takes_the_waiting_frames_along() -> None:
    async def main() -> None:
        link, peer = await _pair(coalesce=0.5)
        link.send(Kind.SUB, "a")
        await asyncio.sleep(0.05)
        assert _writes(peer) == [[(Kind.SUB, "a")]]
        link.send(Kind.USER_ON, "u")  # waits for the interval...
        link.send(Kind.PUB, "a", b"[null,1]")  # ...until a message comes: both go now
        await asyncio.sleep(0.05)
        assert _writes(peer) == [[(Kind.USER_ON, "u"), (Kind.PUB, "a")]]
        link.send(Kind.DELIVER_CHANNEL, "a", b"{}\n")
        await asyncio.sleep(0.05)
        assert _writes(peer) == [[(Kind.DELIVER_CHANNEL, "a")]]
        peer.close()

    uvloop.run(main())
