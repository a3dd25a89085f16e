"""Namespaces and rights through a real Worker's sessions (fake transports and link)."""

from __future__ import annotations

import json

import pytest

from manydoors.config import Config, ConfigError, NamespaceConfig
from manydoors.namespaces import Namespaces
from manydoors.options import load
from manydoors.protocol.ipc import Kind
from support.fakes import OPEN, connect, counter, make_worker

NEWS = NamespaceConfig(name="news", publish="none", history_size=5)
CHAT = NamespaceConfig(name="chat", publish="subscribers", presence=True, join_leave=True)


def line(op: dict[str, object]) -> bytes:
    return json.dumps(op).encode() + b"\n"


def test_a_channel_belongs_to_the_namespace_before_its_colon_else_to_the_default() -> None:
    spaces = Namespaces(NamespaceConfig(publish="all"), (NEWS, CHAT), history_size=7)
    assert spaces("news:sports").name == "news"
    assert spaces("chat:room:1").name == "chat"
    assert spaces("news").name == ""  # no colon: the default namespace
    assert spaces("weather:today").name == ""  # a namespace nobody configured
    assert spaces.history("news:x") == (5, 300.0)
    assert spaces.history("other") == (7, 300.0)  # the global history_size fills in
    assert spaces("news:sports") is spaces("news:sports")  # resolved once, cached


def test_the_default_namespace_is_safe_for_a_public_server() -> None:
    ns = Config().channels
    assert (ns.publish, ns.subscribe, ns.presence, ns.join_leave) == ("none", "all", False, False)
    assert Config().services[0].allow_send is False


def test_namespaces_come_from_toml_and_the_default_one_from_flags() -> None:
    config = load(
        '[channels]\npublish = "subscribers"\n\n[[namespace]]\nname = "news"\n'
        'history_size = 3\n\n[[namespace]]\nname = "chat"\npublish = "all"\njoin_leave = true\n',
        flags={"channels.publish": "all", "allow_send": "true"},
    )
    assert config.channels.publish == "all"  # the flag wins over the file
    assert [(ns.name, ns.publish) for ns in config.namespaces] == [
        ("news", "none"),
        ("chat", "all"),
    ]
    assert config.services[0].allow_send is True
    for bad, why in (
        ('[[namespace]]\npublish = "all"\n', "needs a name"),
        ('[[namespace]]\nname = "a"\n[[namespace]]\nname = "a"\n', "unique"),
        ('[[namespace]]\nname = "a"\npublish = "everyone"\n', "publish 'everyone'"),
        ('[[namespace]]\nname = "a:b"\n', "no ':'"),
        ('[channels]\nsubscribe = "proxy"\n', "subscribe_url"),
        ("[channels]\npublish_proxy = true\n", "publish_url"),
        ('[auth]\nmode = "proxy"\n', "connect_url"),
        ('[hooks]\nconnect_url = "http://127.0.0.1:9/c"\n', 'only with .auth. mode = "proxy"'),
    ):
        with pytest.raises(ConfigError, match=why):
            load(bad)


def test_with_publish_none_a_client_pub_is_forbidden_and_nothing_is_sent() -> None:
    worker, link = make_worker()
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "sub", "channel": "news", "id": 1}))
    for n in range(5):
        conn.data_received(line({"op": "pub", "channel": "news", "data": n, "id": n}))
    errors = [e for e in tr.take() if e["ev"] == "error"]
    assert len(errors) == 5 and {e["code"] for e in errors} == {"forbidden"}
    assert "publish = none" in errors[0]["reason"]
    assert Kind.PUB not in link.kinds()
    assert counter(worker, "error_forbidden") == 5


def test_with_publish_subscribers_only_a_subscriber_may_publish() -> None:
    worker, link = make_worker(namespaces=(CHAT,))
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "pub", "channel": "chat:a", "data": 1, "id": 1}))
    assert tr.take()[0]["code"] == "forbidden"
    conn.data_received(line({"op": "sub", "channel": "chat:a"}))
    conn.data_received(line({"op": "pub", "channel": "chat:a", "data": 2, "id": 2}))
    assert [f[1] for f in link.frames if f[0] == Kind.PUB] == ["chat:a"]


