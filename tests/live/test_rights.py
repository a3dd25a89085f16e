"""Namespaces and rights on real servers: the public defaults, the spam case, join/leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from support.client import Client
from support.redisfix import RedisServer
from support.server import Server
from support.wait import wait_for

NEWS = """
[api]
port = 0

[[service]]
port = 0
workers = 2
max_connections = 3000

[[namespace]]
name = "news"
publish = "none"
"""

ROOMS = """
[[namespace]]
name = "room"
publish = "subscribers"
presence = true
join_leave = true
"""


def test_a_default_server_lets_clients_subscribe_only(
    serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = serve("--workers", "1", "--max-connections", "100", chat=False)
    client = clients(server.port())
    assert client.call({"op": "hello", "user": "ann", "id": 1})["ev"] == "ok"
    assert client.call({"op": "sub", "channel": "veg", "id": 2})["ev"] == "ok"
    for op in (
        {"op": "pub", "channel": "veg", "data": 1, "id": 3},
        {"op": "send", "user": "bob", "data": 1, "id": 4},
        {"op": "presence", "channel": "veg", "id": 5},
    ):
        answer = client.call(op)
        assert answer["ev"] == "error" and answer["code"] == "forbidden", answer
    server.publish(channel="veg", data="from the backend")  # the API still publishes
    assert client.recv()["data"] == "from the backend"
    assert server.stats()["errors"]["forbidden"] == 3


def test_spam_on_a_publish_none_namespace_is_refused_and_the_stream_is_untouched(
    serve: Callable[..., Server],
) -> None:
    server = serve(config=NEWS, chat=False)
    port = server.port()
    # The spammer's sub and its pubs: the whole of a second's rate (100 messages/s).
    subscribers, attempts, published = 1000, 99, 5

    async def scenario() -> tuple[list[list[dict[str, object]]], list[dict[str, object]]]:
        streams = []
        for _ in range(subscribers):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()  # welcome
            writer.write(b'{"op":"sub","channel":"news:all","id":1}\n')
            streams.append((reader, writer))
        for reader, _ in streams:
            assert json.loads(await reader.readline()) == {"ev": "ok", "id": 1}
        spam_r, spam_w = await asyncio.open_connection("127.0.0.1", port)
        await spam_r.readline()
        spam_w.write(b'{"op":"sub","channel":"news:all"}\n')
        for n in range(attempts):
            spam_w.write(b'{"op":"pub","channel":"news:all","data":"spam","id":%d}\n' % n)
            if n % 20 == 0:
                await asyncio.to_thread(server.publish, channel="news:all", data={"n": n})
        answers = [json.loads(await spam_r.readline()) for _ in range(attempts + published)]
        got = []
        for reader, writer in streams:
            got.append([json.loads(await reader.readline()) for _ in range(published)])
            writer.close()
        spam_w.close()
        return got, answers

    got, answers = asyncio.run(scenario())
    errors = [a for a in answers if a["ev"] == "error"]
    assert len(errors) == attempts and {e["code"] for e in errors} == {"forbidden"}
    assert [a["data"] for a in answers if a["ev"] == "msg"] == [{"n": n} for n in range(0, 100, 20)]
    want = [
        {"ev": "msg", "channel": "news:all", "seq": i + 1, "from": None, "data": {"n": n}}
        for i, n in enumerate(range(0, 100, 20))
    ]
    assert all(stream == want for stream in got)
    stats = server.stats()
    assert stats["messages_out"] >= subscribers * published
    assert stats["errors"]["forbidden"] == attempts and stats["broker"]["published"] == published


def joined(client: Client, user: str, channel: str) -> list[dict[str, object]]:
    """Say hello and subscribe; the join and leave events heard up to the sub's ok.

    A client's own join comes before its ok: the worker's JOIN frame reaches the
    router before the SYNC that the ok waits for.
    """
    client.send({"op": "hello", "user": user, "id": "h"})
    client.send({"op": "sub", "channel": channel, "id": "s"})
    seen = client.until(lambda e: e.get("id") == "s")
    assert all(e["ev"] != "error" for e in seen), seen
    return [e for e in seen if e["ev"] in ("join", "leave")]


def events(client: Client, kind: str, count: int) -> list[dict[str, object]]:
    """The next ``count`` join/leave events (skipping anything else)."""
    seen: list[dict[str, object]] = []
    while len(seen) < count:
        event = client.recv()
        if event["ev"] == kind:
            seen.append(event)
    return seen


def test_subscribers_hear_a_users_first_join_and_last_leave(
    serve: Callable[..., Server], clients: Callable[..., Client]
) -> None:
    server = serve(config="[api]\nport = 0\n\n[[service]]\nport = 0\nworkers = 2\n" + ROOMS)
    port = server.port()
    ann = clients(port)
    assert joined(ann, "ann", "room:1") == [{"ev": "join", "channel": "room:1", "user": "ann"}]
    bob_1, bob_2 = clients(port), clients(port)
    assert joined(bob_1, "bob", "room:1")[-1]["user"] == "bob"  # bob hears himself too
    assert events(ann, "join", 1) == [{"ev": "join", "channel": "room:1", "user": "bob"}]
    assert joined(bob_2, "bob", "room:1") == []  # bob's second connection: no second join
    bob_1.close()
    carl = clients(port)
    joined(carl, "carl", "room:1")  # a marker: what ann hears next comes after it
    assert events(ann, "join", 1)[0]["user"] == "carl"
    bob_2.close()  # bob's last connection: leave
    assert events(ann, "leave", 1) == [{"ev": "leave", "channel": "room:1", "user": "bob"}]
    presence = ann.call({"op": "presence", "channel": "room:1", "id": "p"})
    assert presence["users"] == {"ann": 1, "carl": 1}


def test_join_and_leave_span_nodes_sharing_redis(
    serve: Callable[..., Server], clients: Callable[..., Client], redis_server: RedisServer
) -> None:
    config = '[api]\nport = 0\n\n[[service]]\nhost = "{host}"\nport = 0\nworkers = 2\n' + ROOMS
    nodes = [
        serve(
            config=config.format(host=f"127.0.0.{2 + i}"),
            env={"MANYDOORS_BROKER": redis_server.url},
        )
        for i in range(2)
    ]
    wait_for(lambda: all(n.stats()["broker"]["status"] == "ok" for n in nodes), what="redis")

    def connect(node: Server) -> Client:
        return clients(node.port(), host=node.info["services"]["chat"]["host"])

    ann = connect(nodes[0])
    if not joined(ann, "ann", "room:x"):
        events(ann, "join", 1)  # through Redis her own join may come after her ok
    bob_far, bob_near = connect(nodes[1]), connect(nodes[0])
    joined(bob_far, "bob", "room:x")
    assert events(ann, "join", 1) == [{"ev": "join", "channel": "room:x", "user": "bob"}]
    joined(bob_near, "bob", "room:x")  # bob on a second node: no second join
    bob_far.close()
    carl = connect(nodes[1])
    joined(carl, "carl", "room:x")
    assert events(ann, "join", 1)[0]["user"] == "carl"  # nothing for bob came before it
    bob_near.close()
    assert events(ann, "leave", 1) == [{"ev": "leave", "channel": "room:x", "user": "bob"}]
