"""A flood on the broker link cannot hold the loop: a callback does ``Link.BUDGET``
deliveries at most, the rest of the read goes on at later loop iterations, in order,
with reading paused meanwhile (issue 18: one 256 KB read of deliveries, each to
thousands, held a worker's loop for seconds)."""

from __future__ import annotations

import asyncio
import socket
import time

import uvloop

from manydoors.node.link import Link
from manydoors.protocol.ipc import Kind, encode_frame
from support.fakes import connect, make_worker, sync_all


async def _pair(on_frame: object) -> tuple[Link, socket.socket]:
    mine, theirs = socket.socketpair()
    link = Link(on_frame, "test")  # type: ignore[arg-type]
    await asyncio.get_running_loop().create_unix_connection(lambda: link, sock=mine)
    return link, theirs


def _close(link: Link, peer: socket.socket) -> None:
    """Close both ends (also when the test failed: an open transport hangs the loop's
    close on the ResourceWarning that warnings-as-errors makes of it)."""
    peer.close()
    if link.transport is not None:
        link.transport.abort()


async def _until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_a_read_over_the_budget_goes_on_at_later_iterations_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        log: list[str] = []
        reading: list[bool] = []
        link: Link

        def on_frame(_: Link, kind: int, key: str, payload: bytes) -> int:
            log.append(key)
            assert link.transport is not None
            reading.append(link.transport.is_reading())
            if key == "0":  # other work that became ready meanwhile (an accept, a read)
                loop.call_soon(log.append, "other")
            return 1000  # two of these fill a callback

        link, peer = await _pair(on_frame)
        link.BUDGET = 2000
        try:
            peer.sendall(b"".join(encode_frame(Kind.DELIVER_CHANNEL, str(i)) for i in range(10)))
            await _until(lambda: len(log) >= 3)
            # The third frame waited for the other work; reading was paused until the last.
            assert log[:4] == ["0", "1", "other", "2"]
            peer.sendall(encode_frame(Kind.DELIVER_CHANNEL, "late"))
            await _until(lambda: "late" in log)
            assert [k for k in log if k != "other"] == [*map(str, range(10)), "late"]
            assert reading[:2] == [True, True] and not any(reading[2:10])
            assert link.transport is not None and link.transport.is_reading()
        finally:
            _close(link, peer)

    uvloop.run(main())


def test_frames_within_the_budget_are_handled_in_the_callback_of_their_read() -> None:
    async def main() -> None:
        log: list[str] = []
        link, peer = await _pair(lambda _l, _k, key, _p: log.append(key))  # None: one each
        try:
            peer.sendall(b"".join(encode_frame(Kind.SYNCED, str(i)) for i in range(500)))
            await _until(lambda: len(log) == 500)
            assert log == [str(i) for i in range(500)]
        finally:
            _close(link, peer)

    uvloop.run(main())


def test_a_worker_under_a_delivery_flood_lets_the_loop_turn() -> None:
    """A real Worker: 200 deliveries to 2,000 subscribers in one read of its link."""

    async def main() -> None:
        worker, fake = make_worker(max_connections=5000, fd_limit=10_000)
        subscribers = []
        for i in range(2000):
            conn, tr = connect(worker, ("10.0.0.1", 10000 + i))
            conn.data_received(b'{"op":"sub","channel":"flood"}\n')
            tr.out.clear()
            subscribers.append(tr)
        sync_all(worker, fake)
        for tr in subscribers:
            tr.out.clear()
        link, peer = await _pair(worker.on_frame)
        line = b'{"ev":"msg","channel":"flood","seq":1,"from":null,"data":0}\n'
        flood = encode_frame(Kind.DELIVER_CHANNEL, "flood", line) * 200
        turns = 0
        done = False

        async def probe() -> None:  # counts the loop's iterations
            nonlocal turns
            while not done:
                await asyncio.sleep(0)
                turns += 1

        task = asyncio.ensure_future(probe())
        try:
            await asyncio.sleep(0)
            turns = 0
            started = time.perf_counter()
            peer.sendall(flood)
            await _until(lambda: len(subscribers[-1].out) == 200)
            took = time.perf_counter() - started
            during = turns
        finally:
            done = True
            await task
            _close(link, peer)
        assert all(len(tr.out) == 200 for tr in subscribers)
        # One message (2,000 deliveries) a callback: the probe ran between them (it ran
        # once in all before: every delivery of the read in one callback).
        assert during >= 100, f"the loop turned {during} times in {took:.2f} s"

    uvloop.run(main())
