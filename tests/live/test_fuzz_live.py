"""A live fuzz run: garbage thrown at a running server must hurt nobody but the sender.

Many short connections send random bytes and mutated valid traffic (NDJSON lines to
a TCP service; handshakes and frames to a WebSocket service) while a publisher keeps
publishing to clients that behave. Afterwards every well-behaved client has every
message, fresh clients are served, the stats counted the errors, every fuzz
connection is gone from the books, and no worker died.

Each case is generated from ``random.Random(f"{seed}-{index}")``, so a failing run is
replayed with the seed it printed: ``MANYDOORS_FUZZ_SEED=<seed> ./run test
tests/live/test_fuzz_live.py`` (``MANYDOORS_FUZZ_CASES`` sets how many cases run).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any

import websockets

from manydoors.client import Client
from manydoors.loadgen.wsclient import read_frames
from support.client import Client as LineClient
from support.server import ApiPublisher
from support.wait import poll

SEED = int(os.environ.get("MANYDOORS_FUZZ_SEED", "6455"))
CASES = int(os.environ.get("MANYDOORS_FUZZ_CASES", "2000"))
TIME_LIMIT = 25.0  # seconds of fuzzing at most, whatever CASES says
CONCURRENCY = 32  # fuzz connections open at once
MAX_MESSAGE = 4096  # max_message_bytes of both services: overlong cases stay cheap
READ_TIMEOUT = 2
PUBLISH_EVERY = 0.02

_SERVICE = f"""
port = 0
workers = 2
max_connections = 5000
max_message_bytes = {MAX_MESSAGE}
# A begun message or handshake is dropped after this; the "stall" cases wait for it.
read_timeout = {READ_TIMEOUT}
# Not under test here: the well-behaved clients stay quiet for the whole run.
ping_interval = 0
"""
CONFIG = f"""
[api]
port = 0

