"""Pusher's REST API (pusher/api.py) over real sockets on 127.0.0.1, driven by the PyPI
``pusher`` server library: its own calls (``trigger``, ``trigger_batch``,
``channels_info``, ``channel_info``, ``users_info``, ``terminate_user_connections``,
``send_to_user``) in a thread, and its signed requests sent as they are or changed.

The node under the API is a real ``Router`` on a fake worker link (what a publish or a
disconnect sends a worker) with channel counts and presence members from tables the
test fills. A node with a real Pusher service is in tests/live/test_pusher_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import msgspec
import pusher
import pytest
from aiohttp import web
from msgspec import Raw
from pusher.errors import PusherBadAuth, PusherBadRequest, PusherBadStatus

from manydoors.broker.base import ChannelList, PresenceResult, Published
from manydoors.config import ApiConfig, AppConfig, AuthConfig
from manydoors.protocol.ipc import EXCLUDE, Kind
from manydoors.pusher import frames, names
from manydoors.pusher.api import MAX_LISTED, add_routes
from manydoors.server.api import MAX_BODY, start_api
from unit.test_router import node, tell

APP = AppConfig(id="1001", key="app-key", secret="app-secret", max_event_bytes=1000)
OTHER = AppConfig(id="1002", key="other-key", secret="other-secret")


class FakeBroker:
    """The node as the Pusher API asks it: publishes and disconnects through a real
    ``Router`` to one fake worker link; counts and members from ``counts``/``members``."""

    def __init__(self) -> None:
        self.router, (self.link,) = node("w")
        self.counts: dict[str, int] = {}  # node channel -> connections (every node)
        self.members: dict[str, dict[str, int]] = {}  # node channel -> member key -> n
        self.published: list[tuple[str, dict[str, Any], str | None]] = []
        self.listed: list[tuple[str, int]] = []

    def subscribe(self, app: AppConfig, channel: str) -> str:
        """The worker link holds a subscriber of ``channel``: deliveries reach it."""
        key = names.channel(app.id, channel)
        tell(self.router, self.link, Kind.SUB, key)
        return key

    def join(self, app: AppConfig, channel: str, user_id: str, connections: int = 1) -> None:
        key = names.channel(app.id, channel)
        member = frames.member_key(user_id, Raw(b'{"name":"%s"}' % user_id.encode()))
        self.members.setdefault(key, {})[member] = connections
        self.counts[key] = self.counts.get(key, 0) + connections

    async def publish_channel(
        self, channel: str, sender: str | None, data: Raw, exclude: str | None = None
    ) -> Published:
        self.published.append((channel, json.loads(bytes(data)), exclude))
        return await self.router.publish_channel(channel, sender, data, exclude)

    async def list_channels(self, prefix: str, limit: int) -> ChannelList:
        self.listed.append((prefix, limit))
        result = ChannelList({n: c for n, c in self.counts.items() if n.startswith(prefix)})
        result.cap(limit)
        return result

    async def presence(self, channel: str) -> PresenceResult:
        return PresenceResult(dict(self.members.get(channel, {})))

    async def disconnect(self, user: str, reason: str) -> Published:
        return await self.router.disconnect(user, reason)


class Api:
    """The API served on a free port, and ways to call it."""

    def __init__(self, broker: FakeBroker, port: int) -> None:
        self.broker = broker
        self.port = port

    def library(self, app: AppConfig = APP) -> Any:
        return pusher.Pusher(
            app_id=app.id,
            key=app.key,
            secret=app.secret,
            ssl=False,
            host="127.0.0.1",
            port=self.port,
        )

    async def call(self, method: str, *args: Any, app: AppConfig = APP) -> Any:
        """The library's own call, its blocking HTTP in a thread while the loop serves."""
        return await asyncio.to_thread(getattr(self.library(app), method), *args)

    def signed(self, method: str, *args: Any, app: AppConfig = APP) -> Any:
        """The library's signed request for ``method``, not sent."""
        return getattr(self.library(app)._pusher_client, method).make_request(*args)

    async def send(
        self,
        req: Any,
        *,
        path: str | None = None,
        body: bytes | None = None,
        query: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send a signed request (or a changed copy): the status and the JSON answer."""
        params = dict(req.query_params) if query is None else query
        url = f"http://127.0.0.1:{self.port}{path or req.path}"
        data = req.body if body is None else body
        headers = {"Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(req.method, url, params=params, data=data, headers=headers) as resp,
        ):
            return resp.status, json.loads(await resp.read())


@contextlib.asynccontextmanager
async def serving(
    broker: FakeBroker | None = None, clock: Callable[[], float] = time.time, busy: bool = False
) -> AsyncIterator[Api]:
    app = web.Application(client_max_size=MAX_BODY)
    broker = broker or FakeBroker()
    add_routes(app, [APP, OTHER], broker, clock=clock, busy=lambda: busy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Api(broker, runner.addresses[0][1])
    finally:
        await runner.cleanup()


def run(test: Callable[[Api], Coroutine[Any, Any, None]], **kwargs: Any) -> None:
    async def main() -> None:
        async with serving(**kwargs) as api:
            await test(api)

    asyncio.run(main())


def deliveries(broker: FakeBroker) -> list[tuple[int, str, dict[str, Any]]]:
    """What the worker link got: (kind, node channel, the event line as JSON)."""
    out = []
    for kind, key, payload in broker.link.decoded():
        if kind == Kind.DELIVER_CHANNEL_EXCEPT:
            payload = payload[EXCLUDE.size :]
        out.append((kind, key, json.loads(payload)))
    return out


# --- events ------------------------------------------------------------------------------


def test_trigger_publishes_the_pusher_frame_to_the_app_s_channel() -> None:
    async def test(api: Api) -> None:
        node_channel = api.broker.subscribe(APP, "chat")
        assert await api.call("trigger", "chat", "said", {"text": "hi"}) == {}
        ((kind, key, line),) = deliveries(api.broker)
        assert (kind, key) == (Kind.DELIVER_CHANNEL, node_channel)
        frame = {"event": "said", "channel": "chat", "data": '{"text": "hi"}'}
        assert line["data"] == frame
        # The Pusher wire sends a subscriber that frame itself, in one text frame.
        wire = frames.wire(25.0)
        assert wire.frame(msgspec.json.encode(line)).endswith(msgspec.json.encode(frame))

    run(test)


def test_trigger_to_several_channels_sends_each_its_own_frame() -> None:
    async def test(api: Api) -> None:
        assert await api.call("trigger", ["a", "b", "private-c"], "ev", "x") == {}
        published = {(ch, frame["channel"]) for ch, frame, _ in api.broker.published}
        assert published == {
            (names.channel(APP.id, "a"), "a"),
            (names.channel(APP.id, "b"), "b"),
            (names.channel(APP.id, "private-c"), "private-c"),
        }

    run(test)


def test_a_socket_id_is_left_out_as_the_node_s_connection_id() -> None:
    async def test(api: Api) -> None:
        api.broker.subscribe(APP, "chat")
        await api.call("trigger", "chat", "ev", "x", "4321.987654321")
        assert api.broker.published[0][2] == "4321-987654321"
        ((kind, _, payload),) = api.broker.link.decoded()
        assert kind == Kind.DELIVER_CHANNEL_EXCEPT
        assert payload[: EXCLUDE.size] == EXCLUDE.pack(4321, 987654321)

    run(test)


def test_send_to_user_publishes_on_the_user_s_server_to_user_channel() -> None:
    async def test(api: Api) -> None:
        await api.call("send_to_user", "alice", "hello", {"n": 1})
        ((channel, frame, _),) = api.broker.published
        assert channel == names.channel(APP.id, "#server-to-user-alice")
        assert frame["channel"] == "#server-to-user-alice"

    run(test)


def test_two_apps_publishing_the_same_channel_name_stay_apart() -> None:
    async def test(api: Api) -> None:
        await api.call("trigger", "chat", "ev", "one")
        await api.call("trigger", "chat", "ev", "two", app=OTHER)
        assert [ch for ch, _, _ in api.broker.published] == [
            names.channel(APP.id, "chat"),
            names.channel(OTHER.id, "chat"),
        ]

    run(test)


def test_info_on_an_event_answers_counts_per_channel() -> None:
    broker = FakeBroker()
    broker.join(APP, "presence-room", "alice", 2)
    broker.join(APP, "presence-room", "bob")
    broker.counts[names.channel(APP.id, "news")] = 7

    async def test(api: Api) -> None:
        body = {
            "name": "ev",
            "data": "x",
            "channels": ["presence-room", "news", "empty"],
            "info": "user_count,subscription_count",
        }
        req = api.signed("trigger", ["news"], "ev", "x")
        raw = json.dumps(body).encode()
        status, answer = await api.send(req, body=raw, query=resign(req, raw))
        assert status == 200
        assert answer == {
            "channels": {
                "presence-room": {"user_count": 2, "subscription_count": 3},
                "news": {"subscription_count": 7},
                "empty": {"subscription_count": 0},
            }
        }

    run(test, broker=broker)


def resign(req: Any, body: bytes, app: AppConfig = APP) -> dict[str, str]:
    """The query of ``req`` signed again for another body (the library's own way)."""
    from pusher.http import Request

    lib = pusher.Pusher(app_id=app.id, key=app.key, secret=app.secret, ssl=False)
    again = Request(lib._pusher_client, req.method, req.path, json.loads(body))
    assert again.body == json.dumps(json.loads(body)).encode()
    return dict(again.query_params)


def signed_body(api: Api, path: str, body: Any, app: AppConfig = APP) -> tuple[Any, bytes]:
    """A POST to ``path`` of ``body``, signed by the library."""
    from pusher.http import POST, Request

    req = Request(api.library(app)._pusher_client, POST, path, body)
    return req, req.body


async def post(api: Api, path: str, body: Any, app: AppConfig = APP) -> tuple[int, Any]:
    req, _ = signed_body(api, path, body, app)
    return await api.send(req)


def test_batch_events_publish_each_and_answer_info_by_index() -> None:
    broker = FakeBroker()
    broker.counts[names.channel(APP.id, "b")] = 4

    async def test(api: Api) -> None:
        batch = [
            {"channel": "a", "name": "one", "data": "1"},
            {"channel": "b", "name": "two", "data": "2"},
        ]
        assert await api.call("trigger_batch", batch) == {}
        assert [(f["channel"], f["event"]) for _, f, _ in api.broker.published] == [
            ("a", "one"),
            ("b", "two"),
        ]
        with_info = [
            {"channel": "a", "name": "one", "data": "1"},
            {"channel": "b", "name": "two", "data": "2", "info": "subscription_count"},
        ]
        status, answer = await post(api, f"/apps/{APP.id}/batch_events", {"batch": with_info})
        assert (status, answer) == (200, {"batch": [{}, {"subscription_count": 4}]})

    run(test, broker=broker)


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"name": "ev", "data": "x"}, 400, "give one of channel or channels"),
        ({"name": "ev", "data": "x", "channel": "a", "channels": ["b"]}, 400, "one of"),
        ({"name": "ev", "data": {"an": "object"}, "channel": "a"}, 400, "Expected `str`"),
        ({"name": "ev", "channel": "a"}, 400, "missing required field `data`"),
        ({"name": "", "data": "x", "channel": "a"}, 400, "length >= 1"),
        ({"name": "e" * 201, "data": "x", "channel": "a"}, 400, "length <= 200"),
        ({"name": "ev", "data": "x", "channel": "bad channel"}, 400, "a channel name is"),
        ({"name": "ev", "data": "x", "channel": "c" * 165}, 400, "a channel name is"),
        ({"name": "ev", "data": "x", "channels": [f"c{n}" for n in range(101)]}, 400, "<= 100"),
        ({"name": "ev", "data": "x" * 1001, "channel": "a"}, 413, "over this app's limit"),
        ({"name": "pusher:x", "data": "x", "channel": "a"}, 400, "are Pusher's"),
        ({"name": "pusher_internal:member_added", "data": "x", "channel": "a"}, 400, "Pusher"),
        ({"name": "ev", "data": "x", "channel": "a", "socket_id": "1-2"}, 400, "socket_id"),
        ({"name": "ev", "data": "x", "channel": "a", "info": "colour"}, 400, "unknown attribute"),
        (
            {"name": "ev", "data": "x", "channels": ["a", "private-encrypted-b"]},
            400,
            "encrypted channel goes to that channel alone",
        ),
        ([1, 2], 400, "Expected `object`"),
    ],
)
def test_a_malformed_event_is_refused_with_the_reason_and_nothing_published(
    body: Any, status: int, reason: str
) -> None:
    async def test(api: Api) -> None:
        got, answer = await post(api, f"/apps/{APP.id}/events", body)
        assert got == status
        assert reason in answer["error"], answer
        assert answer["code"] == status
        assert api.broker.published == []

    run(test)


