"""Redis key and topic names of the Redis broker (pure functions, no Redis needed)."""

from __future__ import annotations

import pytest
from msgspec import Raw
from redis.crc import key_slot

from manydoors.broker.keys import channel_topic, split_at_seq, tag, untag, user_topic
from manydoors.protocol.messages import broadcast_line, msg_line


@pytest.mark.parametrize("name", ["veg", "a}b", "{x}", "}", "ünïcode", "a b:c"])
def test_a_channels_keys_and_topic_share_one_slot_and_name_it_back(name: str) -> None:
    t = tag(name)
    names = [f"md:c{t}:s", f"md:c{t}:h", channel_topic(name)]
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert untag(channel_topic(name).encode(), 4) == name
    assert untag(user_topic(name).encode(), 4) == name


def test_names_with_braces_cannot_collide_with_plain_names() -> None:
    assert tag("{}") != tag("7b7d") and tag("{}").startswith("x{")


def test_an_event_line_splits_around_its_seq_for_the_publish_script() -> None:
    for line in (
        msg_line('say "seq":0', 0, None, Raw(b'{"seq":0}')),
        broadcast_line(0, "ops", Raw(b"1")),
    ):
        prefix, suffix = split_at_seq(line)
        assert prefix + b"17" + suffix == line.replace(b'"seq":0,', b'"seq":17,', 1)
