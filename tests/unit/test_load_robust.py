"""The load generator's WebSocket frames: a server's pings get masked pongs."""

from __future__ import annotations

from manydoors.loadgen import wsclient


def test_pings_are_answered_with_masked_pongs_of_the_same_payload():
    ping = b"\x89\x04abcd"  # unmasked, as a server sends it
    text = b"\x81\x05hello"
    texts, answer, closed, rest = wsclient.split_frames(text + ping + b"\x89\x00" + text[:3])
    assert texts == [b"hello"] and not closed and rest == text[:3]
    # FIN + pong, mask bit + length, the all-zero mask key, the payload echoed.
    assert answer == b"\x8a\x84\x00\x00\x00\x00abcd" + b"\x8a\x80\x00\x00\x00\x00"
    # A ping cut in two is answered once it is whole.
    assert wsclient.split_frames(ping[:3]) == ([], b"", False, ping[:3])
    assert wsclient.split_frames(ping[:3] + ping[3:])[1] == wsclient.masked_pong(b"abcd")
    # read_frames keeps its shape for the callers that only want the text.
    assert wsclient.read_frames(text + ping) == ([b"hello"], False, b"")