def test_a_batch_with_one_bad_event_publishes_none() -> None:
    async def test(api: Api) -> None:
        batch = [
            {"channel": "a", "name": "ok", "data": "1"},
            {"channel": "b", "name": "big", "data": "x" * 2000},
        ]
        status, answer = await post(api, f"/apps/{APP.id}/batch_events", {"batch": batch})
        assert status == 413 and "over this app's limit" in answer["error"]
        eleven = [{"channel": "a", "name": "n", "data": "1"}] * 11
        status, answer = await post(api, f"/apps/{APP.id}/batch_events", {"batch": eleven})
        assert status == 400 and "length <= 10" in answer["error"]
        assert api.broker.published == []

    run(test)


def test_data_over_the_limit_is_a_413_the_library_reports() -> None:
    async def test(api: Api) -> None:
        with pytest.raises(PusherBadStatus, match="413"):
            await api.call("trigger", "chat", "ev", "x" * 1001)
        await api.call("trigger", "chat", "ev", "é" * 500)  # 1000 bytes: the limit is in bytes

    run(test)


def test_unknown_fields_are_ignored_as_pusher_does() -> None:
    async def test(api: Api) -> None:
        body = {"name": "ev", "data": "x", "channel": "a", "future_option": True}
        assert await post(api, f"/apps/{APP.id}/events", body) == (200, {})

    run(test)