[[service]]
name = "chat"
{_SERVICE}
[[service]]
name = "web"
protocol = "websocket"
{_SERVICE}
"""

# --- what the fuzzer sends --------------------------------------------------------------

# Valid ops to mutate. None touches "news" or the well-behaved users, so that whatever
# a mutation makes valid cannot reach them by the rules of the protocol.
TEMPLATES: tuple[dict[str, Any], ...] = (
    {"op": "hello", "user": "fz", "id": 1},
    {"op": "hello", "user": "fz", "token": "t" * 40, "id": "h"},
    {"op": "sub", "channel": "fz", "id": 2},
    {"op": "sub", "channel": "fz", "since": 3, "id": 3},
    {"op": "unsub", "channel": "fz", "id": 4},
    {"op": "pub", "channel": "fz", "data": {"a": [1, 2.5, None, True, "x"]}, "id": 5},
    {"op": "send", "user": "fz", "data": "hi", "id": 6},
    {"op": "presence", "channel": "fz", "id": 7},
    {"op": "ping", "id": 8},
    {"op": "ping"},
    {"op": "pong"},
)


def odd_value(rng: random.Random) -> Any:
    """A JSON value of a type or size a field does not expect."""
    return rng.choice(
        [
            None,
            True,
            -1,
            10**30,
            1e308,
            "",
            "\x00\x1f",
            "x" * rng.choice((127, 128, 129, 1000)),
            "\u202e\ud7ff\ufeff",
            [],
            {},
            [[[[[]]]]],
            {"op": "sub"},
            rng.random(),
        ]
    )


def valid_op(rng: random.Random) -> dict[str, Any]:
    op = dict(rng.choice(TEMPLATES))
    for _ in range(rng.choice((0, 0, 1, 2))):
        choice = rng.random()
        key = rng.choice([*op, "op", "id", "channel", "user", "data", "since", "zz"])
        if choice < 0.5:
            op[key] = odd_value(rng)
        elif choice < 0.8:
            op.pop(key, None)
        else:
            op[key + "x"] = odd_value(rng)
    return op


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few byte-level edits: flips, inserts, deletes, duplicates, truncation."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            buf += rng.randbytes(4)
        i = rng.randrange(len(buf))
        kind = rng.randrange(7)
        if kind == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[i:i] = rng.choice([b"\xff", b"\xc3\x28", b"\x00", b"\r", b'"', b"{", b"\\u0000"])
        elif kind == 2:
            del buf[i : i + rng.randint(1, 8)]
        elif kind == 3:
            j = rng.randrange(i, len(buf) + 1)
            buf[j:j] = buf[i:j]
        elif kind == 4:
            del buf[i:]
        elif kind == 5:
            buf[i] = rng.randrange(256)
        else:
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(buf)


def ndjson_lines(rng: random.Random) -> bytes:
    """1 to 40 lines: valid ops, mutated ones, garbage, blank, CRLF, deep nesting."""
    lines = []
    for _ in range(rng.randint(1, 40)):
        line = json.dumps(valid_op(rng)).encode()
        roll = rng.random()
        if roll < 0.45:
            line = mutate(rng, line)
        elif roll < 0.5:
            line = b"[" * rng.choice((100, 1000, 4000)) + b"]" * rng.randint(0, 10)
        elif roll < 0.55:
            line = rng.choice([b"", b"   ", b"\r", b"null", b"[1]", b'"op"', b"{}"])
        elif roll < 0.6:  # deep nesting inside data, which is relayed verbatim
            depth = rng.choice((100, 1000, 1500))
            line = b'{"op":"pub","channel":"fz","data":%s%s}' % (b"[" * depth, b"]" * depth)
        lines.append(line.replace(b"\n", b" "))
    end = rng.choice((b"\n", b"\r\n"))
    return end.join(lines) + rng.choice((end, end, b""))


def tcp_payload(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choices(
        ["random", "lines", "overlong", "flood", "unfinished", "stall", "empty"],
        weights=[20, 45, 10, 10, 8, 2, 5],
    )[0]
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 3000))
    if kind == "lines":
        return kind, ndjson_lines(rng)
    if kind == "overlong":
        body = b'{"op":"pub","channel":"fz","data":"' + b"a" * (MAX_MESSAGE + rng.randint(0, 9000))
        return kind, body + rng.choice((b'"}\n', b"", b'"}\n{"op":"ping","id":1}\n'))
    if kind == "flood":
        # Valid ops, more than max_messages_per_second in one go: rate_limited.
        ops = [valid_op(rng) if rng.random() < 0.1 else {"op": "ping"} for _ in range(300)]
        return kind, b"".join(json.dumps(op).encode() + b"\n" for op in ops)
    if kind in ("unfinished", "stall"):
        return kind, json.dumps(valid_op(rng)).encode()[: rng.randint(1, 30)]
    return kind, b""


# WebSocket: a valid upgrade request to mutate, and client frames.

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def bad_handshake(rng: random.Random) -> bytes:
    lines = UPGRADE[:-4].split(b"\r\n")
    kind = rng.randrange(9)
    if kind == 0:
        del lines[rng.randrange(1, len(lines))]
    elif kind == 1:
        lines[-1] = b"Sec-WebSocket-Version: " + rng.choice([b"8", b"14", b"13, 8", b""])
    elif kind == 2:
        lines[4] = b"Sec-WebSocket-Key: " + rng.choice([b"short", b"!!!!", b"", b"a" * 200])
    elif kind == 3:
        lines[0] = rng.choice([b"POST / HTTP/1.1", b"GET / HTTP/1.0", b"GET / HTTP/2", b"GET"])
    elif kind == 4:
        lines.insert(2, b"X-Big: " + b"b" * rng.choice((4000, 9000, 20000)))
    elif kind == 5:
        lines.insert(rng.randrange(1, len(lines)), rng.choice(lines[1:]))  # a duplicate
    elif kind == 6:
        return mutate(rng, UPGRADE)
    elif kind == 7:
        return UPGRADE[: rng.randrange(1, len(UPGRADE) - 1)]  # never finished
    else:
        lines.insert(rng.randrange(1, len(lines) + 1), rng.randbytes(rng.randint(1, 40)))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def frame(
    payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = b"\x5a\x0f\xc3\x96"  # any key will do; a fixed one keeps cases reproducible
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_frames(rng: random.Random) -> bytes:
    """1 to 12 frames, each valid, mutated, or breaking one of RFC 6455's rules."""
    out = b""
    for _ in range(rng.randint(1, 12)):
        op = json.dumps(valid_op(rng)).encode()
        kind = rng.randrange(12)
        if kind < 4:
            out += frame(op if kind < 2 else mutate(rng, op))
        elif kind == 4:
            out += frame(op, opcode=2)  # binary: bad_frame
        elif kind == 5:
            out += frame(op, rsv=rng.randint(1, 7))
        elif kind == 6:
            out += frame(op, opcode=rng.choice((3, 4, 5, 6, 7, 11, 12, 15)))
        elif kind == 7:
            out += frame(op, masked=False)
        elif kind == 8:  # fragments, maybe with a control frame between, maybe unfinished
            cut = rng.randrange(len(op))
            out += frame(op[:cut], fin=False) + rng.choice([b"", frame(b"p", opcode=9)])
            out += frame(op[cut:], opcode=rng.choice((0, 0, 1)), fin=rng.random() < 0.8)
        elif kind == 9:  # control frames: too long, fragmented, odd close codes
            out += rng.choice(
                [
                    frame(b"x" * 126, opcode=9),
                    frame(b"x", opcode=9, fin=False),
                    frame(b"\x03", opcode=8),
                    frame(b"\x03\xe7", opcode=8),
                    frame(b"\x03\xe8\xff\xfe", opcode=8),
                    frame(b"", opcode=10),
                ]
            )
        elif kind == 10:
            out += frame(rng.choice([b"\xff\xfe", b"\xc3\x28", b"ok\xed\xa0\x80"]))
        else:  # a length that promises more than comes, or a huge one
            out += rng.choice(
                [
                    bytes([0x81, 0xFF]) + (2**63 - 1).to_bytes(8, "big") + b"mask",
                    bytes([0x81, 0xFE, 0xFF, 0xFF]) + b"mask" + b"x" * 100,
                    mutate(rng, frame(op)),
                ]
            )
    return out