def test_send_to_a_user_needs_allow_send() -> None:
    worker, link = make_worker(channels=OPEN)
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "send", "user": "bob", "data": 1, "id": 1}))
    (error,) = tr.take()
    assert error["code"] == "forbidden" and "allow_send" in error["reason"]
    assert Kind.SEND not in link.kinds()


def test_subscribe_token_needs_the_channel_in_the_tokens_claim() -> None:
    worker, _ = make_worker(namespaces=(NamespaceConfig(name="vip", subscribe="token"),))
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "sub", "channel": "vip:lounge", "id": 1}))
    (error,) = tr.take()
    assert error["code"] == "forbidden" and "subscribe = token" in error["reason"]
    worker.sessions.rights.grants[conn] = frozenset({"vip:lounge"})  # as a JWT claim would
    conn.data_received(line({"op": "sub", "channel": "vip:lounge", "id": 2}))
    assert conn in worker.hub.channels["vip:lounge"]


def test_presence_is_refused_where_the_namespace_has_it_off() -> None:
    worker, link = make_worker(namespaces=(CHAT,))
    conn, tr = connect(worker)
    tr.take()
    conn.data_received(line({"op": "presence", "channel": "lobby", "id": 1}))
    assert "presence is off" in tr.take()[0]["reason"]
    conn.data_received(line({"op": "presence", "channel": "chat:a", "id": 2}))
    assert link.kinds()[-1] == Kind.PRESENCE


def test_join_and_leave_frames_follow_a_users_first_and_last_connection() -> None:
    worker, link = make_worker(namespaces=(CHAT,))
    first, _ = connect(worker)
    second, _ = connect(worker)
    for conn in (first, second):
        conn.data_received(line({"op": "hello", "user": "ann"}))
    link.frames.clear()
    first.data_received(line({"op": "sub", "channel": "chat:a"}))
    second.data_received(line({"op": "sub", "channel": "chat:a"}))
    second.data_received(line({"op": "sub", "channel": "lobby"}))  # no join_leave there
    joins = [(k, key, p) for k, key, p in link.frames if k in (Kind.JOIN, Kind.LEAVE)]
    assert joins == [(Kind.JOIN, "chat:a", b"ann")]
    link.frames.clear()
    first.data_received(line({"op": "unsub", "channel": "chat:a"}))
    assert Kind.LEAVE not in link.kinds()  # ann is still there on her second connection
    second.connection_lost(None)
    assert (Kind.LEAVE, "chat:a", b"ann") in link.frames


def test_connect_and_disconnect_events_say_who_and_why() -> None:
    worker, link = make_worker(events=frozenset({"connect", "disconnect"}))
    conn, _ = connect(worker, ("192.0.2.7", 5555))
    anonymous, _ = connect(worker)
    conn.data_received(line({"op": "hello", "user": "zed"}))
    conn.connection_lost(ConnectionResetError())
    anonymous.connection_lost(None)  # said no hello: no events
    # (the address goes with connect only: a connection we closed has no transport left)
    events = [(key, json.loads(p)) for k, key, p in link.frames if k == Kind.EVENT]
    assert events == [
        ("connect", {"user": "zed", "service": "chat", "address": "192.0.2.7:5555"}),
        (
            "disconnect",
            {"user": "zed", "service": "chat", "reason": "reset"},
        ),
    ]


def test_presence_answers_in_pages_of_max_presence_members() -> None:
    room = NamespaceConfig(name="room", presence=True, max_presence_members=2)
    worker, link = make_worker(namespaces=(room,))
    conn, tr = connect(worker)
    tr.take()
    members = b'{"users":{"dan":1,"ann":2,"cy":1,"bo":1},"anonymous":3}'

    def ask(after: str | None) -> dict[str, object]:
        op: dict[str, object] = {"op": "presence", "channel": "room:1", "id": 1}
        if after is not None:
            op["after"] = after
        conn.data_received(line(op))
        kind, _, payload = link.frames[-1]
        assert kind == Kind.PRESENCE
        worker.on_frame(link, Kind.PRESENCE_DONE, "room:1", payload + members)  # type: ignore[arg-type]
        (answer,) = tr.take()
        return answer

    first = ask(None)
    assert first["users"] == {"ann": 2, "bo": 1} and first["next"] == "bo"
    assert first["anonymous"] == 3
    second = ask("bo")
    assert second["users"] == {"cy": 1, "dan": 1} and "next" not in second