def test_a_publish_while_the_workers_are_behind_is_a_503_to_retry() -> None:
    async def test(api: Api) -> None:
        req, _ = signed_body(
            api, f"/apps/{APP.id}/events", {"name": "e", "data": "", "channel": "a"}
        )
        status, answer = await api.send(req)
        assert status == 503 and "retry" in answer["error"]

    run(test, busy=True)


# --- authentication -------------------------------------------------------------------------


def test_an_unknown_app_is_a_404_before_any_signature_check() -> None:
    async def test(api: Api) -> None:
        req = api.signed("channels_info")
        status, answer = await api.send(req, path="/apps/9999/channels")
        assert status == 404 and "9999" in answer["error"]

    run(test)


def test_a_wrong_secret_is_a_401_the_library_reports_with_the_reason() -> None:
    wrong = AppConfig(id=APP.id, key=APP.key, secret="not-the-secret")

    async def test(api: Api) -> None:
        with pytest.raises(PusherBadAuth, match="auth_signature does not match"):
            await api.call("trigger", "chat", "ev", "x", app=wrong)
        assert api.broker.published == []

    run(test)


def test_another_app_s_key_or_a_stale_timestamp_is_a_401() -> None:
    async def test(api: Api) -> None:
        req = api.signed("channels_info", app=OTHER)
        status, answer = await api.send(req, path=f"/apps/{APP.id}/channels")
        assert status == 401 and "auth_key" in answer["error"]

    run(test)

    async def stale(api: Api) -> None:
        with pytest.raises(PusherBadAuth, match="more than 600 s"):
            await api.call("channels_info")

    run(stale, clock=lambda: time.time() + 601)


