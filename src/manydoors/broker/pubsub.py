"""Redis connections of one node: subscribers (one per Redis or cluster shard) and the
standalone publisher's pipeline, as plain streams parsed by hiredis.

redis-py's PubSub object re-subscribes on its own after a reconnect and hands every
message over as a dict; a node needs to know when each subscription is in effect
(so that a client's ``ok`` means "you will get what is published now") and when the
connection is gone (to report ``degraded`` and deliver locally). And redis-py's
per-reply and per-command overhead (a timeout context per reply, a Pipeline that
re-packs its buffer per command: 53 % of the supervisor's time at 12,000 publishes/s,
py-spy) made it the bottleneck of the Redis broker. So the hot connections are an
asyncio stream, commands packed here, replies parsed by hiredis's C reader in bulk.
redis-py still does what is not hot: parsing the URL, the cluster's slot map, and the
cluster's own pipelines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, Final

import hiredis
from redis.asyncio.connection import parse_url

CHUNK: Final = 1000  # topics per command, so a resubscription of a million stays small
READ: Final = 1 << 16


def bulks(args: tuple[Any, ...]) -> bytes:
    """RESP bulk strings of ``args`` (bytes, str or int), without the array header."""
    out = []
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n" % len(args) + bulks(args)


class RespConnection:
    """One connection to one Redis: connect (AUTH, SELECT), write, read replies."""

    def __init__(self, params: dict[str, Any], connect_timeout: float = 2.0) -> None:
        self.params = params
        self.connect_timeout = connect_timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.parser = hiredis.Reader()

    @classmethod
    def from_url(cls, url: str) -> RespConnection:
        params = dict(parse_url(url))
        tls = url.startswith("rediss://")
        params.pop("connection_class", None)
        return cls({**params, "tls": tls})

    async def open(self) -> None:
        p = self.params
        if p.get("path"):
            opening = asyncio.open_unix_connection(p["path"])
        else:
            tls = ssl.create_default_context() if p.get("tls") else None
            opening = asyncio.open_connection(
                p.get("host", "127.0.0.1"), p.get("port", 6379), ssl=tls
            )
        self.reader, self.writer = await asyncio.wait_for(opening, self.connect_timeout)
        self.parser = hiredis.Reader()
        hello = []
        if p.get("password"):
            user = (p["username"],) if p.get("username") else ()
            hello.append(pack("AUTH", *user, p["password"]))
        if p.get("db"):
            hello.append(pack("SELECT", p["db"]))
        if hello:
            for reply in await self.call(hello):
                if isinstance(reply, Exception):
                    raise ConnectionError(f"redis: {reply}")

    def write(self, data: bytes) -> None:
        if self.writer is None:
            raise ConnectionError("not connected")
        self.writer.write(data)

    async def call(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands; return each reply (an error reply is a ReplyError)."""
        self.write(b"".join(commands))
        assert self.writer is not None
        await self.writer.drain()
        replies: list[Any] = []
        while len(replies) < len(commands):
            replies.extend(await self.read())
        return replies

    async def read(self) -> list[Any]:
        """Whatever complete replies (or pushes) have arrived; waits for at least one."""
        parser = self.parser
        out: list[Any] = []
        while not out:
            assert self.reader is not None
            data = await self.reader.read(READ)
            if not data:
                raise ConnectionError("Redis closed the connection")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                out.append(reply)
        return out

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Shard:
    """One subscriber connection and its writer and reader tasks."""

    def __init__(
        self,
        name: str,
        conn: RespConnection,
        on_push: Callable[[Shard, list[Any]], None],
        on_lost: Callable[[Shard, BaseException | None], None],
        sharded: bool = False,
    ) -> None:
        self.name = name
        self.conn = conn
        self.sharded = sharded
        self.on_push = on_push
        self.on_lost = on_lost
        # (command, topic) in the order asked; consecutive runs of one command go out as
        # one SUBSCRIBE t1 t2 ... (Redis confirms each topic on its own).
        self.ops: list[tuple[bytes, bytes]] = []
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.lost = False

    async def open(self) -> None:
        """Connect (raises on failure) and start the reader and writer."""
        await self.conn.open()
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]

    def send(self, command: bytes, topic: bytes) -> None:
        self.ops.append((command, topic))
        self.wake.set()

    async def _write(self) -> None:
        # A cluster takes only channels of one slot per SSUBSCRIBE: one topic each.
        chunk = 1 if self.sharded else CHUNK
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                ops, self.ops = self.ops, []
                packed = [
                    pack(command, *topics[i : i + chunk])
                    for command, topics in _runs(ops)
                    for i in range(0, len(topics), chunk)
                ]
                self.conn.write(b"".join(packed))
                assert self.conn.writer is not None
                await self.conn.writer.drain()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(exc)

    async def _read(self) -> None:
        on_push = self.on_push
        try:
            while True:
                for push in await self.conn.read():
                    if isinstance(push, Exception):  # e.g. MOVED after a resharding
                        raise push
                    on_push(self, push)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any error of the connection: it is gone
            self._lost(exc)

    def _lost(self, exc: BaseException | None) -> None:
        if not self.lost:
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
        await self.conn.close()


class RawPipeline:
    """The standalone publisher: batches of packed commands on one connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: RespConnection | None = None

    async def reset(self) -> None:
        """Drop the connection (after an outage it is dead); the next batch reconnects."""
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.close()

    async def execute(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands; return each reply, or the ReplyError it was."""
        if self.conn is None:
            conn = RespConnection.from_url(self.url)
            await conn.open()
            self.conn = conn
        try:
            return await self.conn.call(commands)
        except BaseException:
            await self.reset()
            raise


def _runs(ops: list[tuple[bytes, bytes]]) -> list[tuple[bytes, list[bytes]]]:
    runs: list[tuple[bytes, list[bytes]]] = []
    for command, topic in ops:
        if runs and runs[-1][0] == command:
            runs[-1][1].append(topic)
        else:
            runs.append((command, [topic]))
    return runs
