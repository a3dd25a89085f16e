"""Redis connections of one node: subscribers (one per Redis or cluster shard) and the
standalone publisher's pipeline, on plain redis-py Connections.

redis-py's PubSub object re-subscribes on its own after a reconnect and hands every
message over as a dict; a node needs to know when each subscription is in effect
(so that a client's ``ok`` means "you will get what is published now") and when the
connection is gone (to report ``degraded`` and deliver locally). So each shard is a
plain redis-py Connection: commands written in batches, pushes read in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

# (command, topic) in the order they were asked; consecutive runs of one command are
# sent as one SUBSCRIBE t1 t2 ... (Redis confirms each topic on its own).
Op = tuple[bytes, bytes]
CHUNK = 1000  # topics per command, so a resubscription of a million stays in small writes


class Shard:
    """One pub/sub connection and its writer and reader tasks."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], AbstractConnection],
        on_push: Callable[[Shard, list[Any]], None],
        on_lost: Callable[[Shard, BaseException | None], None],
        sharded: bool = False,
    ) -> None:
        self.name = name
        self.sharded = sharded
        self.connect = connect
        self.on_push = on_push
        self.on_lost = on_lost
        self.conn: AbstractConnection | None = None
        self.ops: list[Op] = []
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.lost = False

    async def open(self) -> None:
        """Connect (raises on failure) and start the reader and writer."""
        conn = self.connect()
        await conn.connect()  # type: ignore[no-untyped-call]
        self.conn = conn
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]

    def send(self, command: bytes, topic: bytes) -> None:
        self.ops.append((command, topic))
        self.wake.set()

    async def _write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            ops, self.ops = self.ops, []
            conn = self.conn
            if conn is None:
                return
            # A cluster takes only channels of one slot per SSUBSCRIBE: one topic each.
            chunk = 1 if self.sharded else CHUNK
            packed: list[bytes] = []
            for command, topics in _runs(ops):
                for i in range(0, len(topics), chunk):
                    packed += conn.pack_command(command, *topics[i : i + chunk])
            try:
                await conn.send_packed_command(packed, False)
            except Exception as exc:  # OSError or redis-py's own ConnectionError
                self._lost(exc)
                return

    async def _read(self) -> None:
        conn = self.conn
        assert conn is not None
        try:
            while True:
                push = await conn.read_response(
                    timeout=None, disconnect_on_error=False, push_request=True
                )
                if isinstance(push, list):
                    self.on_push(self, push)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any error of the connection: it is gone
            self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if self.conn is None or self.lost:
            return
        self.lost = True
        self.on_lost(self, exc)  # the owner closes us (and the other shards)

    async def close(self) -> None:
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.tasks = []
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()


def _runs(ops: list[Op]) -> list[tuple[bytes, list[bytes]]]:
    runs: list[tuple[bytes, list[bytes]]] = []
    for command, topic in ops:
        if runs and runs[-1][0] == command:
            runs[-1][1].append(topic)
        else:
            runs.append((command, [topic]))
    return runs


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP (what redis-py's pack_commands does, minus its copying)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RawPipeline:
    """Commands written in one batch on one plain connection, replies read in order.

    redis-py's Pipeline re-packs its whole buffer for every command it adds, which made
    packing 53 % of the supervisor's time at 12,000 publishes/s (py-spy); this is the
    standalone publisher's path (a cluster routes through redis-py's ClusterPipeline).
    """

    def __init__(self, connect: Callable[[], AbstractConnection]) -> None:
        self.connect = connect
        self.conn: AbstractConnection | None = None

    async def reset(self) -> None:
        """Drop the connection (after an outage it is dead); the next batch reconnects."""
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect()

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands; return each reply, or the ResponseError it was."""
        conn = self.conn
        if conn is None:
            conn = self.connect()
            await conn.connect()  # type: ignore[no-untyped-call]
            self.conn = conn
        try:
            await conn.send_packed_command([b"".join(commands)], False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # one command failed; the stream is intact
                    replies.append(exc)
            return replies
        except BaseException:
            self.conn = None
            await conn.disconnect()
            raise