def test_a_body_changed_in_transit_is_a_401() -> None:
    async def test(api: Api) -> None:
        req, body = signed_body(
            api, f"/apps/{APP.id}/events", {"name": "e", "data": "1", "channel": "a"}
        )
        status, answer = await api.send(req, body=body.replace(b'"1"', b'"2"'))
        assert status == 401 and "body_md5" in answer["error"]
        assert api.broker.published == []

    run(test)


def test_invalid_utf8_in_a_signed_body_is_a_400() -> None:
    async def test(api: Api) -> None:
        raw = b'{"name":"e","data":"\xff","channel":"a"}'
        req, _ = signed_body(api, f"/apps/{APP.id}/events", {})
        status, answer = await api.send(req, body=raw, query=resign_raw(req, raw))
        assert status == 400 and "UTF-8" in answer["error"]

    run(test)


def resign_raw(req: Any, raw: bytes) -> dict[str, str]:
    """The query of ``req`` signed for the bytes ``raw`` (the library signs only JSON)."""
    import hashlib

    from manydoors.pusher.signing import sign

    query = {k: v for k, v in req.query_params.items() if k != "auth_signature"}
    query["body_md5"] = hashlib.md5(raw).hexdigest()
    text = "&".join(f"{k}={query[k]}" for k in sorted(query))
    query["auth_signature"] = sign(APP.secret, f"{req.method}\n{req.path}\n{text}")
    return query


