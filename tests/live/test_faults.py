"""Workers killed with SIGKILL, again and again, while a publisher keeps publishing.

Each kill must cost only the dead worker's own connections: the supervisor restarts
the slot (new pid, accepting again), the connections held by the other workers stay
open and see every message with no gap, and the dead worker's ``manydoors.client``
clients reconnect and, through ``sub`` with ``since``, get every message exactly once
and in order.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections import Counter
from collections.abc import Callable

import msgspec

from manydoors.client import Client
from support.client import Client as LineClient
from support.server import ApiPublisher
from support.wait import poll, wait_for

WORKERS = 3
HELD = 2000  # plain subscribers, spread over the workers by the kernel
CLIENTS_PER_WORKER = 2  # manydoors.client Clients on each worker
VICTIMS = (0, 1, 0, 1, 0)  # slots killed in turn; slot 2 is never killed
PUBLISH_EVERY = 0.1  # seconds between two API publishes
SERVER = (
    *("--workers", str(WORKERS), "--max-connections", "10000"),
    # Every outage must fit in the history, so that reconnecting clients lose nothing.
    *("--history-size", "5000"),
    # Not under test here: quiet connections must not be pinged away, and every test
    # connection comes from 127.0.0.1.
    *("--ping-interval", "0", "--max-connections-per-ip", "0"),
)
SUB = b'{"op":"sub","channel":"news","id":1}\n'
_users = itertools.count()


class _Event(msgspec.Struct):
    ev: str
    seq: int | None = None
    id: int | str | None = None
    conn: str | None = None


_decode: Callable[[bytes], _Event] = msgspec.json.Decoder(_Event).decode


class Held(asyncio.Protocol):
    """A plain subscriber on its own socket: which worker welcomed it, what seqs arrived."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.pid = 0  # the worker's pid, from the welcome's "conn" (pid-n)
        self.subscribed = False
        self.first: int | None = None
        self.last: int | None = None
        self.count = 0
        self.gaps: list[tuple[int, int]] = []
        self.other: list[bytes] = []  # any line it did not expect
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(SUB)

    def data_received(self, data: bytes) -> None:
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            event = _decode(line)
            if event.ev == "msg" and event.seq is not None:
                if self.last is None:
                    self.first = event.seq
                elif event.seq != self.last + 1:
                    self.gaps.append((self.last, event.seq))
                self.last = event.seq
                self.count += 1
            elif event.ev == "welcome" and event.conn is not None:
                self.pid = int(event.conn.split("-")[0])
            elif event.ev == "ok" and event.id == 1:
                self.subscribed = True
            elif event.ev == "ping" and self.transport is not None:
                self.transport.write(b'{"op":"pong"}\n')
            else:
                self.other.append(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def hold(port: int, count: int) -> list[Held]:
    """Open ``count`` plain subscribers, 200 connects at a time; return once all are in."""
    loop = asyncio.get_running_loop()
    held: list[Held] = []
    for start in range(0, count, 200):
        batch = await asyncio.gather(
            *(
                loop.create_connection(Held, "127.0.0.1", port)
                for _ in range(min(200, count - start))
            )
        )
        held.extend(protocol for _, protocol in batch)
    await poll(lambda: all(h.subscribed for h in held), 30, "held connections subscribed")
    return held


async def spread_clients(port: int) -> list[Client]:
    """manydoors.client Clients, subscribed to "news", CLIENTS_PER_WORKER on each worker."""
    kept: list[Client] = []
    on: Counter[int] = Counter()
    for _ in range(200):
        client = await connected_client(port)
        slot = client.welcome["worker"]
        if on[slot] >= CLIENTS_PER_WORKER:
            await client.close()
            continue
        on[slot] += 1
        kept.append(client)
        await client.subscribe("news")
        if len(kept) == WORKERS * CLIENTS_PER_WORKER:
            return kept
    raise AssertionError(f"could not spread clients over {WORKERS} workers: {on}")


async def client_on(port: int, pid: int) -> Client:
    """A Client subscribed to "news" on the worker ``pid`` (reconnects moved the others)."""
    for _ in range(200):
        client = await connected_client(port)
        if pid_of(client) == pid:
            await client.subscribe("news")
            return client
        await client.close()
    raise AssertionError(f"no connection landed on worker pid {pid}")


async def connected_client(port: int) -> Client:
    client = Client("127.0.0.1", port, user=f"c{next(_users)}", backoff=(0.05, 0.5))
    await client.connect()
    return client


def pid_of(client: Client) -> int:
    return int(client.welcome["conn"].split("-")[0])


def welcomed_by(port: int, pid: int) -> bool:
    """True once a fresh connection is welcomed by ``pid`` (the kernel picks the slot)."""
    for _ in range(300):
        probe = LineClient(port)
        probe.close()
        if probe.welcome["conn"].startswith(f"{pid}-"):
            return True
    return False


def test_workers_killed_repeatedly_under_load_restart_and_lose_no_message(serve):
    server = serve(*SERVER)
    port = server.port()
    first_pids = server.worker_pids()
    publisher = ApiPublisher(server, PUBLISH_EVERY)

    async def main() -> None:
        held: list[Held] = []
        clients: list[Client] = []
        try:
            await scenario(held, clients)
        finally:
            publisher.halt.set()
            for c in clients:
                await c.close()
            for h in held:
                if h.transport is not None:
                    h.transport.close()

    async def scenario(held: list[Held], clients: list[Client]) -> None:
        held += await hold(port, HELD)
        assert {h.pid for h in held} == set(first_pids), "every worker holds connections"
        clients += await spread_clients(port)
        expected_reconnects = dict.fromkeys(clients, 0)
        killed: set[int] = set()
        publisher.start()
        try:
            for slot in VICTIMS:
                # Let some messages flow to everybody between two kills.
                mark = len(publisher.seqs)
                await poll(lambda m=mark: len(publisher.seqs) >= m + 10, 20, "publishes")
                await poll(lambda: all(c.connected for c in clients), 20, "clients connected")
                pids = await asyncio.to_thread(server.worker_pids)
                pid = pids[slot]
                assert pid is not None
                doomed = [h for h in held if h.pid == pid and not h.lost]
                assert doomed, f"no held connection on worker {slot}"
                on_victim = [c for c in clients if pid_of(c) == pid]
                if not on_victim:  # reconnects landed elsewhere: join one for this kill
                    clients.append(await client_on(port, pid))
                    expected_reconnects[clients[-1]] = 0
                    on_victim = clients[-1:]
                for c in on_victim:
                    expected_reconnects[c] += 1

                os.kill(pid, signal.SIGKILL)
                killed.add(pid)

                new = await asyncio.to_thread(
                    wait_for,
                    lambda s=slot, p=pid: (n := server.worker_pids()[s]) not in (None, p) and n,
                    20,
                    f"worker {slot} restarted",
                )
                assert await asyncio.to_thread(welcomed_by, port, new), "restarted, not serving"
                await poll(lambda d=doomed: all(h.lost for h in d), 20, "dead worker's doors")
                survivors_lost = [h for h in held if h.lost and h.pid not in killed]
                assert not survivors_lost, f"{len(survivors_lost)} held on live workers closed"
                await poll(
                    lambda: all(c.reconnects == n for c, n in expected_reconnects.items()),
                    20,
                    "clients of the dead worker to reconnect",
                )
                # Replace the dead worker's doors, so that the next kill of it has victims.
                held += await hold(port, len(doomed))
            # The last replacements must see messages too.
            mark = len(publisher.seqs)
            await poll(lambda: len(publisher.seqs) >= mark + 10, 20, "publishes")
        finally:
            publisher.halt.set()
            await asyncio.to_thread(publisher.join, 10)
        assert publisher.error is None, repr(publisher.error)

        seqs = publisher.seqs
        total = len(seqs)
        assert seqs == list(range(seqs[0], seqs[0] + total)), "the API gave consecutive seqs"
        first, last = seqs[0], seqs[-1]
        alive = [h for h in held if not h.lost]
        await poll(lambda: all(h.last == last for h in alive), 30, "the last message everywhere")

        # Only the dead workers' connections closed; every other one saw every message.
        assert all(h.pid in killed for h in held if h.lost)
        assert len(alive) == HELD
        assert [h for h in alive if h.gaps or h.other] == []
        original = [h for h in held[:HELD] if not h.lost]
        assert original, "some connections outlived all the kills"
        assert {h.pid for h in original} == {first_pids[2]}
        assert all((h.first, h.count) == (first, total) for h in original)
        assert all(h.count == last - (h.first or 0) + 1 for h in alive)

        # The clients of dead workers came back, and every client has every message
        # (since it joined: the first ones before the publisher started) exactly once,
        # in order, with no gap event.
        for i, c in enumerate(clients):
            async with asyncio.timeout(30):
                got = [await c.next()]
                joined = got[0]["data"]["n"]
                got += [await c.next() for _ in range(total - joined - 1)]
            assert joined == 0 or i >= WORKERS * CLIENTS_PER_WORKER
            assert [e.get("data") for e in got] == [{"n": n} for n in range(joined, total)]
            assert [e["seq"] for e in got] == seqs[joined:]
            assert c._events.empty()
            assert c.reconnects == expected_reconnects[c]
        assert sum(expected_reconnects.values()) >= len(VICTIMS)

        # Still serving fresh connections, on every worker.
        fresh = await spread_clients(port)
        for c in fresh:
            await c.publish("news", "fresh")
        for c in [*clients, *fresh]:
            async with asyncio.timeout(10):
                assert [(await c.next())["data"] for _ in fresh] == ["fresh"] * len(fresh)
        clients += fresh

        # The books: one restart per kill, on the right slots; slot 2 untouched.
        stats = await asyncio.to_thread(server.stats)
        workers = stats["services"][0]["workers"]
        assert [w["restarts"] for w in workers] == [VICTIMS.count(s) for s in range(WORKERS)]
        assert workers[2]["pid"] == first_pids[2]
        assert len({w["pid"] for w in workers} | killed) == WORKERS + len(VICTIMS)
        status, health = await asyncio.to_thread(server.http, "GET", "/healthz")
        assert (status, health["workers"]) == (200, WORKERS)

    asyncio.run(main())
    log = server.output()
    for pid in set(first_pids) - {first_pids[2]}:
        assert f"(pid {pid}) exited with code -9" in log
