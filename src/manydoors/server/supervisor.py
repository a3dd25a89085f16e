"""The supervisor: spawns the workers, restarts a worker that dies, drains, handles signals.

One process per node runs the supervisor, the broker and the HTTP API on one uvloop
loop. Workers are forked by a multiprocessing fork server that has imported the worker
module once, so every worker starts small and shares those pages.

What it starts from lives elsewhere: pool sizing and the listening sockets in
``pools.py``, the stats and the connection samples the API shows in ``nodestats.py``,
the API itself in ``api.py`` (imported only here, at run time).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final

from ..broker.base import Broker
from ..broker.factory import make_broker
from ..config import Config
from ..doctor.capacity import startup_warning
from ..namespaces import Namespaces
from ..node import procfs
from ..node.link import Link
from ..protocol.ipc import Kind
from .errors import StartupError
from .limits import tables
from .nodestats import NodeStats
from .pools import Pool, Slot, bind_pool, check_tls, fd_limits, plan
from .tokens import KeyFileError, Verifier
from .worker import WorkerSpec, worker_main

if TYPE_CHECKING:
    from ..broker.router import Router
    from .pusherhooks import PusherWebhooks
    from .webhooks import Webhooks

RESTART_BACKOFF: Final = 1.0  # seconds before restarting a worker that died young
YOUNG: Final = 2.0  # a worker that dies within this many seconds of starting is "young"
WORKER_EVENTS: Final = frozenset({"connect", "disconnect"})  # what workers report


class Supervisor:
    """One node: its pools of workers, its broker and its API, from start to drain.

    Signal handlers only record the request; :meth:`run` acts on it (as uvicorn's
    multiprocess supervisor does).
    """

    def __init__(self, config: Config, out: Any = None) -> None:
        self.config = config
        self.out = out or sys.stderr
        router = make_broker(config)
        self.broker: Broker = router
        self.namespaces = Namespaces.of_config(config)  # each worker gets its own copy
        self.pools: list[Pool] = []
        self.fd_limit, self.fd_hard = fd_limits(config)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["manydoors.server.worker"])
        self.stop_requested: asyncio.Event | None = None
        self.stopping = False
        self.api_port = config.api.port
        # What the API shows: reads self.pools (the same list) and self.stopping.
        self.view = NodeStats(self.pools, self.broker, self.fd_limit, lambda: self.stopping)
        self.webhooks: Webhooks | None = None
        self.pusher_webhooks: PusherWebhooks | None = None  # Pusher apps' own webhooks
        self.worker_events: frozenset[str] = frozenset()  # what workers report (WorkerSpec)
        self.hook_up(router)

    def hook_up(self, router: Router) -> None:
        """Send the node's events to the backend's webhook URL, if one is configured, and
        each Pusher app's events to the app's own ``webhook_url``."""
        hooks = self.config.hooks
        apps = [app for app in self.config.apps if app.webhook_url is not None]
        if hooks.webhook_url is None and not apps:
            return
        # aiohttp stays out of the workers: imported here, in the supervisor only.
        from .pusherhooks import PusherWebhooks, channel_events, member_events
        from .webhooks import CHANNEL_EVENTS, Webhooks

        native_channels = native_members = None
        if hooks.webhook_url is not None:
            try:
                webhooks = Webhooks(hooks, f"{socket.gethostname()}:{os.getpid()}")
            except ValueError as exc:
                raise StartupError(f"hooks: {exc}") from None
            self.webhooks = webhooks
            self.view.webhooks = webhooks.stats
            self.worker_events = webhooks.events & WORKER_EVENTS
            if webhooks.events & CHANNEL_EVENTS:
                native_channels = webhooks.channel
            if webhooks.events & {"join", "leave"}:  # server-wide, told by the backplane
                native_members = webhooks.member
        pusher_channels = pusher_members = None
        if apps:  # workers report client events and cache misses by the apps' own lists
            pusher = self.pusher_webhooks = PusherWebhooks(apps, hooks)
            self.view.pusher_webhooks = pusher.stats
            if pusher.wants("channel_occupied", "channel_vacated"):
                pusher_channels = pusher.channel
            if pusher.wants("member_added", "member_removed"):
                pusher_members = pusher.member
        # An app's channel (names.split) goes to its app's webhooks, any other to the node's.
        router.events = channel_events(native_channels, pusher_channels)
        router.member_events = member_events(native_members, pusher_members)

    def say(self, line: str) -> None:
        print(f"manydoors: {line}", file=self.out, flush=True)

    # --- start ------------------------------------------------------------------------

    def bind(self) -> None:
        """Warn if this machine cannot hold the target; bind every service's slots."""
        target = sum(s.max_connections for s in self.config.services)
        warning = startup_warning("server", target, fd_limit=self.fd_limit)
        if warning:
            self.say(f"warning: {warning}")
        cap = self.fd_limit - self.config.fd_reserve
        for service, count in plan(self.config, self.fd_limit):
            pool = bind_pool(service, count, self.config, self.ctx)
            self.pools.append(pool)
            self.say(
                f"{service.name} {service.host}:{pool.port} backlog {service.backlog}: "
                f"{count} workers x {cap:,} fds = {count * cap:,} connections"
                f" (max_connections {service.max_connections:,})"
            )

    async def spawn(self, pool: Pool, slot: Slot) -> None:
        """Start a worker in ``slot`` and attach its link to the broker."""
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        spec = WorkerSpec(
            pool.service,
            slot.index,
            len(pool.slots),
            self.fd_limit,
            self.config.fd_reserve,
            self.config.drain_timeout,
            self.config.auth,
            nice=self.config.worker_nice,
            namespaces=self.namespaces,
            events=self.worker_events,
            # The proxies' URLs and limits; the webhook secret stays here.
            hooks=dataclasses.replace(self.config.hooks, webhook_url=None, webhook_secret=None),
            apps=self.config.apps if pool.service.protocol == "pusher" else (),
        )
        proc = self.ctx.Process(
            target=worker_main,
            args=(spec, slot.sock, theirs, pool.buffer, pool.counts),
            name=f"manydoors-{pool.service.name}-{slot.index}",
        )
        proc.start()
        theirs.close()
        slot.process, slot.started, slot.ready = proc, time.monotonic(), False
        _, link = await loop.create_unix_connection(
            lambda: Link(self.on_frame, f"{pool.service.name}/{slot.index}"), sock=mine
        )
        slot.link = link
        self.broker.attach(link)
        loop.add_reader(proc.sentinel, self.on_exit, pool, slot, proc)

    def on_frame(self, link: Link, kind: int, key: str, payload: bytes) -> None:
        """A frame from a worker: readiness and samples here, the rest to the broker."""
        if kind == Kind.SAMPLED:
            self.view.sampled(link, payload)
            return
        if kind == Kind.READY:
            for pool in self.pools:
                for slot in pool.slots:
                    if slot.link is link:
                        slot.ready = True
                        slot.base_fds = procfs.open_fds(int(key)) or 0
            return
        if kind == Kind.EVENT:  # connect, disconnect, join, leave: for the webhooks
            if key.startswith("pusher_"):  # a Pusher app's client_event, cache_miss
                if self.pusher_webhooks is not None:
                    self.pusher_webhooks.worker_event(key, payload)
            elif self.webhooks is not None:
                self.webhooks.worker_event(key, payload, link.name.rpartition("/")[0])
            return
        self.broker.on_frame(link, kind, key, payload)

    def on_exit(self, pool: Pool, slot: Slot, proc: BaseProcess) -> None:
        """A worker exited: forget what it held; restart it unless the node is stopping."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.sentinel)
        proc.join()
        if slot.process is not proc:
            return
        if slot.link is not None:
            self.broker.detach(slot.link)
            slot.link.close()
            slot.link = None
        pool.retired.update(pool.table.clear_row(slot.index))
        if pool.counts is not None:  # its connections are gone, and so are their counts
            for table in tables(memoryview(pool.counts), len(pool.slots)):
                table.clear_row(slot.index)
        pool.retired["connections"] = 0  # a gauge, not a counter
        slot.process = None
        if self.stopping:
            return
        slot.restarts += 1
        young = time.monotonic() - slot.started < YOUNG
        self.say(
            f"worker {pool.service.name}/{slot.index} (pid {proc.pid}) exited with code "
            f"{proc.exitcode}; restarting{' in 1 s' if young else ''}"
        )
        loop.call_later(
            RESTART_BACKOFF if young else 0,
            lambda: asyncio.ensure_future(self.spawn(pool, slot)),
        )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(s.ready for p in self.pools for s in p.slots):
            if time.monotonic() > deadline:
                raise StartupError("workers did not become ready in time")
            await asyncio.sleep(0.02)

    # --- run --------------------------------------------------------------------------

    async def run(self, ready_file: str | None = None) -> int:
        """Start, serve until SIGTERM or SIGINT, drain; the exit code."""
        from .api import start_api  # aiohttp stays out of the fork server's preload
        from .apiserver import sized_cap

        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The handler only records the request; the loop below acts on it.
            loop.add_signal_handler(sig, self.stop_requested.set)
        if self.config.auth.mode == "token":
            try:  # a bad key file stops the start here, not in every worker
                Verifier(self.config.auth)
            except KeyFileError as exc:
                raise StartupError(str(exc)) from None
        check_tls(self.config)
        self.bind()
        try:
            await self.broker.start()
        except ConnectionError as exc:
            await self.broker.close()
            raise StartupError(str(exc)) from None
        api = self.config.api
        if api.max_connections is None:  # keep fds for the workers' restarts
            slots = sum(len(pool.slots) for pool in self.pools)
            api = dataclasses.replace(api, max_connections=sized_cap(workers=slots))
        runner, self.api_port = await start_api(
            self.view, api, self.config.auth, self.namespaces, self.config.apps
        )
        self.say(
            f"API {api.host}:{self.api_port}: at most {api.max_connections:,} connections,"
            f" header timeout {api.header_timeout:g} s"
        )
        try:
            if self.webhooks is not None:
                await self.webhooks.start()
            if self.pusher_webhooks is not None:
                await self.pusher_webhooks.start()
            for pool in self.pools:
                for slot in pool.slots:
                    await self.spawn(pool, slot)
            await self.wait_ready()
            self.announce(ready_file)
            await self.stop_requested.wait()
            self.say("stopping: draining connections")
        finally:
            await self.shutdown()
            await runner.cleanup()
            await self.broker.close()
            if self.webhooks is not None:  # after the drain: its disconnects go out too
                await self.webhooks.close()
            if self.pusher_webhooks is not None:  # after the drain: its vacated too
                await self.pusher_webhooks.close()
        self.say("stopped")
        return 0

    def announce(self, ready_file: str | None) -> None:
        """Say the node is ready; write the ready file (ports, pids) for scripts."""
        api = f"http://{self.config.api.host}:{self.api_port}"
        services = {
            p.service.name: {
                "host": p.service.host,
                "port": p.port,
                "workers": [s.process.pid for s in p.slots if s.process is not None],
            }
            for p in self.pools
        }
        first = self.pools[0]
        try_it = "openssl s_client -quiet -connect {}:{}" if first.service.tls_cert else "nc {} {}"
        self.say(f"ready: API {api}; try: {try_it.format(first.service.host, first.port)}")
        if ready_file:
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "api": api, "services": services}, f)
            os.replace(tmp, ready_file)

    async def shutdown(self) -> None:
        """SIGTERM every worker (they drain themselves); SIGKILL whoever outlives the timeout."""
        self.stopping = True
        procs = [s.process for p in self.pools for s in p.slots if s.process is not None]
        for proc in procs:
            if proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for proc in procs:
            if proc.is_alive():
                self.say(f"worker pid {proc.pid} did not drain in time: killing it")
                proc.kill()
            proc.join(1)
        for pool in self.pools:
            for slot in pool.slots:
                slot.sock.close()
                if slot.link is not None:
                    slot.link.close()