def ws_payload(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choices(
        ["random", "handshake", "frames", "overlong", "stall"], weights=[15, 35, 38, 10, 2]
    )[0]
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 3000))
    if kind == "handshake":
        return kind, bad_handshake(rng)
    if kind == "frames":
        return kind, UPGRADE + ws_frames(rng)
    if kind == "stall":
        return kind, UPGRADE[: rng.randrange(1, len(UPGRADE) - 2)]
    return kind, UPGRADE + frame(b'{"op":"ping","d":"' + b"a" * (MAX_MESSAGE + 100) + b'"}')


def case(seed: int, index: int) -> tuple[str, str, list[bytes], str]:
    """Case ``index``: (service, kind, chunks to send, how to end).

    Ends: "eof" (half-close, then read), "close" (read, then close), "reset" (abort at
    once), "stall" (keep the connection open: the server must close it).
    """
    rng = random.Random(f"{seed}-{index}")
    service = "chat" if rng.random() < 0.6 else "web"
    kind, data = (tcp_payload if service == "chat" else ws_payload)(rng)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice((0, 0, 1, 3, 10))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    end = "stall" if kind == "stall" else rng.choice(("eof", "close", "reset"))
    return service, kind, [c for c in chunks if c], end


# --- the run ----------------------------------------------------------------------------


def check_answer(service: str, answer: bytes) -> str | None:
    """What is wrong with what the server sent a fuzz connection (None: nothing)."""
    if service == "chat":
        for line in answer.split(b"\n")[:-1]:  # the last piece may be cut by our close
            try:
                event = json.loads(line)
            except ValueError:
                return f"not JSON: {line[:200]!r}"
            if not isinstance(event, dict) or "ev" not in event:
                return f"not an event: {line[:200]!r}"
        return None
    if answer and not answer.startswith(b"HTTP/1.1 "):
        return f"not an HTTP answer: {answer[:200]!r}"
    if answer.startswith(b"HTTP/1.1 101 "):
        payloads, _, _ = read_frames(answer[answer.find(b"\r\n\r\n") + 4 :])
        for payload in payloads:
            try:
                event = json.loads(payload)
            except ValueError:
                return f"not JSON in a text frame: {payload[:200]!r}"
            if not isinstance(event, dict) or "ev" not in event:
                return f"not an event: {payload[:200]!r}"
    return None


async def run_case(port: int, seed: int, index: int) -> tuple[str, str | None]:
    service, kind, chunks, end = case(seed, index)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return kind, f"connect failed: {exc!r}"
    answer = b""
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        if end == "eof":
            writer.write_eof()
        if end != "reset" or not chunks:
            # Read what comes back until the server closes or goes quiet.
            async with asyncio.timeout(READ_TIMEOUT + 3 if end == "stall" else 0.5):
                while data := await reader.read(65536):
                    answer += data
    except TimeoutError:
        if end == "stall":
            return kind, f"not closed {READ_TIMEOUT} s after a message began"
    except OSError:
        pass
    finally:
        if end == "reset":
            writer.transport.abort()
        else:
            writer.close()
    return kind, check_answer(service, answer)


async def fuzz(ports: dict[str, int], seed: int) -> tuple[Counter[str], list[str]]:
    """Run the cases CONCURRENCY at a time, until CASES or TIME_LIMIT."""
    done: Counter[str] = Counter()
    problems: list[str] = []
    deadline = time.monotonic() + TIME_LIMIT
    indexes = iter(range(CASES))

    async def lane() -> None:
        for index in indexes:
            if time.monotonic() > deadline:
                return
            service = case(seed, index)[0]
            kind, problem = await run_case(ports[service], seed, index)
            done[f"{service}/{kind}"] += 1
            if problem is not None:
                problems.append(f"case {index} (seed {seed}): {problem}")

    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return done, problems


