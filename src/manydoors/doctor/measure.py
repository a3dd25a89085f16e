"""``doctor measure``: what one connection costs on this machine.

Opens a bounded number of loopback connection pairs with plain sockets in this
process and reads the kernel's slab growth (/proc/meminfo ``Slab``), then holds the
same number of connections in a bare in-process uvloop server and reads the growth of
this process's RSS. Everything is closed again before it returns.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import socket
import time
from dataclasses import dataclass, field

from ..node import procfs
from .capacity import SERVER_USER_BYTES, UVLOOP_FLOOR_BYTES, Costs

MAX_PAIRS = 20_000  # bounded: a measurement, not a load test
DEADLINE = 60.0  # seconds for each half, then give up cleanly
# Figures outside these are noise (another program allocating at the same moment).
SANE_KERNEL = (1_000, 100_000)
SANE_USER = (200, 100_000)


@dataclass(slots=True)
class Measurement:
    pairs: int
    kernel_per_pair: int | None = None
    user_floor: int | None = None  # bytes per connection of a bare uvloop Protocol
    tcp_object: int | None = None  # size of the kernel's TCP sock object, from slabinfo
    notes: list[str] = field(default_factory=list)

    def costs(self, base: Costs) -> Costs:
        """``base`` with the measured figures in place of the ones they measure."""
        kernel_pair = self.kernel_per_pair or base.kernel_per_pair
        kernel_socket = self.kernel_per_pair // 2 if self.kernel_per_pair else None
        # Our Connection and hub entries cost SERVER_USER_BYTES - UVLOOP_FLOOR_BYTES
        # (benchmarks.md) on top of what uvloop itself costs on this machine.
        server = (
            self.user_floor + SERVER_USER_BYTES - UVLOOP_FLOOR_BYTES
            if self.user_floor
            else base.server_user
        )
        return Costs(
            kernel_per_socket=kernel_socket or base.kernel_per_socket,
            kernel_per_pair=kernel_pair,
            server_user=server,
            load_user=base.load_user,
            source="measured now",
        )


def _room_for(pairs: int) -> int:
    """Raise the soft fd limit for ``pairs`` pairs if needed; the pairs that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * pairs + 64
    if soft < need:
        soft = min(hard, need)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return max(0, min(pairs, (soft - 64) // 2))


def _tcp_object_size() -> int | None:
    # /proc/slabinfo is root-only: "TCP <active> <num> <objsize> ..."
    for line in (procfs.read_text("/", "proc/slabinfo") or "").splitlines():
        fields = line.split()
        if fields[:1] == ["TCP"] and len(fields) > 3 and fields[3].isdigit():
            return int(fields[3])
    return None


def warmup(total: int) -> int:
    """Connections opened before the first reading.

    New objects first fill the free slots of slabs and allocator arenas that already
    exist, which costs no new pages; at a million connections that start is noise,
    in a small sample it is not, so only the growth after it is counted.
    """
    return min(total // 4, 1000)


def kernel_per_pair(pairs: int) -> tuple[int | None, str]:
    """Slab bytes per idle loopback connection pair (both ends in this process)."""
    held: list[socket.socket] = []
    listener = socket.socket()
    skip = warmup(pairs)
    counted = pairs - skip
    before: int | None = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        addr = listener.getsockname()
        listener.settimeout(5)
        deadline = time.monotonic() + DEADLINE
        for i in range(pairs):
            if i == skip:
                before = procfs.meminfo().get("Slab")
            client = socket.socket()
            held.append(client)
            client.settimeout(5)
            client.connect(addr)
            # Accept right away: the accept queue never holds more than one.
            held.append(listener.accept()[0])
            if time.monotonic() > deadline:
                return None, f"gave up after {DEADLINE:.0f} s"
        after = procfs.meminfo().get("Slab")
    finally:
        for sock in held:
            sock.close()
        listener.close()
    if before is None or after is None:
        return None, "no Slab line in /proc/meminfo"
    grew = f"slab grew {after - before:,} B for {counted:,} pairs (after {skip:,})"
    per = (after - before) // counted
    if not SANE_KERNEL[0] <= per <= SANE_KERNEL[1]:
        return None, f"{grew}: noise, not kept"
    return per, grew


async def _hold(count: int, skip: int) -> int:
    """RSS growth of this process while a bare Protocol accepts connections
    ``skip`` to ``count``."""
    loop = asyncio.get_running_loop()
    held: list[asyncio.BaseTransport] = []

    class Hold(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            held.append(transport)

    server = await loop.create_server(Hold, "127.0.0.1", 0, backlog=128)
    addr = server.sockets[0].getsockname()
    # The client sockets exist before the first RSS reading: only the server's side
    # of each connection is counted.
    clients = [socket.socket() for _ in range(count)]
    try:
        deadline = time.monotonic() + DEADLINE
        await _accept(clients[:skip], addr, held, deadline)
        gc.collect()
        before = procfs.rss() or 0
        await _accept(clients[skip:], addr, held, deadline)
        gc.collect()
        return (procfs.rss() or 0) - before
    finally:
        for transport in held:
            transport.close()
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()


async def _accept(
    clients: list[socket.socket],
    addr: tuple[str, int],
    held: list[asyncio.BaseTransport],
    deadline: float,
) -> None:
    """Connect ``clients`` in batches the accept queue holds; wait until accepted."""
    for start in range(0, len(clients), 64):
        want = len(held) + len(clients[start : start + 64])
        for client in clients[start : start + 64]:
            client.setblocking(False)
            client.connect_ex(addr)
        while len(held) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(held):,} accepted in {DEADLINE:.0f} s")
            await asyncio.sleep(0.001)


def user_floor(count: int) -> tuple[int | None, str]:
    try:
        import uvloop
    except ImportError:
        return None, "uvloop is not installed: default kept"
    skip = warmup(count)
    try:
        growth = uvloop.run(_hold(count, skip))
    except (OSError, TimeoutError) as exc:
        return None, f"uvloop server: {exc}"
    per = growth // (count - skip)
    grew = f"RSS grew {growth:,} B for {count - skip:,} connections (after {skip:,})"
    if not SANE_USER[0] <= per <= SANE_USER[1]:
        return None, f"{grew}: noise, not kept"
    return per, grew


def measure(pairs: int) -> Measurement:
    """Measure with at most ``pairs`` loopback pairs (bounded by MAX_PAIRS and fds)."""
    pairs = _room_for(min(max(1, pairs), MAX_PAIRS))
    result = Measurement(pairs)
    if pairs < 4:
        result.notes.append("the fd limit leaves no room for connection pairs")
        return result
    # User space first: the kernel half frees Python objects whose memory the
    # allocator would reuse, hiding part of the growth.
    result.user_floor, note = user_floor(pairs)
    result.notes.append(f"user space: {note}")
    result.kernel_per_pair, note = kernel_per_pair(pairs)
    result.notes.append(f"kernel: {note}")
    result.tcp_object = _tcp_object_size()
    return result