# --- channels and users ----------------------------------------------------------------------


def test_channels_lists_the_app_s_occupied_channels_only() -> None:
    broker = FakeBroker()
    broker.counts = {
        names.channel(APP.id, "news"): 3,
        names.channel(APP.id, "presence-room"): 2,
        names.channel(APP.id, "gone"): 0,
        names.channel(OTHER.id, "theirs"): 5,
        "native-channel": 9,
    }

    async def test(api: Api) -> None:
        answer = await api.call("channels_info")
        assert answer == {"channels": {"news": {}, "presence-room": {}}}
        answer = await api.call("channels_info", None, ["subscription_count"])
        assert answer["channels"]["news"] == {"subscription_count": 3}
        assert api.broker.listed[-1] == (names.channel(APP.id, ""), MAX_LISTED)

    run(test, broker=broker)


def test_channels_with_user_count_needs_the_presence_prefix() -> None:
    broker = FakeBroker()
    broker.join(APP, "presence-a", "alice", 3)
    broker.join(APP, "presence-a", "bob")
    broker.join(APP, "presence-b", "carol")
    broker.counts[names.channel(APP.id, "public")] = 1

    async def test(api: Api) -> None:
        answer = await api.call("channels_info", "presence-", ["user_count"])
        assert answer == {
            "channels": {"presence-a": {"user_count": 2}, "presence-b": {"user_count": 1}}
        }
        with pytest.raises(PusherBadRequest, match="filter_by_prefix=presence-"):
            await api.call("channels_info", None, ["user_count"])
        with pytest.raises(PusherBadRequest, match="unknown attribute"):
            await api.call("channels_info", None, ["colour"])
        with pytest.raises(PusherBadRequest, match="filter_by_prefix"):
            await api.call("channels_info", "no spaces")

    run(test, broker=broker)