class WsReader:
    """A `websockets` client subscribed to "news", collecting its msg events."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.msgs: list[dict[str, Any]] = []
        self.other: list[Any] = []
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.ws = await websockets.connect(self.url)
        welcome = json.loads(await self.ws.recv())
        assert welcome["ev"] == "welcome", welcome
        await self.ws.send(json.dumps({"op": "sub", "channel": "news", "id": 1}))
        assert json.loads(await self.ws.recv()) == {"ev": "ok", "id": 1}
        self.task = asyncio.create_task(self.read())

    async def read(self) -> None:
        async for message in self.ws:
            event = json.loads(message)
            (self.msgs if event.get("ev") == "msg" else self.other).append(event)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            await self.task


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def all_worker_pids(server: Any) -> dict[str, list[int]]:
    return {s["name"]: [w["pid"] for w in s["workers"]] for s in server.stats()["services"]}


def test_fuzzed_traffic_harms_nobody_but_the_sender(serve):
    server = serve(config=CONFIG)
    ports = {name: server.port(name) for name in ("chat", "web")}
    pids = all_worker_pids(server)
    publisher = ApiPublisher(server, PUBLISH_EVERY)
    print(f"fuzz seed {SEED}: replay with MANYDOORS_FUZZ_SEED={SEED}")

    async def main() -> None:
        tcp = [
            Client("127.0.0.1", ports["chat"], user=f"w{i}", backoff=(0.05, 0.5)) for i in range(4)
        ]
        ws = [WsReader(f"ws://127.0.0.1:{ports['web']}/") for _ in range(2)]
        try:
            for c in tcp:
                await c.connect()
                await c.subscribe("news")
            for w in ws:
                await w.start()
            base = await asyncio.to_thread(server.stats)
            assert base["connections"] == len(tcp) + len(ws)
            base_fds = {pid: fds(pid) for group in pids.values() for pid in group}

            publisher.start()
            try:
                done, problems = await fuzz(ports, SEED)
            finally:
                publisher.halt.set()
                await asyncio.to_thread(publisher.join, 10)
            assert publisher.error is None, repr(publisher.error)
            assert sum(done.values()) >= 300, done  # the run did something
            assert problems == []

            # Every fuzz connection is gone from the books and from the fds.
            await poll(
                lambda: server.stats()["connections"] == len(tcp) + len(ws), 20, "fuzz closes"
            )
            for pid, before in base_fds.items():
                await poll(lambda p=pid, b=before: fds(p) <= b, 10, f"worker {pid} fds")

            # Every well-behaved client has every message, in order, once; none lost
            # its connection.
            seqs = publisher.seqs
            total = len(seqs)
            assert seqs == list(range(seqs[0], seqs[0] + total))
            for c in tcp:
                async with asyncio.timeout(20):
                    got = [await c.next() for _ in range(total)]
                assert [e["data"] for e in got] == [{"n": n} for n in range(total)]
                assert [e["seq"] for e in got] == seqs
                assert c.reconnects == 0 and c._events.empty()
            for w in ws:
                await poll(lambda w=w: len(w.msgs) >= total, 20, "websocket deliveries")
                assert [e["data"] for e in w.msgs] == [{"n": n} for n in range(total)]
                assert [e["seq"] for e in w.msgs] == seqs
                assert w.other == []
        finally:
            for c in tcp:
                await c.close()
            for w in ws:
                await w.close()

        # Fresh clients of both kinds are served.
        fresh = LineClient(ports["chat"])
        try:
            assert fresh.call({"op": "sub", "channel": "after", "id": 1})["ev"] == "ok"
            async with websockets.connect(f"ws://127.0.0.1:{ports['web']}/") as browser:
                assert json.loads(await browser.recv())["ev"] == "welcome"
                await browser.send(json.dumps({"op": "pub", "channel": "after", "data": 1}))
                assert fresh.recv()["data"] == 1
        finally:
            fresh.close()

    asyncio.run(main())

    stats = server.stats()
    errors = stats["errors"]
    for code in ("bad_json", "not_object", "unknown_op", "missing_field", "bad_field"):
        assert errors[code] > 0, (code, errors)
    for code in ("too_long", "bad_frame", "bad_handshake", "rate_limited"):
        assert errors[code] > 0, (code, errors)
    assert stats["closed"]["bad_input"] > 0
    assert stats["closed"]["read_timeout"] > 0 and errors["read_timeout"] > 0
    # No worker died: the same pids, no restarts.
    assert all_worker_pids(server) == pids
    for service in stats["services"]:
        assert [w["restarts"] for w in service["workers"]] == [0, 0]
    assert "Traceback" not in server.output(), server.output()[-5000:]
