"""Worker <-> broker framing (sans-I/O).

A frame is ``kind:u8 keylen:u16 paylen:u32`` (network order), then the key (UTF-8: a
channel or user name) and the payload. The key travels beside the payload so that a
worker routes a delivery by dict lookup without parsing the JSON it forwards.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import Final

_HEADER: Final = struct.Struct("!BHI")
HEADER_SIZE: Final = _HEADER.size
MAX_PAYLOAD: Final = 64 * 1024 * 1024


class Kind(IntEnum):
    # worker -> broker
    SUB = 1  # this worker now holds subscribers of <key>
    UNSUB = 2  # ... no longer
    USER_ON = 3  # this worker now holds a connection of user <key>
    USER_OFF = 4
    PUB = 5  # publish to channel <key>; payload = JSON [from, data]
    SEND = 6  # message to user <key>; payload = [from, data]
    SYNC = 7  # echo me back: everything I sent before has been applied
    READY = 8  # the worker is accepting; key = its pid
    SAMPLED = 9  # answer to SAMPLE; payload = JSON list of connections
    RECOVER = 10  # a connection subscribes to <key> since a seq; payload = RECOVER_HEAD
    PRESENCE = 11  # a client asks who is in <key>; payload = request id (u32)
    PRESENCE_PART = 12  # answer to PRESENCE_ASK; payload = token (u32) + JSON {user: n}
    JOIN = 13  # user <payload> has a first connection in channel <key> on this worker
    LEAVE = 14  # ... its last connection in <key> on this worker is gone
    EVENT = 15  # for the webhooks: key = event name, payload = JSON object
    CHANNELS_PART = 16  # answer to CHANNELS_ASK; payload = token (u32) + JSON {channel: n}
    # publish to channel <key> leaving out a connection (a Pusher client event is not
    # echoed): payload = its id "<pid>-<token>", a space, then JSON [from, data]
    PUB_EXCEPT = 17
    # a member joins presence channel <key> if it has room (a Pusher app's
    # max_presence_members): payload = JOIN_HEAD (request id, limit) + the member
    JOIN_ASK = 18
    # broker -> worker
    DELIVER_CHANNEL = 20  # payload = encoded event line for subscribers of <key>
    DELIVER_USER = 21  # payload = encoded event line for connections of user <key>
    DELIVER_ALL = 22  # payload = encoded event line for every connection
    SYNCED = 23
    SAMPLE = 24  # send me up to <key> of your connections (for /api/connections)
    RECOVERED = 25  # payload = RECOVERED_HEAD + the missed event lines, in order
    PRESENCE_ASK = 26  # who of yours is in <key>? payload = token (u32)
    PRESENCE_DONE = 27  # answer to PRESENCE; payload = request id (u32) + JSON presence
    # The server API's commands (server/commands.py in the worker)
    DISCONNECT = 28  # close every connection of user <key> with bye <payload> (the reason)
    UNSUBSCRIBE = 29  # every connection of user <key> leaves channel <payload>
    CHANNELS_ASK = 30  # how many of yours are in each channel? payload = token + JSON [names]
    # A delivery that leaves one connection out (the API's ``exclude``): payload =
    # EXCLUDE head + the event line. Only the worker of that pid looks for it.
    DELIVER_CHANNEL_EXCEPT = 31
    DELIVER_USER_EXCEPT = 32
    DELIVER_ALL_EXCEPT = 33
    JOINED = 34  # answer to JOIN_ASK: payload = request id (u32) + 1 byte (1: joined)


# Payload heads of the frames above (network order).
RECOVER_HEAD: Final = struct.Struct("!IQ")  # request id, since
RECOVERED_HEAD: Final = struct.Struct("!IBQ")  # request id, recovered, seq at the join
TOKEN: Final = struct.Struct("!I")  # a request id or token
JOIN_HEAD: Final = struct.Struct("!II")  # request id, the channel's member limit
EXCLUDE: Final = struct.Struct("!IQ")  # the pid and the token of a connection id "<pid>-<token>"


def request_ids(start: int = 1) -> Iterator[int]:
    """Request ids for the u32 fields above (RECOVER_HEAD, TOKEN, JOIN_HEAD): from
    ``start`` up, wrapping at 2**32 (a worker's 2**32nd request raised struct.error,
    and its client got no answer)."""
    n = start & 0xFFFFFFFF
    while True:
        yield n
        n = (n + 1) & 0xFFFFFFFF


def missed_lines(payload: bytes) -> list[bytes]:
    """The event lines of a RECOVERED answer, each with its newline."""
    # Split on newlines only: a relayed ``data`` may hold a raw \r (JSON whitespace).
    return [line + b"\n" for line in payload[RECOVERED_HEAD.size :].split(b"\n")[:-1]]


def exclude_head(conn: str) -> bytes | None:
    """The EXCLUDE head of a connection id ``"<pid>-<token>"``; None if it is not one."""
    pid, dash, token = conn.partition("-")
    if not (dash and pid.isdigit() and token.isdigit() and pid.isascii() and token.isascii()):
        return None
    try:
        return EXCLUDE.pack(int(pid), int(token))
    except struct.error:  # out of range: no connection has this id
        return None


def encode_frame(kind: Kind, key: str = "", payload: bytes = b"") -> bytes:
    k = key.encode()
    return _HEADER.pack(kind, len(k), len(payload)) + k + payload


class FrameError(Exception):
    """The peer sent a frame this side cannot parse; the link must be dropped."""


class IpcParser:
    """Accumulates bytes and returns complete ``(kind, key, payload)`` frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, str, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, str, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            kind, klen, plen = _HEADER.unpack_from(buf, pos)
            if plen > MAX_PAYLOAD:
                raise FrameError(f"frame payload of {plen} bytes exceeds {MAX_PAYLOAD}")
            start = pos + HEADER_SIZE
            stop = start + klen + plen
            if stop > end:
                break
            raw_key = bytes(buf[start : start + klen])
            try:
                key = raw_key.decode()
            except UnicodeDecodeError:
                raise FrameError(f"frame key {raw_key!r} is not UTF-8") from None
            out.append((kind, key, bytes(buf[start + klen : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out
