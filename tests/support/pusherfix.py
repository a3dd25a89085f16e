"""The Pusher interop tests' world: a node with a ``pusher`` service and three apps, the
app's backend (auth endpoints, webhooks, a page for Chromium), and the peers that are
real Pusher libraries: pusher-js and Laravel Echo in Node, pysher, the Pusher server
libraries.

The backend signs with the PyPI ``pusher`` library (``authenticate``,
``authenticate_user``), never with our own code. The Node peers (tests/node) print one
JSON line per thing the library reports and take one JSON command a line.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from support.backend import HttpBackend
from support.nodefix import NODE_DIR
from support.wait import wait_for

PUSHER_JS_WEB = NODE_DIR / "node_modules" / "pusher-js" / "dist" / "web" / "pusher.min.js"


# The apps' end-to-end key for private-encrypted- channels: the backend and the server
# library know it, the node never does.
MASTER_KEY_BASE64 = base64.b64encode(b"manydoors-interop-master-key-32b").decode()


@dataclass(frozen=True)
class App:
    id: str
    key: str
    secret: str

    def library(self, api: str | None = None, **options: Any) -> Any:
        """The PyPI ``pusher.Pusher`` of this app, aimed at a node's API if given."""
        import pusher

        if api is not None:
            host, port = api.removeprefix("http://").rsplit(":", 1)
            options = {"host": host, "port": int(port), "ssl": False, **options}
        return pusher.Pusher(
            app_id=self.id,
            key=self.key,
            secret=self.secret,
            encryption_master_key_base64=MASTER_KEY_BASE64,
            **options,
        )


APP = App("1001", "app-key", "app-secret")  # client events on; webhooks to the backend
OTHER = App("1002", "other-key", "other-secret")  # the same channel names, isolated
SMALL = App("1003", "small-key", "small-secret")  # max_presence_members = 3
SMALL_MEMBERS = 3


def node_config(webhook_url: str | None = None, workers: int = 2) -> str:
    """The TOML of a node: one ``pusher`` service of ``workers`` workers, the three apps."""
    hook = f'webhook_url = "{webhook_url}"\n' if webhook_url else ""
    return f"""
[api]
port = 0

[[service]]
name = "pusher"
port = 0
protocol = "pusher"
workers = {workers}
max_connections = 1000

[[app]]
id = "{APP.id}"
key = "{APP.key}"
secret = "{APP.secret}"
enable_client_events = true
{hook}
[[app]]
id = "{OTHER.id}"
key = "{OTHER.key}"
secret = "{OTHER.secret}"
enable_client_events = true

[[app]]
id = "{SMALL.id}"
key = "{SMALL.key}"
secret = "{SMALL.secret}"
max_presence_members = {SMALL_MEMBERS}
"""


def user_info(user: str) -> dict[str, Any]:
    return {"name": user.capitalize()}


