"""User-space memory per idle WebSocket connection, per candidate protocol layer.

    .venv/bin/python bench/ws_memory.py [--count 100000]

For each candidate, creates ``count`` per-connection protocol objects in this process,
brings each to the idle state of an open connection that has received one small text
message (the ``hello``), keeps them all alive, and divides the growth by ``count``:

- RSS growth (``/proc/self/smaps_rollup``), tracemalloc off; candidates are measured one
  after the other with the previous ones still alive, so no candidate reuses memory
  another freed;
- then, everything freed, the bytes tracemalloc sees allocated per object (exact for
  Python-level allocations, and for C extensions that allocate through PyMem).

Only the protocol object is measured: not the socket, the asyncio transport or the
application's own per-connection state, which every candidate needs alike.

Candidates (wsproto, websockets and picows are bench-only, installed with pip):

1. manydoors ``WsFrameParser`` (no handshake state to keep: the handshake is a function);
2. wsproto ``FrameProtocol(client=False, extensions=[])``, its frame layer;
3. websockets ``ServerProtocol`` after it processed a real upgrade request and sent its
   101 (``accept`` + ``send_response``), no extensions;
4. picows: its per-connection ``WSProtocol`` can be built inside a running loop but its
   ``connection_made`` needs a real socket (``getsockopt``, ``fileno``) to create the
   ``WSTransport`` with its write buffer, a child logger and futures. Only the
   pre-connection ``WSProtocol`` (which already holds the 16 KiB read buffer) is
   measured here: a lower bound; the full object is not measured in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

from _common import machine, rss_pss, save
from manydoors.protocol.websocket import WsFrameParser, parse_handshake

MASK = b"\x11\x22\x33\x44"
HELLO = b'{"op":"hello","user":"u1"}'
HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\n"
    b"Host: 127.0.0.1:7001\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def _masked_text(payload: bytes) -> bytes:
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + MASK + body


HELLO_FRAME = _masked_text(HELLO)


def make_manydoors() -> Any:
    parser = WsFrameParser()
    (_event,) = parser.feed(HELLO_FRAME, 65536)
    return parser


def make_wsproto() -> Any:
    from wsproto.frame_protocol import FrameProtocol

    proto = FrameProtocol(client=False, extensions=[])
    proto.receive_bytes(HELLO_FRAME)
    (_frame,) = list(proto.received_frames())
    return proto


def make_websockets() -> Any:
    from websockets.server import ServerProtocol

    proto = ServerProtocol()
    proto.receive_data(HANDSHAKE)
    (request,) = proto.events_received()
    proto.send_response(proto.accept(request))
    proto.data_to_send()
    proto.receive_data(HELLO_FRAME)
    (_frame,) = proto.events_received()
    return proto


def make_picows() -> Any:
    # Called inside a running loop (WSProtocol.__init__ asks for it).
    from picows import WSAutoPingStrategy, WSListener
    from picows.picows import WSProtocol

    class Listener(WSListener):  # type: ignore[misc]
        pass

    return WSProtocol(
        None,  # host:port (client only)
        None,  # path (client only)
        False,  # server side
        Listener,
        _PICOWS_LOGGER,
        True,  # disconnect_on_exception
        5.0,  # handshake timeout
        False,  # auto ping
        10.0,
        10.0,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # auto pong
        10 * 1024 * 1024,  # max_frame_size, picows' default
        None,  # extra headers
        16 * 1024,  # read_buffer_init_size, picows' default
    )


_PICOWS_LOGGER: Any = None

CANDIDATES: list[tuple[str, str, Callable[[], Any]]] = [
    ("manydoors WsFrameParser", "after one text message", make_manydoors),
    ("wsproto FrameProtocol", "after one text message", make_wsproto),
    ("websockets ServerProtocol", "after a real handshake and one text message", make_websockets),
    (
        "picows WSProtocol (lower bound)",
        "constructed in a running loop, before connection_made: WSTransport not included",
        make_picows,
    ),
]


def _create(make: Callable[[], Any], count: int) -> list[Any]:
    if make is make_picows:

        async def inside_loop() -> list[Any]:
            return [make() for _ in range(count)]

        return asyncio.run(inside_loop())
    return [make() for _ in range(count)]


def _warm() -> None:
    """Import everything and build one of each, so imports are not counted."""
    global _PICOWS_LOGGER
    import logging

    _PICOWS_LOGGER = logging.getLogger("picows.server")
    assert parse_handshake(HANDSHAKE) is not None
    for _, _, make in CANDIDATES:
        _create(make, 10)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=100_000)
    args = p.parse_args()
    n = args.count
    _warm()
    gc.collect()
    gc.disable()  # no collections in the middle of a measurement

    me = os.getpid()
    kept: list[list[Any]] = []
    rss: dict[str, float] = {}
    for name, _, make in CANDIDATES:
        before = rss_pss(me)[0]
        kept.append(_create(make, n))
        rss[name] = (rss_pss(me)[0] - before) / n
    kept.clear()
    gc.enable()
    gc.collect()

    traced: dict[str, float] = {}
    for name, _, make in CANDIDATES:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        objs = _create(make, n)
        traced[name] = (tracemalloc.get_traced_memory()[0] - base) / n
        tracemalloc.stop()
        del objs
        gc.collect()

    rows = [
        {
            "candidate": name,
            "state": state,
            "rss_bytes_per_connection": round(rss[name], 1),
            "tracemalloc_bytes_per_connection": round(traced[name], 1),
        }
        for name, state, _ in CANDIDATES
    ]
    rows.append(
        {
            "candidate": "picows WSProtocol + WSTransport (full)",
            "state": "not measured in-process: needs a transport",
            "why": (
                "WSProtocol.connection_made reads the socket (getsockopt, fileno) and builds "
                "the WSTransport (1 KiB write buffer, child Logger, futures) from it"
            ),
        }
    )
    versions = {}
    for mod in ("h11", "wsproto", "websockets", "picows"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    result = {"machine": machine(), "count": n, "versions": versions, "candidates": rows}

    print(f"{'candidate':40} {'RSS B/conn':>11} {'traced B/conn':>14}  state")
    for row in rows:
        if "rss_bytes_per_connection" in row:
            print(
                f"{row['candidate']:40} {row['rss_bytes_per_connection']:>11,.0f} "
                f"{row['tracemalloc_bytes_per_connection']:>14,.0f}  {row['state']}"
            )
        else:
            print(f"{row['candidate']:40} {'-':>11} {'-':>14}  {row['state']}")
    print(f"saved {save('ws_memory', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