def test_channel_says_occupied_and_the_counts_asked_for() -> None:
    broker = FakeBroker()
    broker.join(APP, "presence-room", "alice", 2)
    broker.counts[names.channel(APP.id, "news")] = 5
    broker.counts[names.channel(APP.id, "news-extra")] = 1  # a longer name, same prefix

    async def test(api: Api) -> None:
        assert await api.call("channel_info", "news") == {"occupied": True}
        assert await api.call("channel_info", "empty") == {"occupied": False}
        answer = await api.call("channel_info", "news", ["subscription_count"])
        assert answer == {"occupied": True, "subscription_count": 5}
        answer = await api.call(
            "channel_info", "presence-room", ["user_count", "subscription_count"]
        )
        assert answer == {"occupied": True, "user_count": 1, "subscription_count": 2}
        with pytest.raises(PusherBadRequest, match="presence channels only"):
            await api.call("channel_info", "news", ["user_count"])

    run(test, broker=broker)


def test_users_lists_a_presence_channel_s_distinct_user_ids() -> None:
    broker = FakeBroker()
    broker.join(APP, "presence-room", "alice", 2)
    broker.join(APP, "presence-room", "bob")
    # The same user with other user_info on another connection: still one user.
    key = names.channel(APP.id, "presence-room")
    broker.members[key][frames.member_key("bob", Raw(b'{"away":true}'))] = 1

    async def test(api: Api) -> None:
        answer = await api.call("users_info", "presence-room")
        assert answer == {"users": [{"id": "alice"}, {"id": "bob"}]}
        assert await api.call("users_info", "presence-empty") == {"users": []}
        with pytest.raises(PusherBadRequest, match="presence channels only"):
            await api.call("users_info", "private-room")

    run(test, broker=broker)


def test_terminate_user_connections_disconnects_the_app_s_user() -> None:
    async def test(api: Api) -> None:
        user = names.user(APP.id, "alice")
        tell(api.broker.router, api.broker.link, Kind.USER_ON, user)
        # The PyPI library posts to /users/{id}/terminate_connections (no /apps/{id}).
        assert await api.call("terminate_user_connections", "alice") == {}
        status, answer = await post(api, f"/apps/{APP.id}/users/alice/terminate_connections", {})
        assert (status, answer) == (200, {})
        assert api.broker.link.decoded() == [(Kind.DISCONNECT, user, b"terminated")] * 2
        status, answer = await post(api, f"/apps/{APP.id}/users/a%20b/terminate_connections", {})
        assert status == 400 and "user id" in answer["error"]

    run(test)


def test_the_api_key_of_the_native_api_does_not_guard_the_pusher_routes() -> None:
    class Node:
        broker = FakeBroker()

        def queued_to_workers(self) -> int:
            return 0

    async def main() -> None:
        auth = AuthConfig(api_key="k" * 16)
        runner, port = await start_api(Node(), ApiConfig(port=0), auth, apps=[APP])  # type: ignore[arg-type]
        try:
            api = Api(Node.broker, port)
            assert await api.call("trigger", "chat", "ev", "x") == {}
            url = f"http://127.0.0.1:{port}/api/channels"
            async with aiohttp.ClientSession() as session, session.get(url) as resp:
                assert resp.status == 401  # the native API still needs its key
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_a_body_over_a_mebibyte_is_refused_before_its_signature_is_read() -> None:
    async def test(api: Api) -> None:
        body = {"name": "e", "data": "x" * MAX_BODY, "channel": "a"}
        status, _ = await post_raw(api, f"/apps/{APP.id}/events", body)
        assert status == 413
        assert api.broker.published == []

    run(test)


async def post_raw(api: Api, path: str, body: Any) -> tuple[int, bytes]:
    req, raw = signed_body(api, path, body)
    url = f"http://127.0.0.1:{api.port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        # A stream: aiohttp warns about (and the tests fail on) raw bytes over 1 MiB.
        session.post(url, params=dict(req.query_params), data=io.BytesIO(raw)) as resp,
    ):
        return resp.status, await resp.read()