class PusherBackend(HttpBackend):
    """The app's backend, as a Laravel or Django app would be, for every app above.

    - ``POST /pusher/auth`` and ``/broadcasting/auth`` (Echo's): the user is the
      ``X-User`` header; the answer is the PyPI library's ``authenticate``, with
      ``channel_data`` for presence channels. Channels in ``refuse`` get 403; in
      ``forge``, an auth signed with the wrong secret.
    - ``POST /pusher/user-auth`` and ``/broadcasting/user-auth``: ``authenticate_user``.
    - ``POST /pusher/webhook``: kept (headers and raw body) in ``webhooks``.
    - ``GET /pusher.js`` and ``GET /page``: pusher-js's web build and an empty page, so a
      browser's page is of the same origin as the auth endpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refuse: set[str] = set()
        self.forge: set[str] = set()
        self.auth_calls: list[tuple[str, dict[str, str]]] = []
        self.webhooks: list[tuple[dict[str, str], bytes]] = []
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        for path in ("/pusher/auth", "/broadcasting/auth"):
            app.router.add_post(path, self.channel_auth)
        for path in ("/pusher/user-auth", "/broadcasting/user-auth"):
            app.router.add_post(path, self.user_auth)
        app.router.add_post("/pusher/webhook", self.webhook)
        app.router.add_get("/pusher.js", self.script)
        app.router.add_get("/page", self.page)

    @staticmethod
    def app_of(request: web.Request) -> App:
        key = request.headers.get("X-App-Key", APP.key)
        return next(app for app in (APP, OTHER, SMALL) if app.key == key)

    async def channel_auth(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.auth_calls.append((request.path, form))
        channel, socket_id = form["channel_name"], form["socket_id"]
        if channel in self.refuse:
            return web.json_response({"error": "not yours"}, status=403)
        app = self.app_of(request)
        signer = App(app.id, app.key, "not-the-secret") if channel in self.forge else app
        user = request.headers.get("X-User", "anonymous")
        data = None
        if channel.startswith("presence-"):
            data = {"user_id": user, "user_info": user_info(user)}
        answer = signer.library().authenticate(channel, socket_id, data)
        # An encrypted channel's shared_secret comes back as base64 bytes.
        answer = {k: v.decode() if isinstance(v, bytes) else v for k, v in answer.items()}
        return web.json_response(answer)

    async def user_auth(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.auth_calls.append((request.path, form))
        user = request.headers.get("X-User", "anonymous")
        answer = (
            self.app_of(request)
            .library()
            .authenticate_user(form["socket_id"], {"id": user, "user_info": user_info(user)})
        )
        return web.json_response(answer)

    async def webhook(self, request: web.Request) -> web.Response:
        self.webhooks.append((dict(request.headers), await request.read()))
        return web.Response(status=200)

    async def script(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PUSHER_JS_WEB)

    async def page(self, request: web.Request) -> web.Response:
        html = (
            '<!doctype html><html><head><link rel="icon" href="data:,">'
            '<script src="/pusher.js"></script></head></html>'
        )
        return web.Response(text=html, content_type="text/html")


class NodePeer:
    """One Node script of tests/node run with a JSON config: its JSON lines as records.

    ``send`` writes a command; ``wait`` polls the records for one that matches;
    ``close`` ends stdin (the script exits) and kills it if it lingers.
    """

    def __init__(self, script: str, config: dict[str, Any], log: Path) -> None:
        self.name = f"{script} {config.get('headers', {}).get('X-User', '')}".strip()
        self.log = log
        self.records: list[dict[str, Any]] = []
        self._stderr = open(log, "wb")  # noqa: SIM115 -- closed in close()
        self.proc = subprocess.Popen(
            ["node", str(NODE_DIR / script), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=NODE_DIR,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                self.records.append({"type": "unparsed", "line": line})

    def send(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def find(self, type: str, **fields: Any) -> list[dict[str, Any]]:
        """Records of this ``type`` whose fields equal ``fields`` so far."""
        return [
            r
            for r in list(self.records)
            if r.get("type") == type and all(r.get(k) == v for k, v in fields.items())
        ]

    def wait(
        self,
        type: str,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The first record of this ``type`` with ``fields`` (and ``where``)."""

        def found() -> dict[str, Any] | None:
            hits = [r for r in self.find(type, **fields) if where is None or where(r)]
            return hits[0] if hits else None

        try:
            return wait_for(found, timeout, f"{self.name}: {type} {fields}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None

    def connected(self, timeout: float = 10.0) -> str:
        """Wait for the ``connected`` state; its socket id."""
        return str(self.wait("state", timeout, current="connected")["socket_id"])

    def error_codes(self) -> list[int]:
        """The Pusher codes in the errors pusher-js reported: ``{type, data: {code}}``,
        or wrapped once more (``{type: "WebSocketError", error: {...}}``)."""
        codes = []
        for record in self.find("error"):
            error = record.get("error") or {}
            data = error.get("data") or (error.get("error") or {}).get("data") or {}
            if isinstance(data.get("code"), int):
                codes.append(data["code"])
        return codes

    def describe(self) -> str:
        """What it printed and logged, for a failure's message."""
        seen = "\n".join(json.dumps(r) for r in self.records[-40:])
        self._stderr.flush()
        logged = self.log.read_text(errors="replace")[-3000:]
        return f"--- {self.name} records:\n{seen}\n--- its log:\n{logged}"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


class Peers:
    """Starts Node peers against one node; ``close_all`` in the fixture's finalizer."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[NodePeer] = []

    def start(self, script: str, config: dict[str, Any]) -> NodePeer:
        log = self.directory / f"peer{len(self.started)}.log"
        peer = NodePeer(script, config, log)
        self.started.append(peer)
        return peer

    def close_all(self) -> None:
        for peer in self.started:
            peer.close()


def pysher_client(port: int, app: App = APP, **options: Any) -> Any:
    """A pysher client (not connected) of ``app`` on this port; ``seen`` lists every
    event its connection takes in, as (event, channel, data).

    pysher drops a channel's events that arrive before ``subscribe`` has registered the
    channel (it sends first), and a subscription's answer often does: so the tests watch
    the connection's dispatch itself. And its thread waits in websocket-client's select
    for up to ``ping_timeout`` (pysher says 100 s) after ``disconnect``: 1 s here.
    """
    import pysher

    client = pysher.Pusher(
        app.key, custom_host="127.0.0.1", port=port, secure=False, log_level=30, **options
    )
    client.connection.socket_kwargs["ping_timeout"] = 1
    seen: list[tuple[str, str | None, Any]] = []
    handler = client.connection.event_handler

    def spy(event: str, data: Any, channel: str) -> None:
        seen.append((event, channel, data))
        handler(event, data, channel)

    client.connection.event_handler = spy
    for event in ("pusher:connection_established", "pusher:pong", "pusher:error"):
        client.connection.bind(event, lambda data, name=event: seen.append((name, None, data)))
    client.seen = seen
    return client


def client_config(
    port: int, backend: PusherBackend, user: str = "anonymous", app: App = APP
) -> dict[str, Any]:
    """The config of pusher_client.js / echo_client.mjs: this app's key on this node."""
    return {
        "key": app.key,
        "host": "127.0.0.1",
        "port": port,
        "authEndpoint": backend.url + "/pusher/auth",
        "userAuthEndpoint": backend.url + "/pusher/user-auth",
        "headers": {"X-User": user, "X-App-Key": app.key},
    }


def start_client(
    peers: Peers, node: Any, backend: PusherBackend, user: str = "anonymous", app: App = APP
) -> NodePeer:
    """pusher-js (tests/node/pusher_client.js) connected to ``node``'s pusher service."""
    peer = peers.start("pusher_client.js", client_config(node.port("pusher"), backend, user, app))
    peer.connected()
    return peer


def subscribe(peer: NodePeer, channel: str) -> dict[str, Any]:
    """Subscribe ``peer`` to ``channel``; what pusher-js reported on success."""
    peer.send("subscribe", channel=channel)
    return dict(peer.wait("subscribed", channel=channel))
