"""An asyncio client library for applications: calls, events, reconnect, resubscribe.

::

    async with Client("127.0.0.1", 7000, user="alice") as c:
        await c.subscribe("news")
        await c.publish("news", {"text": "hi"})
        async for event in c:
            print(event)

Events are the server's dicts (``msg``, ``dm``, ``broadcast``), plus ``gap`` events
made by the client. On a lost connection (EOF, reset, ``bye``) the client reconnects
with full-jitter exponential backoff, says ``hello`` again and resubscribes every
channel with ``since`` = the last ``seq`` it saw, so the server replays what was
missed: each message is yielded once and in order across a reconnect, as long as the
gap fits in the channel's history. When it does not, the server answers
``recovered: false`` and the iterator yields
``{"ev": "gap", "channel": C, "since": last_seq, "seq": channel_seq}`` before the
channel's next messages. Seqs that jump while connected (an outage of Redis leaves a
hole, a slow reader's messages may be dropped) give the same ``gap`` first; a ``msg``
with ``seq`` 0 (sent by a node cut off from Redis) is yielded as it comes.

Calls are not retried: a call in flight when the connection drops, or made while
the client is reconnecting, raises :class:`ConnectionError`. The exception is
``subscribe``, whose channel is remembered as soon as it is called, so it is
subscribed again once the connection is back even if the call raised. A channel
the server refuses on resubscribe (an ``error``) is dropped and logged.

The client answers the server's heartbeat (``{"ev":"ping"}``) with ``{"op":"pong"}``
by itself. For a service with TLS, pass ``ssl=`` an ``ssl.SSLContext``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
from types import TracebackType
from typing import Any

import msgspec

__all__ = ["Client", "ClientError"]

log = logging.getLogger(__name__)

# Server lines are capped by its max_message_bytes (64 KiB by default) plus the
# envelope; leave room for services configured with a larger cap.
READ_LIMIT = 16 * 1024 * 1024
_CLOSED = object()
_PONG = b'{"op":"pong"}\n'  # the answer to the server's heartbeat {"ev":"ping"}


class ClientError(Exception):
    """The server answered an op with an ``error`` event."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class Client:
    """One logical connection to a manydoors TCP service, kept alive across drops."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        user: str | None = None,
        token: str | None = None,
        backoff: tuple[float, float] = (0.1, 5.0),
        connect_timeout: float = 5.0,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.ssl = ssl  # for a service with tls_cert (None: plain TCP)
        self.user, self.token = user, token
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        #: The last ``welcome`` event (``worker`` is the slot of the worker we are on).
        self.welcome: dict[str, Any] = {}
        #: How many times the connection was re-established after a loss.
        self.reconnects = 0
        # channel -> last seq seen (None until the first msg): what to resubscribe.
        self._subs: dict[str, int | None] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], dict[str, Any]]] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connected = False
        self._closed = False

    @property
    def connected(self) -> bool:
        """True while a connection is up and its hello and subscriptions are done."""
        return self._connected

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect once (raising if that fails), then keep reconnecting until close()."""
        if self._supervisor is not None:
            return
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        """Close the connection and stop reconnecting; the event iterator then ends."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._drop()
        self._events.put_nowait(_CLOSED)

    # -- calls -------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Join ``channel``; returns once the server confirms it took effect node-wide."""
        self._subs.setdefault(channel, None)
        try:
            await self._call({"op": "sub", "channel": channel})
        except ClientError:
            self._subs.pop(channel, None)
            raise

    async def unsubscribe(self, channel: str) -> None:
        """Leave ``channel``; its messages still in flight are dropped by the client."""
        self._subs.pop(channel, None)
        await self._call({"op": "unsub", "channel": channel})

    async def publish(self, channel: str, data: Any) -> None:
        """Publish ``data`` (any JSON value) to ``channel``."""
        await self._call({"op": "pub", "channel": channel, "data": data})

    async def send(self, user: str, data: Any) -> None:
        """Send ``data`` as a direct message to every connection of ``user``."""
        await self._call({"op": "send", "user": user, "data": data})

    async def presence(self, channel: str) -> dict[str, Any]:
        """The ``presence`` event for ``channel``: ``users``, ``anonymous``, ``partial``."""
        return await self._call({"op": "presence", "channel": channel})

    async def ping(self) -> None:
        await self._call({"op": "ping"})

    async def _call(self, op: dict[str, Any], *, handshake: bool = False) -> dict[str, Any]:
        if not (self._connected or handshake) or self._writer is None:
            raise ConnectionError("not connected")
        op["id"] = ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = (future, op)
        try:
            self._writer.write(msgspec.json.encode(op) + b"\n")
            await self._writer.drain()
            return await future
        finally:
            self._pending.pop(ident, None)

    # -- events ------------------------------------------------------------------

    async def next(self) -> dict[str, Any]:
        """The next ``msg``/``dm``/``broadcast``/``gap`` event; ConnectionError once closed."""
        event = await self._events.get()
        if event is _CLOSED:
            self._events.put_nowait(_CLOSED)
            raise ConnectionError("client closed")
        result: dict[str, Any] = event
        return result

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self.next()
        except ConnectionError:
            raise StopAsyncIteration from None

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("ev")
        if kind == "msg":
            channel, seq = event.get("channel"), event.get("seq")
            if channel not in self._subs or not isinstance(seq, int):
                return  # arrived after unsubscribe
            if seq == 0:
                # Delivered by a node cut off from Redis: outside the channel's order
                # (docs/scale-out.md). Passed on; the seq after the outage jumps.
                self._events.put_nowait(event)
                return
            last = self._subs[channel]
            if last is not None and seq <= last:
                return  # already delivered before a reconnect
            if last is not None and seq > last + 1:
                # Seqs skipped while connected (a hole left by an outage, a dropped
                # slow reader): said as a gap, as a failed recovery is.
                gap = {"ev": "gap", "channel": channel, "since": last, "seq": seq - 1}
                self._events.put_nowait(gap)
            self._subs[channel] = seq
            self._events.put_nowait(event)
        elif kind in ("dm", "broadcast"):
            self._events.put_nowait(event)
        elif kind == "ping":
            # The server closes a connection that stays quiet after its ping.
            if self._writer is not None:
                self._writer.write(_PONG)
        elif kind in ("ok", "error", "presence", "pong"):
            ident = event.get("id")
            entry = self._pending.get(ident) if isinstance(ident, int) else None
            if entry is None:
                if kind == "error":
                    log.warning("server error: %s", event)
                return
            future, op = entry
            if future.done():
                return
            if kind == "error":
                future.set_exception(ClientError(event.get("code", ""), event.get("reason", "")))
                return
            if event.get("recovered") is False:
                # Queued here, not by the caller, so it comes before the live messages.
                channel = op["channel"]
                gap = {"ev": "gap", "channel": channel, "since": op.get("since")}
                gap["seq"] = event.get("seq")
                self._subs[channel] = event.get("seq")
                self._events.put_nowait(gap)
            future.set_result(event)

    # -- connection --------------------------------------------------------------

    async def _open(self) -> None:
        """Connect, read the welcome, say hello, resubscribe; raise if any step fails."""
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, limit=READ_LIMIT, ssl=self.ssl
            )
            try:
                first = msgspec.json.decode(await reader.readline())
                if not isinstance(first, dict) or first.get("ev") != "welcome":
                    raise ConnectionError(f"refused: {first}")
                self.welcome, self._writer = first, writer
                self._reader_task = asyncio.create_task(self._read(reader))
                if self.user is not None:
                    hello = {"op": "hello", "user": self.user}
                    if self.token is not None:
                        hello["token"] = self.token
                    await self._call(hello, handshake=True)
                # Loop: subscribe() may add a channel while we are still handshaking.
                done: set[str] = set()
                while todo := self._subs.keys() - done:
                    await asyncio.gather(*(self._resubscribe(c) for c in todo))
                    done |= todo
                if self._reader_task.done():
                    raise ConnectionError("connection lost during handshake")
            except BaseException:
                await self._drop(writer)
                raise
        self._connected = True

    async def _resubscribe(self, channel: str) -> None:
        op: dict[str, Any] = {"op": "sub", "channel": channel}
        since = self._subs.get(channel)
        if since is not None:
            op["since"] = since
        try:
            await self._call(op, handshake=True)
        except ClientError as exc:
            # e.g. too_many_subscriptions after a config change: retrying cannot help.
            log.warning("resubscribe to %r refused: %s", channel, exc)
            self._subs.pop(channel, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if not line.strip():
                    continue
                event = msgspec.json.decode(line)
                if not isinstance(event, dict):
                    continue
                if event.get("ev") == "bye":
                    log.info("server said bye: %s", event.get("reason"))
                    break
                self._dispatch(event)
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            log.info("connection lost: %r", exc)
        finally:
            self._connected = False
            self._fail_pending()

    def _fail_pending(self) -> None:
        for future, _ in list(self._pending.values()):
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))

    async def _drop(self, writer: asyncio.StreamWriter | None = None) -> None:
        """Close the current (or given) connection and fail the calls waiting on it."""
        self._connected = False
        writer = writer or self._writer
        task, self._reader_task, self._writer = self._reader_task, None, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending()
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _supervise(self) -> None:
        low, high = self.backoff
        while not self._closed:
            if self._reader_task is not None:
                await asyncio.wait([self._reader_task])
            await self._drop()
            cap = low
            while not self._closed:
                await asyncio.sleep(random.uniform(low, cap))
                cap = min(cap * 2, high)
                try:
                    await self._open()
                except (OSError, TimeoutError, ClientError, ValueError, msgspec.DecodeError) as exc:
                    log.info("reconnect to %s:%s failed: %r", self.host, self.port, exc)
                    continue
                self.reconnects += 1
                break
